//! The Prometheus endpoint: `GET /metrics` (OpenMetrics text) and `GET /healthz` on a small
//! HTTP/1 server beside the gRPC port, plus histogram buckets shared by the services.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry the metrics endpoint can read while services keep registering into it. Cheap to
/// clone. Built from a `Registry` (or an `Arc<Registry>` already frozen) with `From`.
#[derive(Clone)]
pub struct MetricsRegistry {
    inner: Inner,
    /// The server's gRPC health, for `GET /readyz` (set once the health service exists).
    health: Arc<std::sync::OnceLock<tonic_health::server::HealthService>>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum Inner {
    Shared(Arc<Mutex<Registry>>),
    Frozen(Arc<Registry>),
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Registry> for MetricsRegistry {
    fn from(r: Registry) -> Self {
        Self {
            inner: Inner::Shared(Arc::new(Mutex::new(r))),
            health: Arc::default(),
        }
    }
}

impl From<Arc<Registry>> for MetricsRegistry {
    fn from(r: Arc<Registry>) -> Self {
        Self {
            inner: Inner::Frozen(r),
            health: Arc::default(),
        }
    }
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Registry::default().into()
    }

    /// Makes `GET /readyz` answer with the server's overall gRPC health: 200 while SERVING,
    /// 503 otherwise. For probes that cannot speak gRPC over TLS (kubelet's gRPC probe has no
    /// TLS), on the plaintext metrics port.
    pub fn set_health(&self, reporter: &tonic_health::server::HealthReporter) {
        let _ = self
            .health
            .set(tonic_health::server::HealthService::from_health_reporter(
                reporter.clone(),
            ));
    }

    /// Registers a metric. Returns false (and drops it) on a registry built from a frozen
    /// `Arc<Registry>`, which can no longer change.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) -> bool {
        self.with_mut(|r| r.register(name, help, metric))
    }

    /// Registers a collector, read on every scrape (see [`MetricsRegistry::register`]).
    pub fn register_collector(&self, collector: Box<dyn Collector>) -> bool {
        self.with_mut(|r| r.register_collector(collector))
    }

    fn with_mut(&self, f: impl FnOnce(&mut Registry)) -> bool {
        match &self.inner {
            Inner::Shared(m) => {
                // A panic elsewhere while holding the lock leaves a registry that is still fine.
                let mut r = m.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut r);
                true
            }
            Inner::Frozen(_) => false,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match &self.inner {
            Inner::Shared(m) => {
                let r = m.lock().unwrap_or_else(|p| p.into_inner());
                prometheus_client::encoding::text::encode(&mut out, &r)?;
            }
            Inner::Frozen(r) => prometheus_client::encoding::text::encode(&mut out, r)?,
        }
        Ok(out)
    }
}
/// The canonical upper-case name of a gRPC status code (as in grpc-go and the gRPC docs):
/// stable label values for the servers' request metrics.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Latency buckets in seconds, 1 ms to 60 s: wide enough for a time to first token behind a long
/// queue, fine enough for a 10 ms inter-token latency.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
        5.0, 10.0, 20.0, 30.0, 60.0,
    ]
}

/// Buckets for token counts (prompt or output lengths), 1 to 32768 in powers of two.
pub fn token_count_buckets() -> Vec<f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 16).collect()
}

fn router(registry: MetricsRegistry) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(registry)
}

async fn readyz(State(registry): State<MetricsRegistry>) -> Response {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health as _;
    let Some(h) = registry.health.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    };
    let req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    match h.check(req).await {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => "serving\n".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not serving\n").into_response(),
    }
}

async fn metrics(State(registry): State<MetricsRegistry>) -> Response {
    match registry.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Serves the metrics endpoint on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: impl Into<MetricsRegistry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(registry.into()))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Binds `addr` (port 0 picks a free port) and serves the metrics endpoint on its own task.
/// Returns the bound address and the task; abort the task to stop serving.
pub async fn spawn_metrics_server(
    addr: SocketAddr,
    registry: impl Into<MetricsRegistry>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics endpoint on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let registry = registry.into();
    let task = tokio::spawn(async move {
        if let Err(e) = serve_metrics(listener, registry, std::future::pending()).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "metrics endpoint listening");
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        let reg = MetricsRegistry::new();
        let c: Counter = Counter::default();
        assert!(reg.register("tandem_test_things", "Things.", c.clone()));
        c.inc_by(3);
        let (addr, task) = spawn_metrics_server("127.0.0.1:0".parse().unwrap(), reg)
            .await
            .unwrap();
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("application/openmetrics-text"), "{m}");
        assert!(m.contains("tandem_test_things_total 3"), "{m}");
        assert!(m.trim_end().ends_with("# EOF"), "{m}");
        let h = get(addr, "/healthz").await;
        assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
        task.abort();
    }

    /// `/readyz` follows the gRPC health: 503 before it exists and while NOT_SERVING, 200 once
    /// SERVING (the chart probes it when TLS keeps kubelet's gRPC probe out).
    #[tokio::test]
    async fn readyz_follows_the_grpc_health() {
        let reg = MetricsRegistry::new();
        let (addr, task) = spawn_metrics_server("127.0.0.1:0".parse().unwrap(), reg.clone())
            .await
            .unwrap();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        let (health, _svc) = crate::health_service(&["tandem.test.v1.Thing"]).await;
        reg.set_health(&health);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        crate::set_health(&health, &[], tonic_health::ServingStatus::Serving).await;
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("serving\n"),
            "{r}"
        );
        crate::set_health(&health, &[], tonic_health::ServingStatus::NotServing).await;
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        task.abort();
    }

    #[test]
    fn frozen_registry_refuses_registration() {
        let reg: MetricsRegistry = Arc::new(Registry::default()).into();
        assert!(!reg.register("x", "x", Counter::<u64>::default()));
        assert!(reg.encode().unwrap().contains("# EOF"));
    }
}
