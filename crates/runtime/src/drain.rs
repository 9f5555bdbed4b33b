//! Graceful drain: once draining starts, new work is refused with UNAVAILABLE while work already
//! admitted runs to completion, up to a grace period; after it, the remaining work is told to stop.
//!
//! One `watch` channel holds the whole state, so admitting work and starting the drain are each a
//! single atomic update: a request can never slip in after the drain has counted zero in-flight.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    draining: bool,
    /// The grace period ran out: in-flight work should stop now.
    expired: bool,
    in_flight: usize,
}

/// Shared drain state of one server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Drain {
    state: Arc<watch::Sender<State>>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

/// One admitted unit of work (a request, a stream); dropping it marks the work finished.
#[derive(Debug)]
pub struct InFlight {
    drain: Drain,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.drain
            .state
            .send_modify(|s| s.in_flight = s.in_flight.saturating_sub(1));
    }
}

impl Drain {
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(State::default())),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.state.borrow().draining
    }

    pub fn in_flight(&self) -> usize {
        self.state.borrow().in_flight
    }

    /// Admits one unit of work, or refuses with UNAVAILABLE once draining has begun (clients and
    /// routers retry UNAVAILABLE elsewhere).
    pub fn enter(&self) -> Result<InFlight, tonic::Status> {
        let admitted = self.state.send_if_modified(|s| {
            if s.draining {
                return false;
            }
            s.in_flight += 1;
            true
        });
        if admitted {
            Ok(InFlight {
                drain: self.clone(),
            })
        } else {
            Err(tonic::Status::unavailable(
                "server is draining: retry on another replica",
            ))
        }
    }

    /// Starts draining: from now on `enter` refuses.
    pub fn start(&self) {
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.draining, true));
    }

    /// Starts draining and waits until in-flight work finishes or `grace` passes. After `grace`,
    /// [`Drain::expired`] resolves so the remaining work stops, and this waits a little longer
    /// for it to wind down. Returns how many were still running when the grace period ended
    /// (0 = a clean drain).
    pub async fn drain(&self, grace: Duration) -> usize {
        self.start();
        let mut rx = self.state.subscribe();
        let idle = tokio::time::timeout(grace, rx.wait_for(|s| s.in_flight == 0))
            .await
            .is_ok();
        if idle {
            return 0;
        }
        let left = self.in_flight();
        tracing::warn!(
            in_flight = left,
            grace_s = grace.as_secs_f64(),
            "drain grace period over; stopping the remaining work"
        );
        self.state.send_modify(|s| s.expired = true);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.in_flight == 0)).await;
        left
    }

    /// Resolves once draining has begun.
    pub async fn draining(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| s.draining).await;
    }

    /// Resolves once the drain's grace period is over: in-flight work should end now.
    pub async fn expired(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.expired).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn refuses_after_start_and_waits_for_in_flight() {
        let d = Drain::new();
        let g = d.enter().unwrap();
        assert_eq!(d.in_flight(), 1);
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.drain(Duration::from_secs(5)).await });
        d.draining().await;
        let err = d.enter().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("draining"));
        drop(g);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn grace_expiry_signals_remaining_work() {
        let d = Drain::new();
        let g = d.enter().unwrap();
        let d2 = d.clone();
        // The "work" stops when told to.
        let work = tokio::spawn(async move {
            d2.expired().await;
            drop(g);
        });
        assert_eq!(d.drain(Duration::from_millis(50)).await, 1);
        work.await.unwrap();
        assert_eq!(d.in_flight(), 0);
    }
}
