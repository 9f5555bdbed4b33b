//! The router service: Tandem's public gRPC API (`tandem.v1.Generation`). It validates and
//! tokenizes requests, picks the least-loaded worker group, forwards token ids to the group
//! leader's `Shard.Generate` and streams the chunks back. It holds no model: each model's
//! tokenizer and chat template come from its workers (`Shard.Tokenizer`).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let cfg = tandem_router::RouterConfig::new(
//!     "127.0.0.1:50051".parse()?,
//!     vec!["http://127.0.0.1:50061".into()],
//! );
//! tandem_router::serve(cfg, tandem_runtime::shutdown_signal()).await
//! # }
//! ```

pub mod auth;
mod membership;
mod metrics;
mod pool;
mod routing;
mod service;
mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tandem_proto::v1::generation_server::GenerationServer;
use tandem_runtime::{Drain, MetricsRegistry, ServingStatus};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use membership::{Membership, MembershipStatus, RegistryMembership, StaticMembership};
pub use routing::Policy;
pub use service::GROUP_HEADER;
pub use validate::{DEFAULT_MAX_NEW_TOKENS, MAX_ID_LEN};

/// The public service's full name, for health and reflection.
pub const GENERATION_SERVICE: &str = "tandem.v1.Generation";
/// The health "service" that tells whether the membership registry (etcd) is reachable:
/// NOT_SERVING while the router serves from the last known membership. Only with etcd; probes
/// of "" or `tandem.v1.Generation` are not affected by it.
pub const DISCOVERY_HEALTH: &str = "tandem.discovery";

/// Everything the router needs, built once (flags, environment, file) and passed by value.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// gRPC address of the public API.
    pub listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`); none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Group leaders' shard endpoints, `http://host:port` (a bare `host:port` gets `http://`).
    pub workers: Vec<String>,
    /// etcd endpoints to follow for group membership (every model's `groups/` of `cluster`), on
    /// top of `workers`; empty: `workers` only.
    pub etcd_endpoints: Vec<String>,
    /// Cluster name: the etcd key prefix `/tandem/v1/<cluster>/`.
    pub cluster: String,
    /// How a group is chosen for each request.
    pub routing_policy: Policy,
    /// The model a request gets when it leaves `model` empty. Unset: the only model served
    /// (the first by name when there are several).
    pub model_name: Option<String>,
    /// Largest max_new_tokens accepted (workers may lower it further).
    pub max_new_tokens_limit: usize,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 concurrent streams per client connection.
    pub max_concurrent_streams: u32,
    /// How long a SIGTERM waits for in-flight requests before cutting them off.
    pub drain_grace: Duration,
    /// Upper bound on any generation request, on top of the client's own deadline.
    pub request_timeout: Option<Duration>,
    /// How often each worker's health, info and load are polled.
    pub poll_interval: Duration,
    /// TLS of the public API (`--tls-cert`, `--tls-key`; with `--tls-client-ca` clients need
    /// certificates). `None`: plaintext.
    pub tls: Option<tandem_runtime::tls::TlsFiles>,
    /// TLS to the workers (`--tls-ca`, and `--tls-cert`/`--tls-key` as the client certificate
    /// workers with mTLS require). `None`: plaintext.
    pub upstream_tls: Option<tandem_runtime::tls::ClientTls>,
    /// The API key file (`--api-keys`, see [`auth`]); `None`: anyone may call.
    pub api_keys: Option<std::path::PathBuf>,
    /// TLS to etcd; `None`: plaintext.
    pub etcd_tls: Option<tandem_discovery::EtcdTls>,
}

impl RouterConfig {
    /// The defaults for everything but the address and the workers.
    pub fn new(listen: SocketAddr, workers: Vec<String>) -> Self {
        Self {
            listen,
            metrics_listen: None,
            workers,
            etcd_endpoints: Vec::new(),
            cluster: tandem_discovery::DEFAULT_CLUSTER.to_owned(),
            routing_policy: Policy::default(),
            model_name: None,
            max_new_tokens_limit: 4096,
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 1024,
            drain_grace: Duration::from_secs(30),
            request_timeout: None,
            poll_interval: Duration::from_secs(1),
            tls: None,
            upstream_tls: None,
            api_keys: None,
            etcd_tls: None,
        }
    }
}

/// A router running on its own task (tests, `tandem up` in one process).
pub struct RouterHandle {
    /// The bound gRPC address (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RouterHandle {
    /// Drains (see [`RouterConfig::drain_grace`]) and stops the router.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("router task panicked")?
    }
}

impl Drop for RouterHandle {
    fn drop(&mut self) {
        // A handle dropped without shutdown() stops the router, drain skipped.
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Serves on `cfg.listen` until `shutdown` resolves, then drains. Groups come from
/// `cfg.workers` and, with `cfg.etcd_endpoints`, from etcd.
pub async fn serve(
    cfg: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let membership = membership(&cfg).await?;
    serve_with_membership(cfg, membership, shutdown).await
}

/// The membership `cfg` asks for: the static list, plus etcd when endpoints are given.
pub async fn membership(cfg: &RouterConfig) -> anyhow::Result<Arc<dyn Membership>> {
    let fixed = StaticMembership::new(cfg.workers.clone());
    if cfg.etcd_endpoints.is_empty() {
        return Ok(Arc::new(fixed));
    }
    let keys = tandem_discovery::Keys::new(&cfg.cluster)?;
    let registry = tandem_discovery::Registry::etcd_tls(&cfg.etcd_endpoints, cfg.etcd_tls.as_ref())
        .await
        .context("setting up the etcd client")?;
    tracing::info!(
        endpoints = ?cfg.etcd_endpoints,
        prefix = %keys.groups(),
        "following group membership in etcd"
    );
    Ok(Arc::new(RegistryMembership::new(&registry, &keys, fixed)))
}

/// [`serve`] with another membership backend; `cfg.workers` is ignored.
pub async fn serve_with_membership(
    cfg: RouterConfig,
    membership: Arc<dyn Membership>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the router's gRPC address {}", cfg.listen))?;
    let router = Router::start(cfg, membership, listener).await?;
    router.run(shutdown).await
}

/// Binds, starts serving on a task and returns at once.
pub async fn spawn(cfg: RouterConfig) -> anyhow::Result<RouterHandle> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the router's gRPC address {}", cfg.listen))?;
    let membership = membership(&cfg).await?;
    let router = Router::start(cfg, membership, listener).await?;
    let addr = router.addr;
    let metrics_addr = router.metrics_addr;
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(router.run(async {
        let _ = rx.await;
    }));
    Ok(RouterHandle {
        addr,
        metrics_addr,
        stop: Some(tx),
        task,
    })
}

/// A router with its listener bound, its metrics endpoint up and its poller running.
struct Router {
    cfg: RouterConfig,
    listener: TcpListener,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    poller: JoinHandle<()>,
    health: tandem_runtime::HealthReporter,
    health_server:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    service: service::GenerationService,
    drain: Drain,
    tls: Option<tandem_runtime::tls::ServerTls>,
}

impl Router {
    async fn start(
        cfg: RouterConfig,
        membership: Arc<dyn Membership>,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        // Bad certificate files fail the start, naming the file.
        let tls = tandem_runtime::tls::ServerTls::load_if(cfg.tls.as_ref())
            .context("the router's TLS certificate")?;
        let api_keys = match &cfg.api_keys {
            Some(p) => {
                let keys = Arc::new(auth::ApiKeys::load(p).context("the API key file")?);
                // Stops with the last reference (the service's).
                keys.watch();
                Some(keys)
            }
            None => None,
        };
        let mut registry = Registry::default();
        let metrics = metrics::RouterMetrics::new(&mut registry);
        if membership.status() != MembershipStatus::Static {
            metrics.register_registry_metrics(&mut registry);
        }
        let registry = MetricsRegistry::from(registry);
        let (metrics_addr, metrics_task) = match cfg.metrics_listen {
            Some(a) => {
                let (bound, task) =
                    tandem_runtime::spawn_metrics_server(a, registry.clone()).await?;
                (Some(bound), Some(task))
            }
            None => (None, None),
        };
        let health = tandem_runtime::HealthReporter::new();
        registry.set_health(&health);
        let health_server = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        // NOT_SERVING until a worker is usable; the poller flips it.
        tandem_runtime::set_health(&health, &[GENERATION_SERVICE], ServingStatus::NotServing).await;
        let (pool, poller) = pool::pool(
            membership,
            cfg.routing_policy,
            health.clone(),
            metrics.clone(),
            cfg.poll_interval,
            cfg.max_message_bytes,
            cfg.upstream_tls.clone(),
        );
        let pool = Arc::new(pool);
        let poller = tokio::spawn(poller.run());
        // Give the first poll a moment, so a router started next to running workers answers
        // its first requests; it serves either way.
        let _ = tokio::time::timeout(Duration::from_secs(3), pool.wait_polled()).await;
        let drain = Drain::new();
        let service = service::GenerationService::new(
            service::ServiceConfig {
                model_name: cfg.model_name.clone(),
                max_new_tokens_limit: cfg.max_new_tokens_limit,
                request_timeout: cfg.request_timeout,
                max_message_bytes: cfg.max_message_bytes,
                api_keys: api_keys.clone(),
            },
            pool,
            metrics,
            drain.clone(),
        );
        tracing::info!(
            %addr,
            workers = ?cfg.workers,
            etcd = ?cfg.etcd_endpoints,
            policy = cfg.routing_policy.name(),
            "router listening"
        );
        Ok(Self {
            cfg,
            listener,
            addr,
            metrics_addr,
            metrics_task,
            poller,
            health,
            health_server,
            service,
            drain,
            tls,
        })
    }

    async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        // tonic refuses oversized messages with OUT_OF_RANGE before our handler runs; let
        // requests up to 4x the limit through so the handler can answer INVALID_ARGUMENT naming
        // the limit, as clients expect for bad input. Beyond that tonic's hard cap applies.
        let generation = GenerationServer::new(self.service)
            .max_decoding_message_size(cfg.max_message_bytes.saturating_mul(4))
            .max_encoding_message_size(service::response_limit(cfg.max_message_bytes));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(cfg.max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(self.health_server)
            .add_service(tandem_runtime::reflection_v1(&[GENERATION_SERVICE])?)
            .add_service(tandem_runtime::reflection_v1alpha(&[GENERATION_SERVICE])?)
            .add_service(generation);
        let server = tandem_runtime::tls::serve(server, self.listener, self.tls, async {
            let _ = stop_rx.await;
        });
        let mut server = tokio::spawn(server);
        tokio::select! {
            _ = shutdown => {}
            r = &mut server => {
                // The server ended on its own: an accept or transport failure.
                self.poller.abort();
                if let Some(t) = self.metrics_task { t.abort(); }
                return match r {
                    Ok(r) => r.context("router gRPC server failed"),
                    Err(e) => Err(anyhow::anyhow!("router gRPC server panicked: {e}")),
                };
            }
        }
        tracing::info!(
            grace_s = cfg.drain_grace.as_secs_f64(),
            in_flight = self.drain.in_flight(),
            "router draining"
        );
        // The poller would flip health back to SERVING; stop it first.
        self.poller.abort();
        tandem_runtime::set_health(
            &self.health,
            &[GENERATION_SERVICE],
            ServingStatus::NotServing,
        )
        .await;
        let left = self.drain.drain(cfg.drain_grace).await;
        let _ = stop_tx.send(());
        match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(Ok(r)) => r.context("router gRPC server failed")?,
            Ok(Err(e)) => return Err(anyhow::anyhow!("router gRPC server panicked: {e}")),
            Err(_) => {
                tracing::warn!("connections still open after the drain; closing them");
                server.abort();
            }
        }
        if let Some(t) = self.metrics_task {
            t.abort();
        }
        tracing::info!(cut_off = left, "router stopped");
        Ok(())
    }
}
