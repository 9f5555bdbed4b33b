//! Server plumbing shared by Tandem's services: metrics endpoint, health, reflection, graceful
//! drain, tracing.
//!
//! Every Tandem gRPC server has the same outer shape (DESIGN.md, "Conventions"): `grpc.health.v1`
//! for Kubernetes probes, server reflection for grpcurl, Prometheus metrics on an HTTP port, and a
//! graceful drain on SIGTERM. The pieces live here so each service wires them in a few lines.

mod drain;
mod grpc;
mod metrics;
mod server;
pub mod tls;

pub use drain::{Drain, InFlight};
pub use grpc::{
    dropped_stream_code, health_service, reflection_v1, reflection_v1alpha, set_health,
    HealthReporter, ServingStatus,
};
pub use metrics::{
    grpc_code_name, latency_buckets, serve_metrics, spawn_metrics_server, token_count_buckets,
    MetricsRegistry, OPENMETRICS_CONTENT_TYPE,
};
pub use server::{LoadState, ServerHandle};

/// Installs the global `tracing` subscriber: the filter comes from `RUST_LOG` (default `info`),
/// output is JSON lines when `json` is set (log shippers), human-readable text otherwise.
/// Calling it again is harmless: tests and embedders may each call it.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // try_init fails only when a subscriber is already set, which is what idempotent means here.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Resolves on the first SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let wait = |kind: SignalKind, name: &'static str| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
                tracing::info!(signal = name, "shutdown signal received");
            }
            // Without the handler the other signal still works; never resolve this arm.
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "cannot listen for signal");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = wait(SignalKind::terminate(), "SIGTERM") => {}
        _ = wait(SignalKind::interrupt(), "SIGINT") => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn init_tracing_is_idempotent() {
        super::init_tracing(false);
        super::init_tracing(true);
    }

    /// The worker and router hand this future to `serve`, which needs it `Send + 'static`.
    #[test]
    fn shutdown_signal_is_send() {
        fn send<F: std::future::Future + Send + 'static>(_: F) {}
        send(super::shutdown_signal());
    }
}
