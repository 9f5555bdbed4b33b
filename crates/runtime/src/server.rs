//! The handle of a server that loads a model in the background (worker, draft): its bound
//! addresses, its load state, and its lifecycle (shutdown, wait until ready, join).

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where a server's model load stands.
#[derive(Debug, Clone)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// The bound gRPC address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// The bound metrics address, when serving metrics.
    pub metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    state: watch::Receiver<LoadState>,
    task: JoinHandle<anyhow::Result<()>>,
    /// What it is, for messages ("the worker", "the draft server").
    what: &'static str,
}

impl ServerHandle {
    /// `stop` is watched by the server's supervisor (`true`: drain and exit), `state` is what it
    /// publishes while loading, `task` is the supervisor itself.
    pub fn new(
        what: &'static str,
        addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        stop: watch::Sender<bool>,
        state: watch::Receiver<LoadState>,
        task: JoinHandle<anyhow::Result<()>>,
    ) -> Self {
        Self {
            addr,
            metrics_addr,
            stop,
            state,
            task,
            what,
        }
    }

    /// Starts the graceful shutdown (NOT_SERVING, refuse new work, drain, exit) and returns at
    /// once; [`ServerHandle::join`] waits for it to finish.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Waits until the model has loaded and the server reports SERVING; errors if loading failed.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let mut rx = self.state.clone();
        let what = self.what;
        let state = rx
            .wait_for(|s| !matches!(s, LoadState::Loading))
            .await
            .map(|s| s.clone())
            .map_err(|_| anyhow::anyhow!("{what} stopped while loading the model"))?;
        match state {
            LoadState::Failed(e) => Err(anyhow::anyhow!(e)),
            _ => Ok(()),
        }
    }

    /// Waits for the server to exit: after [`ServerHandle::shutdown`], a failed model load, or
    /// a server failure.
    pub async fn join(self) -> anyhow::Result<()> {
        let what = self.what;
        self.task
            .await
            .with_context(|| format!("{what} task panicked"))?
    }

    /// Runs until `shutdown` resolves (e.g. [`crate::shutdown_signal`]) or the server ends on
    /// its own, then drains and returns.
    pub async fn serve_until(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let what = self.what;
        tokio::select! {
            r = &mut self.task => return r.with_context(|| format!("{what} task panicked"))?,
            () = shutdown => self.shutdown(),
        }
        self.join().await
    }
}
