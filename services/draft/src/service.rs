//! `tandem.draft.v1.Drafter` over a [`DraftCore`] that runs on its own thread: forwards are
//! CPU-heavy and must not block the async runtime. Handlers queue commands on a bounded channel
//! and await a oneshot answer; the thread takes every Propose call waiting at that moment and
//! runs them as one batch (consecutive calls on disjoint sequences share their forwards).

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tandem_proto::draft::v1::drafter_server::Drafter;
use tandem_proto::draft::v1::{
    InfoRequest, InfoResponse, ProposeRequest, ProposeResponse, ReleaseRequest, ReleaseResponse,
};
use tandem_runtime::Drain;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::core::DraftCore;
use crate::error::DraftError;
use crate::metrics::DraftMetrics;

/// How often the core thread evicts idle sequences when no call arrives.
const IDLE_SWEEP: Duration = Duration::from_secs(1);
/// Most Propose calls run as one batch.
const MAX_MERGED_CALLS: usize = 64;

pub(crate) enum Command {
    Propose {
        req: ProposeRequest,
        reply: oneshot::Sender<Result<ProposeResponse, DraftError>>,
    },
    Release {
        ids: Vec<u64>,
        reply: oneshot::Sender<usize>,
    },
    Stop,
}

/// The queue into the core thread.
#[derive(Debug, Clone)]
pub(crate) struct CoreHandle {
    tx: SyncSender<Command>,
    capacity: usize,
}

impl CoreHandle {
    /// Starts the core thread with room for `capacity` queued commands.
    pub fn start(core: DraftCore, capacity: usize, metrics: DraftMetrics) -> std::io::Result<Self> {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::sync_channel(capacity);
        std::thread::Builder::new()
            .name("tandem-draft-core".into())
            .spawn(move || core_loop(core, rx, metrics))?;
        Ok(Self { tx, capacity })
    }

    fn send(&self, cmd: Command) -> Result<(), DraftError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => DraftError::QueueFull(self.capacity),
            TrySendError::Disconnected(_) => DraftError::Stopped,
        })
    }

    pub async fn propose(&self, req: ProposeRequest) -> Result<ProposeResponse, DraftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Propose { req, reply })?;
        rx.await.map_err(|_| DraftError::Stopped)?
    }

    pub async fn release(&self, ids: Vec<u64>) -> Result<usize, DraftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Release { ids, reply })?;
        rx.await.map_err(|_| DraftError::Stopped)
    }

    /// Ends the core thread (after what is queued), freeing the model.
    pub fn stop(&self) {
        // A full queue or a thread already gone: it ends when the handle's senders drop anyway.
        let _ = self.tx.try_send(Command::Stop);
    }
}

fn core_loop(mut core: DraftCore, rx: mpsc::Receiver<Command>, metrics: DraftMetrics) {
    let mut pending: Option<Command> = None;
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => match rx.recv_timeout(IDLE_SWEEP) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => {
                    let n = core.evict_idle(Instant::now());
                    if n > 0 {
                        metrics.evicted(n);
                        metrics.held(core.sequences(), core.kv_tokens());
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        match cmd {
            Command::Stop => break,
            Command::Release { ids, reply } => {
                let n = core.release(&ids);
                metrics.released(n);
                metrics.held(core.sequences(), core.kv_tokens());
                let _ = reply.send(n);
            }
            Command::Propose { req, reply } => {
                // Every Propose already waiting joins this batch; anything else waits its turn.
                let mut batch = vec![(req, reply)];
                while batch.len() < MAX_MERGED_CALLS {
                    match rx.try_recv() {
                        Ok(Command::Propose { req, reply }) => batch.push((req, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Callers that gave up (deadline, disconnect) while queued are skipped.
                batch.retain(|(_, reply)| !reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                let reqs: Vec<&ProposeRequest> = batch.iter().map(|(r, _)| r).collect();
                let results = core.propose_many(&reqs, Instant::now());
                metrics.batch(&core.last_call(), batch.len());
                // Metrics first: a caller that scrapes after its answer sees them.
                metrics.held(core.sequences(), core.kv_tokens());
                for ((_, reply), r) in batch.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
        }
    }
    tracing::debug!("draft core thread stopped");
}

/// The loaded model, shared by the handlers.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub core: CoreHandle,
    pub info: InfoResponse,
}

pub(crate) struct Shared {
    pub loaded: Arc<OnceLock<Loaded>>,
    pub drain: Drain,
    pub metrics: DraftMetrics,
}

#[derive(Clone)]
pub(crate) struct DraftService {
    shared: Arc<Shared>,
}

impl DraftService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn loaded(&self) -> Result<&Loaded, DraftError> {
        self.shared.loaded.get().ok_or(DraftError::Loading)
    }
}

#[tonic::async_trait]
impl Drafter for DraftService {
    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let received = Instant::now();
        let result = async {
            let _in_flight = self.shared.drain.enter()?;
            let loaded = self.loaded()?;
            Ok::<_, Status>(loaded.core.propose(request.into_inner()).await?)
        }
        .await;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.shared.metrics.propose_done(code, received.elapsed());
        if let Err(s) = &result {
            tracing::debug!(code = ?s.code(), message = s.message(), "propose refused");
        }
        result.map(Response::new)
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let _in_flight = self.shared.drain.enter()?;
        let loaded = self.loaded()?;
        let ids = request.into_inner().sequence_ids;
        let n = loaded.core.release(ids).await?;
        tracing::debug!(released = n, "release");
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.loaded()?.info.clone()))
    }
}
