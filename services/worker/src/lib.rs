//! The worker service: serves the shard API (`tandem.shard.v1.Shard`) over the engine's
//! continuous batching.
//!
//! Life of a worker: the gRPC port binds at once and reports NOT_SERVING while the model loads
//! on a blocking thread; once loaded it reports SERVING. On shutdown it reports NOT_SERVING,
//! refuses new `Generate` calls with UNAVAILABLE, lets running streams finish for up to
//! `drain_grace`, stops whatever is left, and exits.
//!
//! With [`WorkerConfig::group`] the process is one rank of a tensor-parallel group (see
//! `group.rs`): rank 0 serves as above over `Engine::start_group`; other ranks serve only health
//! and follow rank 0. A leader whose group broke reports NOT_SERVING and refuses work with
//! UNAVAILABLE until restarted.

pub mod draft_client;
mod group;
mod metrics;
mod request;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_engine::draft::Drafter;
use tandem_engine::{Engine, EngineConfig, EngineParts, Request, SamplingParams, StopCriteria};
use tandem_model::{LoadOptions, Model, QuantMode};
use tandem_proto::shard::v1::shard_server::{ShardServer, SERVICE_NAME as SHARD_SERVICE};
use tandem_runtime::{
    health_service, reflection_v1, reflection_v1alpha, set_health, spawn_metrics_server, Drain,
    HealthReporter, LoadState, MetricsRegistry, ServingStatus,
};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

pub use group::{GroupConfig, LOAD_BARRIER_TIMEOUT};
pub use request::{GenerateError, DEFAULT_MAX_NEW_TOKENS};

pub use crate::draft_client::{CatchUp, DraftClientConfig, DraftClientStats, RemoteDrafter};
use crate::metrics::WorkerMetrics;
use crate::service::{ShardService, Shared};

/// How often a group leader checks whether its group has failed.
const GROUP_POLL: Duration = Duration::from_millis(200);
/// How long shutdown waits for the engine to finish its step and end the group.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Responses may be larger than requests: a 150k-token vocabulary's tokenizer.json is ~7 MB.
const MIN_RESPONSE_LIMIT: usize = 64 << 20;

/// Everything a worker needs, built once (flags, env, file) and passed by value.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// A Hugging Face model folder or a `.gguf` file.
    pub model: PathBuf,
    /// The name the worker reports in `Info`; default: the model path's file stem.
    pub model_name: Option<String>,
    /// gRPC address; port 0 picks a free port (see [`WorkerHandle::addr`]).
    pub listen: SocketAddr,
    /// Prometheus endpoint (`/metrics`, `/healthz`); `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    pub quant: QuantMode,
    /// Cap on the context below the model's own limit.
    pub max_context: Option<usize>,
    pub engine: EngineConfig,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens_limit: usize,
    /// Largest request message accepted (responses may be larger; see `Tokenizer`).
    pub max_message_bytes: usize,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// How long running streams may take to finish once shutdown begins.
    pub drain_grace: Duration,
    /// A tensor-parallel group this process is one rank of; `None` (or world size 1): the whole
    /// model in this process.
    pub group: Option<GroupConfig>,
    /// A draft service to pair with (speculative decoding); only the group leader uses it.
    pub draft: Option<DraftClientConfig>,
    /// Register the group in etcd (leaders only); `None`: routers find it by a static list.
    pub discovery: Option<WorkerDiscovery>,
    /// Where the model runs. `cuda` without an index: rank r of a group takes GPU
    /// `r % GPUs` (one GPU per pod in Kubernetes: GPU 0).
    pub device: tandem_model::DeviceKind,
    /// How a GPU group's ranks sum activations (ignored on the CPU and at TP=1).
    pub collective: CollectiveBackend,
    /// TLS of the shard API (mTLS with a client CA: only the cluster's routers may call).
    /// `None`: plaintext. Followers' health endpoints use it too.
    pub tls: Option<tandem_runtime::tls::TlsFiles>,
}

/// The tensor-parallel activations' transport. The step plans always go over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveBackend {
    /// NCCL when the ranks run on GPUs and the binary has it, else TCP.
    #[default]
    Auto,
    /// Over TCP through the host (CPU ranks; several ranks sharing one GPU, which NCCL refuses).
    Tcp,
    /// NCCL on device tensors (a build with the `nccl` feature, ranks on distinct GPUs).
    Nccl,
}

/// Where and as what a group leader registers: `/tandem/v1/<cluster>/groups/<model>/<group>`.
#[derive(Debug, Clone)]
pub struct WorkerDiscovery {
    pub etcd_endpoints: Vec<String>,
    pub cluster: String,
    /// `host:port` that routers dial; `None`: the bound gRPC address.
    pub advertise: Option<String>,
    /// Group id; `None`: derived from the advertise address.
    pub group: Option<String>,
    /// TLS to etcd; `None`: plaintext.
    pub etcd_tls: Option<tandem_discovery::EtcdTls>,
}

impl WorkerConfig {
    pub fn new(model: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            model: model.into(),
            model_name: None,
            listen,
            metrics_listen: None,
            quant: QuantMode::default(),
            max_context: None,
            engine: EngineConfig::default(),
            max_new_tokens_limit: 4096,
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 1024,
            drain_grace: Duration::from_secs(30),
            group: None,
            draft: None,
            discovery: None,
            device: tandem_model::DeviceKind::Cpu,
            collective: CollectiveBackend::Auto,
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

/// The loaded model, shared by the handlers.
pub(crate) struct Loaded {
    pub engine: Engine,
    pub model_name: String,
    /// Computed once: hashing a 150k vocabulary per `Info` call would be wasted work.
    pub vocab_hash: String,
    pub tokenizer_json: Result<String, String>,
    /// Ranks of the tensor-parallel group (1: no group).
    pub tp_size: usize,
    /// The paired draft service's client counters, when one is configured.
    pub draft_stats: Option<Arc<DraftClientStats>>,
    /// This rank's rendezvous key in etcd, held while the group lives.
    pub _rendezvous: Option<tandem_discovery::Rendezvous>,
}

/// A running worker.
pub type WorkerHandle = tandem_runtime::ServerHandle;

/// Runs a worker until `shutdown` resolves (e.g. [`tandem_runtime::shutdown_signal`]), then
/// drains and returns.
pub async fn serve(
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    spawn(cfg).await?.serve_until(shutdown).await
}

/// Binds the gRPC (and metrics) ports, starts loading the model in the background and serves.
/// Returns once the ports are bound.
pub async fn spawn(cfg: WorkerConfig) -> anyhow::Result<WorkerHandle> {
    if let Some(g) = &cfg.group {
        g.validate()?;
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the gRPC port {}", cfg.listen))?;
    if cfg.group.as_ref().is_some_and(GroupConfig::is_follower) {
        return group::spawn_follower(cfg, listener).await;
    }
    let addr = listener.local_addr()?;

    let registry = MetricsRegistry::new();
    let loaded = Arc::new(OnceLock::new());
    let metrics = WorkerMetrics::new(&registry, loaded.clone());
    let metrics_server = match cfg.metrics_listen {
        Some(a) => Some(spawn_metrics_server(a, registry.clone()).await?),
        None => None,
    };
    let metrics_addr = metrics_server.as_ref().map(|(a, _)| *a);

    let drain = Drain::new();
    let shared = Arc::new(Shared::new(
        loaded.clone(),
        drain.clone(),
        metrics,
        cfg.max_new_tokens_limit,
    ));
    let (health, health_svc) = health_service(&[SHARD_SERVICE]).await;
    registry.set_health(&health);
    let shard = ShardServer::new(ShardService::new(shared))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes.max(MIN_RESPONSE_LIMIT));
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let router = Server::builder()
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(reflection_v1(&[SHARD_SERVICE])?)
        .add_service(reflection_v1alpha(&[SHARD_SERVICE])?)
        .add_service(shard);
    let tls = tandem_runtime::tls::ServerTls::load_if(cfg.tls.as_ref())
        .context("the worker's TLS certificate")?;
    let server = tokio::spawn(tandem_runtime::tls::serve(router, listener, tls, async {
        let _ = server_stop_rx.await;
    }));
    tracing::info!(%addr, model = %cfg.model.display(), "worker listening; loading the model");

    let (state_tx, state_rx) = watch::channel(LoadState::Loading);
    let loader = tokio::spawn(load(cfg.clone(), loaded.clone()));

    let (stop, stop_rx) = watch::channel(false);
    let discovery = match &cfg.discovery {
        Some(d) => Some(Discovery::new(d, addr, &cfg).await?),
        None => None,
    };
    let task = tokio::spawn(supervise(Supervisor {
        discovery,
        health,
        drain,
        grace: cfg.drain_grace,
        stop: stop_rx,
        loaded,
        loader,
        state: state_tx,
        server,
        server_stop: server_stop_tx,
        metrics_task: metrics_server.map(|(_, t)| t),
    }));
    Ok(WorkerHandle::new(
        "the worker",
        addr,
        metrics_addr,
        stop,
        state_rx,
        task,
    ))
}

/// Loads the model on a blocking thread; `Ready` once `loaded` is set.
async fn load(cfg: WorkerConfig, loaded: Arc<OnceLock<Loaded>>) -> LoadState {
    let started = Instant::now();
    let res = tokio::task::spawn_blocking(move || load_blocking(&cfg)).await;
    match res {
        Ok(Ok(l)) => {
            tracing::info!(
                model = %l.model_name,
                context = l.engine.max_context(),
                vocab = l.engine.vocab_size(),
                load_s = started.elapsed().as_secs_f64(),
                "model loaded"
            );
            // Set once, here; nothing else writes it.
            let _ = loaded.set(l);
            LoadState::Ready
        }
        Ok(Err(e)) => LoadState::Failed(format!("{e:#}")),
        Err(e) => LoadState::Failed(format!("loading the model panicked: {e}")),
    }
}

fn load_blocking(cfg: &WorkerConfig) -> anyhow::Result<Loaded> {
    let opts = LoadOptions {
        quant: cfg.quant,
        max_context: cfg.max_context,
        device: cfg.device.for_rank(0)?,
        ..Default::default()
    };
    let (model, comm, tp_size, rendezvous) = match cfg.group.as_ref().filter(|g| g.world_size > 1) {
        Some(g) => {
            let joined = group::join_group(cfg, g)?;
            (
                joined.model,
                Some(joined.comm),
                g.world_size,
                joined.rendezvous,
            )
        }
        None => {
            let model = Model::load(&cfg.model, &opts)
                .with_context(|| format!("loading the model {}", cfg.model.display()))?;
            (model, None, 1, None)
        }
    };
    let (draft_model, draft_stats) = match &cfg.draft {
        Some(d) => {
            let stats = Arc::new(DraftClientStats::default());
            let mut drafter =
                RemoteDrafter::new(d.clone(), model.text.vocab_hash(), stats.clone())?;
            // A draft with another tokenizer is refused here, loudly; one that is not up yet
            // is paired when it comes up.
            if !drafter.pair_now()? {
                tracing::warn!(endpoint = %d.endpoint, "draft service not reachable yet; decoding without it until it is");
            }
            (Some(Box::new(drafter) as Box<dyn Drafter>), Some(stats))
        }
        None => (None, None),
    };
    let engine = Engine::start_with(
        model,
        cfg.engine.clone(),
        EngineParts {
            group: comm,
            draft_model,
        },
    );
    let text = engine.text();
    let loaded = Loaded {
        model_name: cfg.resolved_model_name(),
        vocab_hash: text.vocab_hash(),
        tokenizer_json: text.tokenizer_json().map_err(|e| e.to_string()),
        engine,
        tp_size,
        draft_stats,
        _rendezvous: rendezvous,
    };
    warm_up(&loaded.engine);
    Ok(loaded)
}

/// One tiny generation before reporting SERVING: candle prepares some weights lazily on the first
/// forward (seconds on a real model), which would otherwise land on the first user's request.
fn warm_up(engine: &Engine) {
    let req = Request {
        prompt: vec![0],
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_new_tokens: 1,
            ..Default::default()
        },
        ignore_eos: true,
        speculation: Default::default(),
    };
    let started = Instant::now();
    match engine.submit(req).and_then(|g| g.collect_blocking()) {
        Ok(_) => tracing::debug!(ms = started.elapsed().as_millis() as u64, "warm-up done"),
        Err(e) => tracing::warn!(error = %e, "warm-up generation failed"),
    }
}

/// The `host:port` others dial for this process: `--advertise-address`, else the bound address
/// (loopback when it is 0.0.0.0, with a warning).
pub(crate) fn advertise_address(d: &WorkerDiscovery, bound: SocketAddr) -> String {
    match &d.advertise {
        Some(a) => a.trim().to_owned(),
        None if bound.ip().is_unspecified() => {
            // 0.0.0.0 is no address to dial; loopback only works on this machine.
            let a = SocketAddr::from(([127, 0, 0, 1], bound.port())).to_string();
            tracing::warn!(listen = %bound, advertise = %a,
                "listening on all interfaces without --advertise-address: advertising \
                 loopback, which only processes on this machine can reach");
            a
        }
        None => bound.to_string(),
    }
}

/// A leader's registration in etcd: made once the model is loaded (SERVING), removed before
/// the drain (and when the group fails), so routers stop sending new work at once.
struct Discovery {
    registry: tandem_discovery::Registry,
    key: String,
    record: tandem_discovery::GroupRecord,
    registration: Option<tandem_discovery::Registration>,
}

impl Discovery {
    async fn new(
        d: &WorkerDiscovery,
        bound: SocketAddr,
        cfg: &WorkerConfig,
    ) -> anyhow::Result<Self> {
        let keys = tandem_discovery::Keys::new(&d.cluster)?;
        let advertise = advertise_address(d, bound);
        anyhow::ensure!(
            !advertise.is_empty(),
            "--advertise-address is empty: pass the HOST:PORT routers should dial"
        );
        let group = d
            .group
            .clone()
            .unwrap_or_else(|| tandem_discovery::group_id_from_address(&advertise));
        let model = cfg.resolved_model_name();
        let leader = if advertise.contains("://") {
            advertise
        } else {
            format!("http://{advertise}")
        };
        let registry = tandem_discovery::Registry::etcd_tls(&d.etcd_endpoints, d.etcd_tls.as_ref())
            .await
            .context("setting up the etcd client")?;
        Ok(Self {
            registry,
            key: keys.group(&model, &group),
            record: tandem_discovery::GroupRecord {
                version: tandem_discovery::RECORD_VERSION,
                model,
                group,
                leader,
                tp_size: cfg.group.as_ref().map_or(1, |g| g.world_size) as u32,
                tokenizer_hash: String::new(),
                capacity: cfg.engine.max_running as u32,
            },
            registration: None,
        })
    }

    fn register(&mut self, loaded: Option<&Loaded>) {
        if let Some(l) = loaded {
            self.record.tokenizer_hash = l.vocab_hash.clone();
        }
        match self.registry.register(&self.key, &self.record) {
            Ok(r) => {
                tracing::info!(key = %self.key, leader = %self.record.leader, "registering in etcd");
                self.registration = Some(r);
            }
            Err(e) => tracing::error!(key = %self.key, error = %e, "cannot register in etcd"),
        }
    }

    async fn deregister(&mut self) {
        if let Some(r) = self.registration.take() {
            match tokio::time::timeout(Duration::from_secs(5), r.deregister()).await {
                Ok(Ok(())) => tracing::info!(key = %self.key, "deregistered from etcd"),
                Ok(Err(e)) => tracing::warn!(key = %self.key, error = %e,
                    "deregistering failed; the key expires with its lease"),
                Err(_) => tracing::warn!(key = %self.key,
                    "deregistering timed out; the key expires with its lease"),
            }
        }
    }
}

struct Supervisor {
    discovery: Option<Discovery>,
    health: HealthReporter,
    drain: Drain,
    grace: Duration,
    stop: watch::Receiver<bool>,
    loaded: Arc<OnceLock<Loaded>>,
    loader: JoinHandle<LoadState>,
    /// Published here, after the health change, so `ready()` implies SERVING.
    state: watch::Sender<LoadState>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    server_stop: oneshot::Sender<()>,
    metrics_task: Option<JoinHandle<()>>,
}

/// Owns the worker's lifecycle, so health changes happen in one order: NOT_SERVING → SERVING
/// (loaded) → NOT_SERVING (shutdown).
async fn supervise(mut s: Supervisor) -> anyhow::Result<()> {
    let mut load_error = None;
    let mut server_done = None;
    let mut stop = s.stop.clone();
    enum First {
        Stop,
        Loaded(LoadState),
        ServerExited(Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>),
    }
    let first = tokio::select! {
        _ = stop.wait_for(|v| *v) => First::Stop,
        st = &mut s.loader => First::Loaded(st.unwrap_or_else(|e| {
            LoadState::Failed(format!("the model loader failed: {e}"))
        })),
        r = &mut s.server => First::ServerExited(r),
    };
    match first {
        First::Stop => {}
        First::ServerExited(r) => server_done = Some(r),
        First::Loaded(LoadState::Failed(e)) => {
            tracing::error!(error = %e, "model load failed; shutting down");
            s.state.send_replace(LoadState::Failed(e.clone()));
            load_error = Some(e);
        }
        First::Loaded(_) => {
            set_health(&s.health, &[SHARD_SERVICE], ServingStatus::Serving).await;
            s.state.send_replace(LoadState::Ready);
            tracing::info!("serving");
            if let Some(d) = s.discovery.as_mut() {
                d.register(s.loaded.get());
            }
            // A tensor-parallel group whose rank died cannot serve again: report NOT_SERVING so
            // routers stop sending here, and stay up (saying why) until stopped.
            let mut poll = tokio::time::interval(GROUP_POLL);
            let mut group_failed = false;
            loop {
                let tick = tokio::select! {
                    _ = stop.wait_for(|v| *v) => false,
                    r = &mut s.server => {
                        server_done = Some(r);
                        false
                    }
                    _ = poll.tick(), if !group_failed => true,
                };
                if !tick {
                    break;
                }
                group_failed = s.loaded.get().is_some_and(|l| {
                    l.engine
                        .stats()
                        .group_failed
                        .load(std::sync::atomic::Ordering::SeqCst)
                });
                if group_failed {
                    if let Some(d) = s.discovery.as_mut() {
                        d.deregister().await;
                    }
                    set_health(&s.health, &[SHARD_SERVICE], ServingStatus::NotServing).await;
                    tracing::error!(
                        "a rank of this tensor-parallel group failed; reporting NOT_SERVING \
                         until restarted (restart every rank of the group)"
                    );
                }
            }
        }
    }

    // Leave the registry first: routers stop sending new requests as soon as they see it.
    if let Some(d) = s.discovery.as_mut() {
        d.deregister().await;
    }
    set_health(&s.health, &[SHARD_SERVICE], ServingStatus::NotServing).await;
    if server_done.is_none() {
        tracing::info!(
            in_flight = s.drain.in_flight(),
            grace_s = s.grace.as_secs_f64(),
            "draining"
        );
        let left = s.drain.drain(s.grace).await;
        tracing::info!(stopped_early = left, "drained; stopping the server");
        let _ = s.server_stop.send(());
        // Streams have ended by now; idle connections close at once. Don't hang on a peer that
        // never acknowledges the GOAWAY.
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
    // Stop the engine before returning: in a group this is what ends the followers cleanly
    // (handles held elsewhere would otherwise keep it running until the process exits).
    if let Some(l) = s.loaded.get() {
        let engine = l.engine.clone();
        let ended = tokio::task::spawn_blocking(move || engine.shutdown(ENGINE_STOP_TIMEOUT))
            .await
            .unwrap_or(false);
        if !ended {
            tracing::warn!("the engine did not stop within {ENGINE_STOP_TIMEOUT:?}");
        }
    }
    if let Some(t) = s.metrics_task.take() {
        t.abort();
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
