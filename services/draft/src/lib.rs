//! The draft service of speculative decoding (DESIGN.md, "Speculative decoding, exactly"): a
//! small model sharing the target's tokenizer proposes a few tokens per sequence, with the
//! distribution q each was drawn from, keeping a KV cache per sequence so each call sends only
//! what changed (`tandem.draft.v1.Drafter`).
//!
//! - [`DraftCore`]: the model and its sequences, synchronous and testable without gRPC.
//! - [`spawn`] / [`serve`]: the gRPC server (Drafter, `grpc.health.v1`, reflection, Prometheus
//!   metrics, drain on shutdown). The core runs on its own thread; concurrent calls queue and
//!   those waiting together run as one batch.
//!
//! Life of a draft server: the gRPC port binds at once and reports NOT_SERVING while the model
//! loads and warms up on a blocking thread, then SERVING. On shutdown it reports NOT_SERVING,
//! refuses new calls with UNAVAILABLE, lets calls in flight finish for up to `drain_grace`, and
//! exits.

mod core;
mod error;
mod metrics;
mod sample;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_model::{LoadOptions, Model, QuantMode};
use tandem_proto::draft::v1::drafter_server::{DrafterServer, SERVICE_NAME as DRAFTER_SERVICE};
use tandem_proto::draft::v1::InfoResponse;
use tandem_runtime::{
    health_service, reflection_v1, reflection_v1alpha, set_health, spawn_metrics_server, Drain,
    LoadState, MetricsRegistry, ServingStatus,
};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

pub use crate::core::{
    CallStats, CoreConfig, DraftCore, DEFAULT_MAX_Q_TOKENS, MAX_DRAFT_TOKENS, MAX_Q_TOKENS_LIMIT,
};
pub use crate::error::DraftError;

use crate::metrics::DraftMetrics;
use crate::service::{CoreHandle, DraftService, Loaded, Shared};

/// The default gRPC address of `tandem draft`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50071";

/// Everything a draft server needs, built once (flags, env, file) and passed by value.
#[derive(Debug, Clone)]
pub struct DraftConfig {
    /// A Hugging Face model folder or a `.gguf` file.
    pub model: PathBuf,
    /// The name reported in `Info`; default: the model path's file stem.
    pub model_name: Option<String>,
    /// gRPC address; port 0 picks a free port (see [`DraftHandle::addr`]).
    pub listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`, `/healthz`); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    pub quant: QuantMode,
    /// Cap on the context below the model's own limit (bounds KV per sequence).
    pub max_context: Option<usize>,
    /// Sequences held, tokens per draft, idle TTL, forward token budget.
    pub core: CoreConfig,
    /// Propose/Release calls queued before RESOURCE_EXHAUSTED.
    pub max_queued_calls: usize,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// How long calls in flight may take to finish once shutdown begins.
    pub drain_grace: Duration,
    /// Register in etcd once loaded (`drafts/<model>/<id>`), deregister before draining.
    pub discovery: Option<DraftDiscovery>,
    /// Where the draft model runs (`cuda`: GPU 0; the target's GPU or another).
    pub device: tandem_model::DeviceKind,
    /// TLS of the draft API (mTLS with a client CA: only the cluster's workers may call).
    pub tls: Option<tandem_runtime::tls::TlsFiles>,
}

/// Where and as what the draft registers.
#[derive(Debug, Clone)]
pub struct DraftDiscovery {
    pub etcd_endpoints: Vec<String>,
    pub cluster: String,
    /// `host:port` that verifiers dial; `None`: the bound gRPC address.
    pub advertise: Option<String>,
    /// TLS to etcd; `None`: plaintext.
    pub etcd_tls: Option<tandem_discovery::EtcdTls>,
}

impl DraftConfig {
    pub fn new(model: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            model: model.into(),
            model_name: None,
            listen,
            metrics_listen: None,
            quant: QuantMode::default(),
            max_context: None,
            core: CoreConfig::default(),
            max_queued_calls: 1024,
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 1024,
            drain_grace: Duration::from_secs(30),
            discovery: None,
            device: tandem_model::DeviceKind::Cpu,
            tls: None,
        }
    }

    /// `model_name`, or the model path's file stem.
    pub fn resolved_model_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".to_string())
        })
    }
}

/// A running draft server.
pub type DraftHandle = tandem_runtime::ServerHandle;

/// Runs a draft server until `shutdown` resolves (e.g. [`tandem_runtime::shutdown_signal`]),
/// then drains and returns.
pub async fn serve(
    cfg: DraftConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    spawn(cfg).await?.serve_until(shutdown).await
}

/// Binds the gRPC (and metrics) ports, starts loading the model in the background and serves.
/// Returns once the ports are bound.
pub async fn spawn(cfg: DraftConfig) -> anyhow::Result<DraftHandle> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let registered = match &cfg.discovery {
        Some(d) => Some(Registered::new(d, addr, &cfg.resolved_model_name()).await?),
        None => None,
    };
    let registry = MetricsRegistry::new();
    let metrics = DraftMetrics::new(&registry);
    let metrics_server = match cfg.metrics_listen {
        Some(a) => Some(spawn_metrics_server(a, registry.clone()).await?),
        None => None,
    };
    let metrics_addr = metrics_server.as_ref().map(|(a, _)| *a);

    let drain = Drain::new();
    let loaded = Arc::new(OnceLock::new());
    let shared = Arc::new(Shared {
        loaded: loaded.clone(),
        drain: drain.clone(),
        metrics: metrics.clone(),
    });
    let (health, health_svc) = health_service(&[DRAFTER_SERVICE]).await;
    registry.set_health(&health);
    let drafter = DrafterServer::new(DraftService::new(shared))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes.max(16 << 20));
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let router = Server::builder()
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(reflection_v1(&[DRAFTER_SERVICE])?)
        .add_service(reflection_v1alpha(&[DRAFTER_SERVICE])?)
        .add_service(drafter);
    let tls = tandem_runtime::tls::ServerTls::load_if(cfg.tls.as_ref())
        .context("the draft's TLS certificate")?;
    let server = tokio::spawn(tandem_runtime::tls::serve(router, listener, tls, async {
        let _ = server_stop_rx.await;
    }));
    tracing::info!(%addr, model = %cfg.model.display(), "draft listening; loading the model");

    let (state_tx, state_rx) = watch::channel(LoadState::Loading);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let load_cfg = cfg.clone();
        let load_metrics = metrics.clone();
        let loader = tokio::task::spawn_blocking(move || load(&load_cfg, load_metrics));
        let result = supervise(Supervisor {
            registered,
            health,
            drain,
            grace: cfg.drain_grace,
            stop: stop_rx,
            loaded: loaded.clone(),
            loader,
            state: state_tx,
            server,
            server_stop: server_stop_tx,
        })
        .await;
        if let Some(l) = loaded.get() {
            l.core.stop();
        }
        if let Some((_, t)) = metrics_server {
            t.abort();
        }
        result
    });
    Ok(DraftHandle::new(
        "the draft server",
        addr,
        metrics_addr,
        stop,
        state_rx,
        task,
    ))
}

/// Loads the model, warms it up and starts the core thread.
fn load(cfg: &DraftConfig, metrics: DraftMetrics) -> anyhow::Result<Loaded> {
    let started = Instant::now();
    let opts = LoadOptions {
        quant: cfg.quant,
        max_context: cfg.max_context,
        device: cfg.device.for_rank(0)?,
        ..Default::default()
    };
    let model = Model::load(&cfg.model, &opts)
        .with_context(|| format!("loading the draft model {}", cfg.model.display()))?;
    let core = DraftCore::new(model, cfg.core.clone());
    let warm = Instant::now();
    if let Err(e) = core.warm_up() {
        tracing::warn!(error = %e, "warm-up forward failed");
    }
    let info = InfoResponse {
        model: cfg.resolved_model_name(),
        tokenizer_hash: core.text().vocab_hash(),
        vocab_size: u32::try_from(core.vocab_size()).unwrap_or(u32::MAX),
        context_length: u32::try_from(core.max_context()).unwrap_or(u32::MAX),
        max_sequences: u32::try_from(core.config().max_sequences).unwrap_or(u32::MAX),
        max_draft_tokens: u32::try_from(core.config().max_draft_tokens).unwrap_or(u32::MAX),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    tracing::info!(
        model = %info.model,
        context = info.context_length,
        vocab = info.vocab_size,
        load_s = started.elapsed().as_secs_f64(),
        warm_up_s = warm.elapsed().as_secs_f64(),
        "draft model loaded"
    );
    let core = CoreHandle::start(core, cfg.max_queued_calls, metrics.clone())
        .context("starting the draft core thread")?;
    metrics.loaded();
    Ok(Loaded { core, info })
}

/// The draft's registration in etcd: made once loaded, removed before the drain.
struct Registered {
    registry: tandem_discovery::Registry,
    key: String,
    address: String,
    registration: Option<tandem_discovery::Registration>,
}

impl Registered {
    async fn new(d: &DraftDiscovery, bound: SocketAddr, model: &str) -> anyhow::Result<Self> {
        let keys = tandem_discovery::Keys::new(&d.cluster)?;
        let advertise = d
            .advertise
            .clone()
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| bound.to_string());
        let id = tandem_discovery::group_id_from_address(&advertise);
        let address = if advertise.contains("://") {
            advertise
        } else {
            format!("http://{advertise}")
        };
        let registry = tandem_discovery::Registry::etcd_tls(&d.etcd_endpoints, d.etcd_tls.as_ref())
            .await
            .context("setting up the etcd client")?;
        Ok(Self {
            registry,
            key: keys.draft(model, &id),
            address,
            registration: None,
        })
    }

    fn register(&mut self, info: &InfoResponse) {
        let id = self.key.rsplit('/').next().unwrap_or_default().to_owned();
        let record = tandem_discovery::DraftRecord {
            version: tandem_discovery::RECORD_VERSION,
            model: info.model.clone(),
            id,
            address: self.address.clone(),
            tokenizer_hash: info.tokenizer_hash.clone(),
        };
        match self.registry.register(&self.key, &record) {
            Ok(r) => {
                tracing::info!(key = %self.key, address = %self.address, "registering in etcd");
                self.registration = Some(r);
            }
            Err(e) => tracing::error!(key = %self.key, error = %e, "cannot register in etcd"),
        }
    }

    async fn deregister(&mut self) {
        if let Some(r) = self.registration.take() {
            match tokio::time::timeout(Duration::from_secs(5), r.deregister()).await {
                Ok(Ok(())) => tracing::info!(key = %self.key, "deregistered from etcd"),
                _ => {
                    tracing::warn!(key = %self.key, "deregistering failed; the key expires with its lease")
                }
            }
        }
    }
}

struct Supervisor {
    registered: Option<Registered>,
    health: tandem_runtime::HealthReporter,
    drain: Drain,
    grace: Duration,
    stop: watch::Receiver<bool>,
    loaded: Arc<OnceLock<Loaded>>,
    loader: JoinHandle<anyhow::Result<Loaded>>,
    /// Published after the health change, so `ready()` implies SERVING.
    state: watch::Sender<LoadState>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    server_stop: oneshot::Sender<()>,
}

/// Owns the server's lifecycle, so health changes happen in one order: NOT_SERVING → SERVING
/// (loaded) → NOT_SERVING (shutdown).
async fn supervise(mut s: Supervisor) -> anyhow::Result<()> {
    let mut load_error = None;
    let mut server_done = None;
    let mut stop = s.stop.clone();
    enum First {
        Stop,
        Loaded(anyhow::Result<Loaded>),
        ServerExited(Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>),
    }
    let first = tokio::select! {
        _ = stop.wait_for(|v| *v) => First::Stop,
        r = &mut s.server => First::ServerExited(r),
        l = &mut s.loader => First::Loaded(
            l.map_err(|e| anyhow::anyhow!("loading the draft model panicked: {e}")).and_then(|r| r),
        ),
    };
    match first {
        First::Stop => {}
        First::ServerExited(r) => server_done = Some(r),
        First::Loaded(Ok(l)) => {
            // Set once, here; nothing else writes it.
            if let Some(r) = s.registered.as_mut() {
                r.register(&l.info);
            }
            let _ = s.loaded.set(l);
            set_health(&s.health, &[DRAFTER_SERVICE], ServingStatus::Serving).await;
            s.state.send_replace(LoadState::Ready);
            tracing::info!("serving");
            tokio::select! {
                _ = stop.wait_for(|v| *v) => {}
                r = &mut s.server => server_done = Some(r),
            }
        }
        First::Loaded(Err(e)) => {
            let e = format!("{e:#}");
            tracing::error!(error = %e, "draft model load failed; shutting down");
            s.state.send_replace(LoadState::Failed(e.clone()));
            load_error = Some(e);
        }
    }

    // Verifiers stop picking this draft first, then the drain.
    if let Some(r) = s.registered.as_mut() {
        r.deregister().await;
    }
    set_health(&s.health, &[DRAFTER_SERVICE], ServingStatus::NotServing).await;
    if server_done.is_none() {
        tracing::info!(in_flight = s.drain.in_flight(), "draining");
        let left = s.drain.drain(s.grace).await;
        tracing::info!(stopped_early = left, "drained; stopping the server");
        let _ = s.server_stop.send(());
        match tokio::time::timeout(Duration::from_secs(5), &mut s.server).await {
            Ok(r) => server_done = Some(r),
            Err(_) => {
                tracing::warn!("server did not stop within 5 s; aborting it");
                s.server.abort();
            }
        }
    } else {
        s.drain.start();
    }
    if let Some(e) = load_error {
        anyhow::bail!(e);
    }
    match server_done {
        Some(Ok(Err(e))) => Err(anyhow::Error::new(e).context("the gRPC server failed")),
        Some(Err(e)) => Err(anyhow::Error::new(e).context("the gRPC server task panicked")),
        _ => Ok(()),
    }
}
