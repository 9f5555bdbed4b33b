//! Tensor-parallel worker groups as processes: rank 0 (the leader) serves the shard API over
//! `Engine::start_group`; ranks 1..N-1 (followers) mirror its step plans with
//! [`tandem_engine::Follower`] and serve only `grpc.health.v1` (SERVING once loaded).
//!
//! Start-up of every rank: rendezvous over TCP (`connect_timeout`), load this rank's shard, then a
//! barrier with a long timeout (ranks finish loading at different times), and only then the
//! short I/O timeout and the warm-up forward that both sides run in lockstep.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tandem_collective::{Communicator, TcpCommunicator, TcpOptions};
use tandem_engine::{Follower, FollowerError};
use tandem_model::{LoadOptions, Model, Shard};
use tandem_runtime::{health_service, ServingStatus};
use tandem_runtime::{set_health, spawn_metrics_server, HealthReporter, MetricsRegistry};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::{WorkerConfig, WorkerHandle};
use tandem_runtime::LoadState;

/// How long a rank waits for the slowest rank of its group to finish loading its shard.
pub const LOAD_BARRIER_TIMEOUT: Duration = Duration::from_secs(600);

/// This process's place in a tensor-parallel group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// 0 = leader (serves the shard API), 1..world_size-1 = followers.
    pub rank: usize,
    pub world_size: usize,
    /// Where each rank's collective listener binds (`peers[rank]` is this process's), in rank
    /// order; the same list on every rank. Empty with `etcd_rendezvous`.
    pub peers: Vec<SocketAddr>,
    /// Meet the other ranks through etcd (`rendezvous/<group>/<rank>` keys, with the cluster,
    /// group and advertise address of [`crate::WorkerConfig::discovery`]) instead of `peers`:
    /// each rank listens on a free port of its gRPC listen address and publishes it.
    pub etcd_rendezvous: bool,
    /// How long the rendezvous waits for every rank to be reachable.
    pub connect_timeout: Duration,
    /// Socket timeout once loaded: a rank silent this long mid-step fails the group.
    pub io_timeout: Duration,
}

impl GroupConfig {
    pub fn new(rank: usize, world_size: usize, peers: Vec<SocketAddr>) -> Self {
        Self {
            rank,
            world_size,
            peers,
            etcd_rendezvous: false,
            connect_timeout: tandem_collective::tcp::DEFAULT_CONNECT_TIMEOUT,
            io_timeout: tandem_collective::tcp::DEFAULT_IO_TIMEOUT,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.world_size >= 1, "the world size must be at least 1");
        anyhow::ensure!(
            self.rank < self.world_size,
            "rank {} is out of range for world size {}",
            self.rank,
            self.world_size
        );
        anyhow::ensure!(
            self.world_size == 1
                || self.peers.len() == self.world_size
                || (self.etcd_rendezvous && self.peers.is_empty()),
            "world size {} needs {} group peer addresses (one per rank, rank order), got {}",
            self.world_size,
            self.world_size,
            self.peers.len()
        );
        Ok(())
    }

    pub fn is_follower(&self) -> bool {
        self.world_size > 1 && self.rank > 0
    }
}

/// A joined group: the model shard, the communicator, and (with etcd rendezvous) this rank's
/// rendezvous key, kept for the group's life.
pub(crate) struct Joined {
    pub model: Model,
    pub comm: Arc<dyn Communicator>,
    pub rendezvous: Option<tandem_discovery::Rendezvous>,
}

/// Whether the group's activations go over NCCL (GPU ranks, a binary with NCCL) or TCP.
fn uses_nccl(cfg: &WorkerConfig) -> anyhow::Result<bool> {
    use crate::CollectiveBackend::*;
    match (cfg.collective, cfg.device.is_cuda()) {
        (Tcp, _) | (Auto, false) => Ok(false),
        (Nccl, false) => anyhow::bail!("--collective nccl needs the ranks on GPUs (--device cuda)"),
        (_, true) if cfg!(feature = "nccl") => Ok(true),
        (Nccl, true) => anyhow::bail!(
            "--collective nccl: this binary was built without NCCL (scripts/build-cuda builds              one with it)"
        ),
        (Auto, true) => {
            tracing::warn!(
                "this binary has no NCCL: the group's activations go over TCP through the host"
            );
            Ok(false)
        }
    }
}

/// NCCL's own unique id, created by rank 0 (needs libnccl: the GPU binary only).
fn new_nccl_id() -> anyhow::Result<Vec<u8>> {
    #[cfg(feature = "nccl")]
    {
        Ok(tandem_collective::new_unique_id()?)
    }
    #[cfg(not(feature = "nccl"))]
    {
        anyhow::bail!("this binary was built without NCCL")
    }
}

/// A collective on a GPU must not be declared dead while the slowest rank still compiles the
/// model's kernels (the first forward JIT-compiles candle's PTX: seconds).
#[cfg(feature = "nccl")]
const NCCL_MIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The GPU group's communicator: NCCL for device tensors, `control` (TCP) for the rest.
#[cfg(feature = "nccl")]
fn nccl_group(
    control: Arc<dyn Communicator>,
    g: &GroupConfig,
    id: &[u8],
    device: tandem_model::DeviceKind,
) -> anyhow::Result<Arc<dyn Communicator>> {
    let dev = device.open()?;
    tracing::info!(rank = g.rank, %device, nccl = ?tandem_collective::nccl_version().ok(),
        "joining the group's NCCL communicator");
    let nccl = tandem_collective::NcclCommunicator::new(
        g.rank,
        g.world_size,
        id,
        &dev,
        g.io_timeout.max(NCCL_MIN_TIMEOUT),
    )
    .with_context(|| format!("joining NCCL as rank {} on {device}", g.rank))?;
    Ok(Arc::new(tandem_collective::DeviceGroupCommunicator::new(
        control, nccl,
    )))
}

#[cfg(not(feature = "nccl"))]
fn nccl_group(
    _control: Arc<dyn Communicator>,
    _g: &GroupConfig,
    _id: &[u8],
    _device: tandem_model::DeviceKind,
) -> anyhow::Result<Arc<dyn Communicator>> {
    anyhow::bail!("this binary was built without NCCL")
}

/// This rank's collective listener and every rank's address: from `peers`, or through etcd
/// (where rank 0 also publishes `nccl_id`). Runs on a blocking thread of the runtime (etcd calls
/// go through its handle).
fn meet(
    cfg: &WorkerConfig,
    g: &GroupConfig,
    nccl_id: Option<&[u8]>,
) -> anyhow::Result<(
    std::net::TcpListener,
    Vec<SocketAddr>,
    Option<tandem_discovery::Rendezvous>,
)> {
    if !g.etcd_rendezvous {
        let listener = std::net::TcpListener::bind(g.peers[g.rank])
            .with_context(|| format!("binding the collective address {}", g.peers[g.rank]))?;
        return Ok((listener, g.peers.clone(), None));
    }
    let d = cfg
        .discovery
        .as_ref()
        .context("rendezvous through etcd needs --etcd-endpoints (or pass --group-peers)")?;
    let group = d.group.clone().context(
        "ranks that meet through etcd need the same --group NAME on every rank of the group",
    )?;
    let listener = std::net::TcpListener::bind((cfg.listen.ip(), 0))
        .with_context(|| format!("binding a collective port on {}", cfg.listen.ip()))?;
    let port = listener.local_addr()?.port();
    let advertise = crate::advertise_address(d, cfg.listen);
    let host = advertise
        .rsplit_once(':')
        .map_or(advertise.as_str(), |(h, _)| h);
    let me = tandem_discovery::RendezvousRecord {
        version: tandem_discovery::RECORD_VERSION,
        rank: g.rank as u32,
        world_size: g.world_size as u32,
        address: format!("{host}:{port}"),
        nccl_unique_id: nccl_id.map(tandem_collective::encode_unique_id),
    };
    tracing::info!(group = %group, rank = g.rank, address = %me.address,
        "meeting the other ranks through etcd");
    let keys = tandem_discovery::Keys::new(&d.cluster)?;
    let rv = tokio::runtime::Handle::current().block_on(async {
        let registry =
            tandem_discovery::Registry::etcd_tls(&d.etcd_endpoints, d.etcd_tls.as_ref()).await?;
        tandem_discovery::rendezvous(&registry, &keys, &group, me, g.connect_timeout).await
    })?;
    let peers = rv
        .addresses()
        .iter()
        .map(|a| {
            use std::net::ToSocketAddrs as _;
            a.to_socket_addrs()
                .with_context(|| format!("resolving rank address {a} from etcd"))?
                .next()
                .with_context(|| format!("rank address {a} resolves to no address"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((listener, peers, Some(rv)))
}

/// Connects to the group, loads this rank's shard, and waits for every rank to have loaded.
pub(crate) fn join_group(cfg: &WorkerConfig, g: &GroupConfig) -> anyhow::Result<Joined> {
    g.validate()?;
    let nccl = uses_nccl(cfg)?;
    // Through etcd, rank 0's record carries the id; with static peers it goes over TCP below.
    let published_id = match nccl && g.rank == 0 && g.etcd_rendezvous {
        true => Some(new_nccl_id().context("creating the NCCL unique id")?),
        false => None,
    };
    let (listener, peers, rendezvous) = meet(cfg, g, published_id.as_deref())?;
    tracing::info!(
        rank = g.rank,
        world_size = g.world_size,
        listen = %peers[g.rank],
        "joining the tensor-parallel group"
    );
    let opts = TcpOptions {
        connect_timeout: g.connect_timeout,
        io_timeout: Some(LOAD_BARRIER_TIMEOUT),
        ..TcpOptions::default()
    };
    let tcp = Arc::new(
        TcpCommunicator::with_listener(g.rank, g.world_size, listener, &peers, &opts)
            .context("connecting to the tensor-parallel group")?,
    );
    let device = cfg.device.for_rank(g.rank)?;
    let comm: Arc<dyn Communicator> = if nccl {
        let id = match (&rendezvous, published_id) {
            (_, Some(id)) => id,
            (Some(rv), None) => tandem_collective::decode_unique_id(
                rv.nccl_unique_id()
                    .context("rank 0's rendezvous record has no NCCL unique id")?,
            )?,
            (None, None) => tandem_collective::share_unique_id(tcp.as_ref(), || {
                new_nccl_id()
                    .map_err(|e| tandem_collective::CollectiveError::Nccl(format!("{e:#}")))
            })
            .context("sharing the NCCL unique id over the group's TCP channel")?,
        };
        nccl_group(tcp.clone(), g, &id, device)?
    } else {
        tcp.clone()
    };
    let load = LoadOptions {
        quant: cfg.quant,
        max_context: cfg.max_context,
        shard: Some(Shard::new(comm.clone())),
        device,
        ..Default::default()
    };
    let model = Model::load(&cfg.model, &load).with_context(|| {
        format!(
            "loading rank {} of {} of the model {}",
            g.rank,
            g.world_size,
            cfg.model.display()
        )
    })?;
    tracing::info!(rank = g.rank, "shard loaded; waiting for the other ranks");
    comm.barrier()
        .context("waiting for every rank of the group to load its shard")?;
    tcp.set_io_timeout(Some(g.io_timeout))
        .context("setting the group's I/O timeout")?;
    Ok(Joined {
        model,
        comm,
        rendezvous,
    })
}

/// A follower rank: health only, the follower loop on a blocking thread.
pub(crate) async fn spawn_follower(
    cfg: WorkerConfig,
    listener: TcpListener,
) -> anyhow::Result<WorkerHandle> {
    let Some(g) = cfg.group.clone() else {
        anyhow::bail!("not a group follower");
    };
    let addr = listener.local_addr()?;
    // On shutdown the leader drains for up to its grace, then ends the group.
    let grace = cfg.drain_grace + Duration::from_secs(10);
    let registry = MetricsRegistry::new();
    let metrics_server = match cfg.metrics_listen {
        Some(a) => Some(spawn_metrics_server(a, registry.clone()).await?),
        None => None,
    };
    let metrics_addr = metrics_server.as_ref().map(|(a, _)| *a);

    let (health, health_svc) = health_service(&[]).await;
    registry.set_health(&health);
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let tls = tandem_runtime::tls::ServerTls::load_if(cfg.tls.as_ref())
        .context("the worker's TLS certificate")?;
    let server = tokio::spawn(tandem_runtime::tls::serve(
        Server::builder().add_service(health_svc),
        listener,
        tls,
        async {
            let _ = server_stop_rx.await;
        },
    ));
    tracing::info!(%addr, rank = g.rank, world_size = g.world_size, model = %cfg.model.display(),
        "follower listening (health only); loading its shard");

    let (loaded_tx, loaded_rx) = oneshot::channel::<Result<(), String>>();
    let run = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let Joined {
            model,
            comm,
            rendezvous: _rendezvous,
        } = match join_group(&cfg, &g) {
            Ok(x) => x,
            Err(e) => {
                let e = format!("{e:#}");
                let _ = loaded_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let _ = loaded_tx.send(Ok(()));
        Follower::new(model.transformer, comm)
            .run()
            .map_err(|e: FollowerError| e.to_string())
    });

    let (state_tx, state_rx) = watch::channel(LoadState::Loading);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(supervise_follower(FollowerSupervisor {
        health,
        grace,
        stop: stop_rx,
        loaded: loaded_rx,
        run,
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

struct FollowerSupervisor {
    health: HealthReporter,
    grace: Duration,
    stop: watch::Receiver<bool>,
    loaded: oneshot::Receiver<Result<(), String>>,
    run: JoinHandle<Result<(), String>>,
    state: watch::Sender<LoadState>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    server_stop: oneshot::Sender<()>,
    metrics_task: Option<JoinHandle<()>>,
}

/// NOT_SERVING → SERVING (shard loaded, group assembled) → NOT_SERVING (the follower loop ended,
/// or shutdown). A follower cannot leave a running group cleanly: on shutdown it waits for the
/// leader to end the group (the leader gets the same signal in a pod or under `tandem up`), and a
/// group that breaks after shutdown began is not an error.
async fn supervise_follower(mut s: FollowerSupervisor) -> anyhow::Result<()> {
    let mut stop = s.stop.clone();
    let loaded = tokio::select! {
        _ = stop.wait_for(|v| *v) => None,
        r = &mut s.loaded => Some(r.unwrap_or_else(|_| Err("the shard loader failed".into()))),
    };
    let result = match loaded {
        None => Ok(()),
        Some(Err(e)) => {
            tracing::error!(error = %e, "joining the group failed; exiting");
            s.state.send_replace(LoadState::Failed(e.clone()));
            Err(anyhow::anyhow!(e))
        }
        Some(Ok(())) => {
            set_health(&s.health, &[], ServingStatus::Serving).await;
            s.state.send_replace(LoadState::Ready);
            tracing::info!("follower serving");
            let mut stopping = false;
            let ended = tokio::select! {
                _ = stop.wait_for(|v| *v) => None,
                r = &mut s.run => Some(r),
            };
            let ended = match ended {
                Some(r) => r,
                None => {
                    stopping = true;
                    set_health(&s.health, &[], ServingStatus::NotServing).await;
                    tracing::info!("shutting down: waiting for the leader to end the group");
                    // The leader drains first; then the group ends (a shutdown plan or EOF).
                    let wait = s.grace;
                    match tokio::time::timeout(wait, &mut s.run).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::warn!("the group did not end within {wait:?}; exiting anyway");
                            Ok(Ok(()))
                        }
                    }
                }
            };
            match ended {
                Ok(Ok(())) => {
                    tracing::info!("the leader ended the group");
                    Ok(())
                }
                Ok(Err(e)) if stopping => {
                    tracing::info!(error = %e, "the group ended during shutdown");
                    Ok(())
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the tensor-parallel group failed; exiting");
                    Err(anyhow::anyhow!("the tensor-parallel group failed: {e}"))
                }
                Err(e) => Err(anyhow::anyhow!("the follower loop panicked: {e}")),
            }
        }
    };
    set_health(&s.health, &[], ServingStatus::NotServing).await;
    let _ = s.server_stop.send(());
    if tokio::time::timeout(Duration::from_secs(5), &mut s.server)
        .await
        .is_err()
    {
        s.server.abort();
    }
    if let Some(t) = s.metrics_task.take() {
        t.abort();
    }
    result
}
