//! The `tandem.shard.v1.Shard` service over the engine.
//!
//! Handlers never block: the engine runs on its own thread, and `Generate` only awaits the
//! request's event channel. Each response stream owns its `Generation`, so every way a stream can
//! end early (client gone, deadline, Abort, drain expiry) drops it, and the engine cancels the
//! sequence and frees its KV at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::Stream;
use tandem_engine::{Event, Generation};
use tandem_proto::shard::v1::shard_server::Shard;
use tandem_proto::shard::v1::{
    AbortRequest, AbortResponse, GenerateRequest, GenerateResponse, InfoRequest, InfoResponse,
    LoadRequest, LoadResponse, Token, TokenizerRequest, TokenizerResponse,
};
use tandem_proto::v1 as pb;
use tandem_runtime::{Drain, InFlight};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::Notify;
use tonic::{Code, Request, Response, Status};

use crate::metrics::WorkerMetrics;
use crate::request::{finish_reason, grpc_timeout, to_engine_request, GenerateError};
use crate::Loaded;

/// State shared by the handlers and the streams.
pub(crate) struct Shared {
    pub loaded: Arc<OnceLock<Loaded>>,
    pub drain: Drain,
    pub metrics: WorkerMetrics,
    pub max_new_tokens_limit: usize,
    /// request_id → how to abort it. Entries leave when their stream ends.
    aborts: Mutex<HashMap<String, AbortEntry>>,
    next_key: AtomicU64,
}

struct AbortEntry {
    /// Tells a re-used request_id's entries apart, so a finished stream never removes the entry
    /// of a newer one with the same id.
    key: u64,
    notify: Arc<Notify>,
}

impl Shared {
    pub fn new(
        loaded: Arc<OnceLock<Loaded>>,
        drain: Drain,
        metrics: WorkerMetrics,
        max_new_tokens_limit: usize,
    ) -> Self {
        Self {
            loaded,
            drain,
            metrics,
            max_new_tokens_limit,
            aborts: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(0),
        }
    }

    fn aborts(&self) -> std::sync::MutexGuard<'_, HashMap<String, AbortEntry>> {
        // The map stays consistent even if a holder panicked: every update is one insert/remove.
        self.aborts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loaded(&self) -> Result<&Loaded, Status> {
        self.loaded
            .get()
            .ok_or_else(|| GenerateError::Loading.into())
    }
}

/// Removes its request_id's abort entry when the stream ends.
struct AbortRegistration {
    shared: Arc<Shared>,
    request_id: String,
    key: u64,
}

impl Drop for AbortRegistration {
    fn drop(&mut self) {
        let mut map = self.shared.aborts();
        if map.get(&self.request_id).is_some_and(|e| e.key == self.key) {
            map.remove(&self.request_id);
        }
    }
}

#[derive(Clone)]
pub(crate) struct ShardService {
    shared: Arc<Shared>,
}

impl ShardService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn start(
        &self,
        req: GenerateRequest,
        received: Instant,
        deadline: Option<Instant>,
    ) -> Result<GenStream, GenerateError> {
        let in_flight = self
            .shared
            .drain
            .enter()
            .map_err(|_| GenerateError::Draining)?;
        let loaded = self.shared.loaded.get().ok_or(GenerateError::Loading)?;
        let request_id = req.request_id.clone();
        let engine_req = to_engine_request(
            req,
            self.shared.max_new_tokens_limit,
            loaded.engine.max_context(),
        )?;
        let prompt_tokens = engine_req.prompt.len();
        let generation = loaded.engine.submit_with_deadline(engine_req, deadline)?;
        let (abort, registration) = if request_id.is_empty() {
            (None, None)
        } else {
            let notify = Arc::new(Notify::new());
            let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
            self.shared.aborts().insert(
                request_id.clone(),
                AbortEntry {
                    key,
                    notify: notify.clone(),
                },
            );
            let reg = AbortRegistration {
                shared: self.shared.clone(),
                request_id: request_id.clone(),
                key,
            };
            (Some(notify), Some(reg))
        };
        tracing::debug!(%request_id, prompt_tokens, engine_id = generation.id, "generate");
        Ok(GenStream {
            generation: Some(generation),
            deadline,
            abort,
            shared: self.shared.clone(),
            received,
            last_token: None,
            completion_tokens: 0,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            pending_error: None,
            outcome: None,
            request_id,
            _registration: registration,
            _in_flight: in_flight,
        })
    }
}

pub(crate) type GenerateStream =
    Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Shard for ShardService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let received = Instant::now();
        let deadline = grpc_timeout(request.metadata()).map(|d| received + d);
        match self.start(request.into_inner(), received, deadline) {
            Ok(s) => Ok(Response::new(s.into_stream())),
            Err(e) => {
                self.shared.metrics.request_done(e.code());
                tracing::debug!(error = %e, "generate refused");
                Err(e.into())
            }
        }
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        let entry = self.shared.aborts().remove(&id);
        let found = entry.is_some();
        if let Some(e) = entry {
            // notify_one keeps a permit, so an abort that lands before the stream first waits
            // is not lost.
            e.notify.notify_one();
        }
        tracing::debug!(request_id = %id, found, "abort");
        Ok(Response::new(AbortResponse { found }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let l = self.shared.loaded()?;
        Ok(Response::new(InfoResponse {
            model: l.model_name.clone(),
            tokenizer_hash: l.vocab_hash.clone(),
            context_length: to_u32(l.engine.max_context()),
            vocab_size: to_u32(l.engine.vocab_size()),
            tp_size: to_u32(l.tp_size),
            max_new_tokens_limit: to_u32(self.shared.max_new_tokens_limit),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let l = self.shared.loaded()?;
        let s = l.engine.stats();
        let c = l.engine.config();
        Ok(Response::new(LoadResponse {
            waiting: to_u32(s.waiting.load(Relaxed)),
            running: to_u32(s.running.load(Relaxed)),
            max_waiting: to_u32(c.max_waiting),
            max_running: to_u32(c.max_running),
            kv_tokens: s.kv_tokens.load(Relaxed) as u64,
            kv_bytes: s.kv_bytes.load(Relaxed) as u64,
        }))
    }

    async fn tokenizer(
        &self,
        _: Request<TokenizerRequest>,
    ) -> Result<Response<TokenizerResponse>, Status> {
        let l = self.shared.loaded()?;
        let text = l.engine.text();
        let tokenizer_json = l
            .tokenizer_json
            .clone()
            .map_err(|e| Status::internal(format!("cannot serialize the tokenizer: {e}")))?;
        Ok(Response::new(TokenizerResponse {
            tokenizer_json,
            chat_template: text.chat_template.clone().unwrap_or_default(),
            bos_token: text.bos_token.clone().unwrap_or_default(),
            eos_token: text.eos_token.clone().unwrap_or_default(),
            eos_token_ids: text.eos_token_ids.clone(),
            tokenizer_hash: l.vocab_hash.clone(),
        }))
    }
}

fn to_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// One Generate response stream: the engine's events, batched per message.
struct GenStream {
    /// `None` once the sequence ended (or was dropped to cancel it).
    generation: Option<Generation>,
    deadline: Option<Instant>,
    abort: Option<Arc<Notify>>,
    shared: Arc<Shared>,
    received: Instant,
    last_token: Option<Instant>,
    completion_tokens: u32,
    prompt_tokens: u32,
    /// An error that arrived behind tokens: the tokens go first, the error next.
    pending_error: Option<Status>,
    /// The status code this request ended with, once it ended.
    outcome: Option<Code>,
    request_id: String,
    _registration: Option<AbortRegistration>,
    _in_flight: InFlight,
}

/// What woke a waiting stream.
enum Wake {
    Event(Option<Event>),
    Abort,
    Deadline,
    DrainExpired,
}

impl GenStream {
    fn into_stream(self) -> GenerateStream {
        Box::pin(futures::stream::unfold(self, |mut s| async move {
            let item = s.next_message().await?;
            Some((item, s))
        }))
    }

    async fn wait(&mut self) -> Option<Wake> {
        let generation = self.generation.as_mut()?;
        let deadline = self.deadline;
        let deadline = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let abort = async {
            match &self.abort {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        Some(tokio::select! {
            biased;
            () = abort => Wake::Abort,
            () = deadline => Wake::Deadline,
            () = self.shared.drain.expired() => Wake::DrainExpired,
            ev = generation.events.recv() => Wake::Event(ev),
        })
    }

    async fn next_message(&mut self) -> Option<Result<GenerateResponse, Status>> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(self.fail(e)));
        }
        let first = match self.wait().await? {
            Wake::Event(ev) => ev,
            Wake::Abort => return Some(Ok(self.cancelled())),
            Wake::Deadline => {
                let e = Status::deadline_exceeded(format!(
                    "the client's deadline passed after {} generated tokens; the sequence was aborted",
                    self.completion_tokens
                ));
                return Some(Err(self.fail(e)));
            }
            Wake::DrainExpired => {
                let e = Status::unavailable(
                    "the worker shut down before this request finished (drain grace period over)",
                );
                return Some(Err(self.fail(e)));
            }
        };
        // Batch every event already waiting into this one message.
        let mut msg = GenerateResponse::default();
        let mut next = first;
        loop {
            match next {
                Some(Event::Token(t)) => msg.tokens.push(Token {
                    id: t.token,
                    text: t.text,
                    logprob: t.logprob,
                    top: t
                        .top_logprobs
                        .into_iter()
                        .map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob })
                        .collect(),
                }),
                Some(Event::Finished { reason, usage, .. }) => {
                    self.record_tokens(msg.tokens.len());
                    msg.finish_reason = finish_reason(reason) as i32;
                    msg.usage = Some(pb::Usage {
                        prompt_tokens: to_u32(usage.prompt_tokens),
                        completion_tokens: to_u32(usage.completion_tokens),
                        accepted_draft_tokens: to_u32(usage.accepted_draft_tokens),
                    });
                    self.generation = None;
                    self.shared
                        .metrics
                        .completed(self.received.elapsed(), self.completion_tokens);
                    self.set_outcome(Code::Ok);
                    return Some(Ok(msg));
                }
                Some(Event::Error(e)) => {
                    let status = Status::from(GenerateError::Engine(e));
                    return Some(self.tokens_then_error(msg, status));
                }
                None => {
                    let status =
                        Status::unavailable("the engine stopped before the sequence finished");
                    return Some(self.tokens_then_error(msg, status));
                }
            }
            let Some(g) = self.generation.as_mut() else {
                break;
            };
            next = match g.events.try_recv() {
                Ok(ev) => Some(ev),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => None,
            };
        }
        self.record_tokens(msg.tokens.len());
        Some(Ok(msg))
    }

    fn tokens_then_error(
        &mut self,
        msg: GenerateResponse,
        status: Status,
    ) -> Result<GenerateResponse, Status> {
        // The engine already ended the sequence: nothing to cancel.
        self.generation = None;
        if msg.tokens.is_empty() {
            return Err(self.fail(status));
        }
        self.record_tokens(msg.tokens.len());
        self.pending_error = Some(status);
        Ok(msg)
    }

    /// Latency metrics for `n` tokens that arrived now. Tokens batched into one message arrived
    /// together, so the gap since the previous message is spread evenly over them.
    fn record_tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let m = &self.shared.metrics;
        match self.last_token {
            None => m.first_token(now - self.received),
            Some(prev) => {
                let gap = (now - prev) / to_u32(n);
                for _ in 0..n {
                    m.inter_token(gap);
                }
            }
        }
        self.last_token = Some(now);
        self.completion_tokens = self.completion_tokens.saturating_add(to_u32(n));
    }

    /// Drops a sequence that has not finished; the engine cancels it and frees its KV.
    fn cancel(&mut self) {
        if self.generation.take().is_some() {
            self.shared.metrics.cancelled();
        }
    }

    /// Aborted by request id: end the stream normally, with finish_reason CANCELLED.
    fn cancelled(&mut self) -> GenerateResponse {
        self.cancel();
        self.set_outcome(Code::Cancelled);
        tracing::debug!(request_id = %self.request_id, "aborted by request");
        GenerateResponse {
            tokens: Vec::new(),
            finish_reason: pb::FinishReason::Cancelled as i32,
            usage: Some(pb::Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                accepted_draft_tokens: 0,
            }),
        }
    }

    /// Ends the stream with `status`, dropping the sequence (which frees its KV).
    fn fail(&mut self, status: Status) -> Status {
        self.cancel();
        self.set_outcome(status.code());
        tracing::debug!(request_id = %self.request_id, code = ?status.code(), message = status.message(), "generate failed");
        status
    }

    fn set_outcome(&mut self, code: Code) {
        if self.outcome.is_none() {
            self.outcome = Some(code);
            self.shared.metrics.request_done(code);
        }
    }
}

impl Drop for GenStream {
    fn drop(&mut self) {
        // Dropped before it ended: the client went away (cancelled the call or reset the stream).
        // Dropping `generation` with it cancels the sequence in the engine.
        if self.outcome.is_none() {
            let code = tandem_runtime::dropped_stream_code(self.deadline);
            tracing::debug!(request_id = %self.request_id, ?code, "client went away; cancelling");
            self.cancel();
            self.set_outcome(code);
        }
    }
}
