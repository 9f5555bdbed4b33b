//! `tandem.v1.Generation`: validate, pick a worker, forward to its `Shard.Generate`, stream the
//! chunks back. One request's life:
//!
//! 1. the handler resolves the model from the current snapshot and parses the request
//!    ([`crate::validate`]), tokenizing on a blocking thread;
//! 2. it opens the upstream stream on the least-loaded worker; refusals that another worker
//!    would not share (queue full, worker down) move on to the next worker;
//! 3. the response stream owns the upstream stream: a failure before the first token retries
//!    once on another worker; the client's deadline bounds every wait; when the client goes
//!    away, the response stream is dropped, and with it the upstream call, which makes the
//!    worker abort the sequence and free its KV.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tandem_proto::shard::v1 as shard;
use tandem_proto::v1::generation_server::Generation;
use tandem_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, ListModelsRequest,
    ListModelsResponse, ModelInfo, TokenLogprob, TokenizeRequest, TokenizeResponse, Usage,
};
use tonic::{Code, Request, Response, Status};

use tandem_runtime::{Drain, InFlight};

use crate::metrics::RouterMetrics;
use crate::pool::{Lease, ModelView, Pool, Snapshot};
use crate::routing::RouteKey;
use crate::validate::{self, effective_limit, RequestError, ValidRequest};

/// Response metadata of `GenerateStream`: the shard endpoint of the group leader that took the
/// request.
pub const GROUP_HEADER: &str = "tandem-group-leader";

/// Answer this long before the client's deadline, so the client receives DEADLINE_EXCEEDED
/// from us rather than giving up on its own (tonic clients then report CANCELLED).
const DEADLINE_MARGIN: Duration = Duration::from_millis(10);
/// Worker failures before the first token: up to this many retries, each on another worker and
/// each paid from the pool's retry budget.
const RETRIES: u32 = 2;

pub type ChunkStream =
    Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

/// Settings the handlers need, taken from `RouterConfig`.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub model_name: Option<String>,
    pub max_new_tokens_limit: usize,
    pub request_timeout: Option<Duration>,
    /// Largest request accepted; bigger ones get INVALID_ARGUMENT naming the limit.
    pub max_message_bytes: usize,
    /// API keys (`--api-keys`); `None`: anyone may call.
    pub api_keys: Option<Arc<crate::auth::ApiKeys>>,
}

pub struct GenerationService {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: ServiceConfig,
    pool: Arc<Pool>,
    metrics: RouterMetrics,
    drain: Drain,
}

impl GenerationService {
    pub fn new(cfg: ServiceConfig, pool: Arc<Pool>, metrics: RouterMetrics, drain: Drain) -> Self {
        Self {
            shared: Arc::new(Shared {
                cfg,
                pool,
                metrics,
                drain,
            }),
        }
    }
}

/// Counts one generation request in the metrics from arrival to its end. Dropped without
/// `finish` (the client went away mid-stream), it records CANCELLED.
struct Tracker {
    /// Keeps a drain waiting until this request ends.
    _in_flight: InFlight,
    metrics: RouterMetrics,
    method: &'static str,
    started: Instant,
    last_token: Option<Instant>,
    code: Option<Code>,
    /// The request's deadline: a stream the client drops once it has passed ended by the
    /// deadline, not by a cancel (clients reset the stream when their timer fires).
    deadline: Option<Instant>,
    /// The API key's name, when keys are on.
    key: Option<String>,
}

impl Tracker {
    /// Admits a request (refused with UNAVAILABLE while draining) and starts counting it.
    fn new(shared: &Shared, method: &'static str, started: Instant) -> Result<Self, Status> {
        let metrics = &shared.metrics;
        let in_flight = shared.drain.enter().inspect_err(|_| {
            metrics.request_done(method, Code::Unavailable);
        })?;
        metrics.in_flight.inc();
        Ok(Self {
            _in_flight: in_flight,
            metrics: metrics.clone(),
            method,
            started,
            last_token: None,
            code: None,
            deadline: None,
            key: None,
        })
    }

    fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last_token {
            None => self
                .metrics
                .time_to_first_token
                .observe(now.duration_since(self.started).as_secs_f64()),
            // A chunk may carry several tokens (speculative decoding): spread the gap.
            Some(last) => {
                let per = now.duration_since(last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    self.metrics.inter_token_latency.observe(per);
                }
            }
        }
        self.last_token = Some(now);
        self.metrics.generated_tokens.inc_by(n as u64);
    }

    fn finish(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        let code = self
            .code
            .unwrap_or_else(|| tandem_runtime::dropped_stream_code(self.deadline));
        self.metrics.request_done(self.method, code);
        if let Some(key) = self.key.take() {
            self.metrics
                .key_requests
                .get_or_create(&crate::metrics::KeyLabels {
                    key,
                    code: crate::metrics::code_label(code).to_owned(),
                })
                .inc();
        }
        if code == Code::Ok {
            self.metrics
                .request_duration
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// One forwarded attempt: the worker's stream and the router's claim on that worker.
struct Attempt {
    lease: Lease,
    stream: tonic::Streaming<shard::GenerateResponse>,
}

/// A validated request with its upstream stream open.
struct Prepared {
    valid: ValidRequest,
    first: Attempt,
    deadline: Option<Instant>,
    tried: Vec<String>,
    retries: u32,
    key: RouteKey,
}

/// How a worker's refusal is handled.
enum Failure {
    /// Queue full: another worker may have room; costs no retry.
    Overloaded,
    /// The worker is down or failed: out of rotation, retry once elsewhere.
    Down,
    /// Another worker would say the same (bad argument, ...): pass it to the client.
    Fatal,
}

fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::ResourceExhausted => Failure::Overloaded,
        // Unknown: h2 resets and broken connections surface as Unknown in tonic.
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted | Code::Cancelled => {
            Failure::Down
        }
        _ => Failure::Fatal,
    }
}

/// The largest response the public API sends: room for a Tokenize answer (ids and token
/// strings) of ordinary text within the request limit.
pub(crate) fn response_limit(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(4)
}

/// The deadline of one request: the client's `grpc-timeout` (less a margin) and the router's
/// own `request_timeout`, whichever is sooner.
fn deadline<T>(req: &Request<T>, started: Instant, cfg: &ServiceConfig) -> Option<Instant> {
    let client = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| started + t.saturating_sub(DEADLINE_MARGIN));
    let own = cfg.request_timeout.map(|t| started + t);
    match (client, own) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Shared {
    /// The model a request names; empty means the default: the configured one, else the only
    /// (or first, by name) model served.
    /// The caller when API keys are on (`None` when off), its request counted against its
    /// requests-per-second budget. Errors are counted here, under `method` and the key's name.
    fn caller(
        &self,
        md: &tonic::metadata::MetadataMap,
        method: &'static str,
    ) -> Result<Option<crate::auth::Caller>, Status> {
        let Some(keys) = &self.cfg.api_keys else {
            return Ok(None);
        };
        let caller = keys.authenticate(md).inspect_err(|e| {
            self.metrics.request_done(method, e.code());
        })?;
        caller.take_request().inspect_err(|e| {
            self.metrics.request_done(method, e.code());
            self.metrics
                .key_requests
                .get_or_create(&crate::metrics::KeyLabels {
                    key: caller.name.clone(),
                    code: crate::metrics::code_label(e.code()).to_owned(),
                })
                .inc();
        })?;
        Ok(Some(caller))
    }

    fn resolve_model(&self, snap: &Snapshot, name: &str) -> Result<ModelView, RequestError> {
        crate::validate::check_model_name(name)?;
        let name = if name.is_empty() {
            match (&self.cfg.model_name, snap.models.keys().next()) {
                (Some(n), _) => n.as_str(),
                (None, Some(first)) => first.as_str(),
                (None, None) => "",
            }
        } else {
            name
        };
        if let Some(m) = snap.models.get(name) {
            return Ok(m.clone());
        }
        if snap.models.is_empty() {
            return Err(RequestError::Unavailable(
                "no worker is reachable yet, so no model is known; retry shortly".into(),
            ));
        }
        if self.cfg.model_name.as_deref() == Some(name) {
            return Err(RequestError::Unavailable(format!(
                "no worker serving the default model '{name}' is reachable"
            )));
        }
        Err(RequestError::UnknownModel {
            name: name.to_owned(),
            served: snap.models.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    fn upstream_request(valid: &ValidRequest) -> shard::GenerateRequest {
        shard::GenerateRequest {
            request_id: valid.request_id.clone(),
            prompt: valid.prompt.clone(),
            sampling: Some(valid.sampling),
            stopping: Some(valid.stopping.clone()),
            speculation: valid.speculation,
        }
    }

    /// May a request that failed before its first token try another worker? Spends one of
    /// its own retries and one from the shared budget.
    fn may_retry(&self, retries: &mut u32) -> bool {
        if *retries == 0 {
            return false;
        }
        if !self.pool.retry_budget.try_withdraw() {
            self.metrics.retries_refused.inc();
            tracing::warn!("retry budget spent: not retrying (many failures right now)");
            return false;
        }
        *retries -= 1;
        self.metrics.retries.inc();
        true
    }

    /// Opens the upstream stream on the best worker not tried yet. Queue-full refusals move on
    /// to the next worker for free; failures spend `retries` (and the retry budget).
    async fn open(
        &self,
        valid: &ValidRequest,
        key: RouteKey,
        deadline: Option<Instant>,
        started: Instant,
        tried: &mut Vec<String>,
        retries: &mut u32,
    ) -> Result<Attempt, RequestError> {
        let mut last: Option<RequestError> = None;
        let prompt_tokens = valid.prompt.len() as u64;
        let max_new = u64::from(valid.stopping.max_new_tokens.unwrap_or_default());
        loop {
            let snap = self.pool.snapshot();
            let Some(worker) = self.pool.pick(&snap, &valid.model.name, tried, key) else {
                return Err(last.unwrap_or_else(|| {
                    RequestError::Unavailable(format!(
                        "no worker serving model '{}' is available; retry shortly",
                        valid.model.name
                    ))
                }));
            };
            tried.push(worker.url.clone());
            let mut lease = Lease::new(worker.clone(), &self.metrics, prompt_tokens, max_new);
            let mut req = Request::new(Self::upstream_request(valid));
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(deadline_exceeded(started));
                }
                // The worker stops on its own at the same moment.
                req.set_timeout(left);
            }
            let mut shard = worker.shard.clone();
            let call = shard.generate(req);
            let result = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), call).await {
                    Ok(r) => r,
                    Err(_) => return Err(deadline_exceeded(started)),
                },
                None => call.await,
            };
            let status = match result {
                Ok(resp) => {
                    return Ok(Attempt {
                        lease,
                        stream: resp.into_inner(),
                    })
                }
                Err(s) => s,
            };
            tracing::debug!(
                request_id = %valid.request_id,
                worker = %worker.url,
                code = ?status.code(),
                "worker refused: {}",
                status.message()
            );
            match classify(&status) {
                Failure::Overloaded => {
                    last = Some(RequestError::QueueFull {
                        model: valid.model.name.clone(),
                        detail: status.message().to_owned(),
                    });
                }
                Failure::Down => {
                    if matches!(status.code(), Code::Unavailable | Code::Unknown) {
                        self.pool.mark_failed(&worker);
                    }
                    lease.failed();
                    tracing::warn!(
                        request_id = %valid.request_id,
                        worker = %worker.url,
                        "worker failed before the first token: {}: {}",
                        status.code(),
                        status.message()
                    );
                    let err = RequestError::Unavailable(format!(
                        "worker {} failed: {}",
                        worker.url,
                        status.message()
                    ));
                    if !self.may_retry(retries) {
                        return Err(err);
                    }
                    last = Some(err);
                }
                Failure::Fatal => {
                    if past(deadline) {
                        return Err(deadline_exceeded(started));
                    }
                    return Err(RequestError::Worker(status));
                }
            }
        }
    }

    /// Validation and the first upstream call; errors here are the call's status.
    async fn start(
        &self,
        req: GenerateRequest,
        deadline: Option<Instant>,
        started: Instant,
        caller: Option<&crate::auth::Caller>,
    ) -> Result<Prepared, RequestError> {
        let snap = self.pool.snapshot();
        let model = self.resolve_model(&snap, &req.model)?;
        if let Some(c) = caller {
            c.allow_model(&model.name).map_err(RequestError::Auth)?;
        }
        let parse = validate::parse_generate(req, model, self.cfg.max_new_tokens_limit);
        let valid = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), parse)
                .await
                .map_err(|_| deadline_exceeded(started))??,
            None => parse.await?,
        };
        if let Some(c) = caller {
            let asked = valid.prompt.len() + valid.stopping.max_new_tokens.unwrap_or(0) as usize;
            c.take_tokens(asked).map_err(RequestError::Auth)?;
        }
        self.metrics.prompt_tokens.inc_by(valid.prompt.len() as u64);
        self.pool.retry_budget.deposit();
        let key = RouteKey::new(&valid.session_id, &valid.prompt);
        let mut tried = Vec::new();
        let mut retries = RETRIES;
        let first = self
            .open(&valid, key, deadline, started, &mut tried, &mut retries)
            .await?;
        tracing::debug!(
            request_id = %valid.request_id,
            worker = %first.lease.worker.url,
            prompt_tokens = valid.prompt.len(),
            "forwarded"
        );
        Ok(Prepared {
            valid,
            first,
            deadline,
            tried,
            retries,
            key,
        })
    }

    /// Runs one generation request up to its response stream; the tracker travels with it.
    async fn generate(
        self: &Arc<Self>,
        req: GenerateRequest,
        deadline: Option<Instant>,
        mut tracker: Tracker,
        caller: Option<crate::auth::Caller>,
    ) -> Result<(String, String, ChunkStream), Status> {
        let size = prost::Message::encoded_len(&req);
        if size > self.cfg.max_message_bytes {
            let e = RequestError::invalid(
                "request",
                format!(
                    "message is {size} bytes; the limit is {} bytes (max_message_bytes): send a \
                     shorter input or raise the router's --max-message-bytes",
                    self.cfg.max_message_bytes
                ),
            );
            tracker.finish(e.code());
            return Err(e.into());
        }
        match self
            .start(req, deadline, tracker.started, caller.as_ref())
            .await
        {
            Ok(p) => Ok((
                p.valid.model.name.clone(),
                p.first.lease.worker.url.clone(),
                self.clone().forward(p, tracker),
            )),
            Err(e) => {
                tracker.finish(e.code());
                Err(e.into())
            }
        }
    }

    /// The response stream. It owns the upstream stream, so dropping it (the client went away)
    /// drops the upstream call and the worker aborts the sequence.
    fn forward(self: Arc<Self>, p: Prepared, mut tracker: Tracker) -> ChunkStream {
        let Prepared {
            valid,
            first,
            deadline,
            mut tried,
            mut retries,
            key,
        } = p;
        Box::pin(async_stream::stream! {
            let started = tracker.started;
            let mut attempt = first;
            let mut received = false;
            let mut completion_tokens = 0usize;
            let drain = self.drain.clone();
            loop {
                let message = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d.into(), attempt.stream.message())
                            .await
                            .unwrap_or_else(|_| Err(Status::from(deadline_exceeded(started)))),
                        None => attempt.stream.message().await,
                    }
                };
                let next = tokio::select! {
                    m = message => m,
                    // The drain's grace period is over: end the stream (the worker aborts).
                    _ = drain.expired() => {
                        tracker.finish(Code::Unavailable);
                        yield Err(Status::unavailable(
                            "the router is shutting down: retry on another router",
                        ));
                        return;
                    }
                };
                let err = match next {
                    Ok(Some(msg)) => {
                        let n = msg.tokens.len();
                        attempt.lease.progress(n as u64);
                        if n > 0 || msg.finish_reason != 0 {
                            attempt.lease.succeeded();
                        }
                        received = true;
                        completion_tokens += n;
                        tracker.tokens(n);
                        let done = msg.finish_reason != 0;
                        let chunk = to_chunk(&valid, msg, completion_tokens);
                        if done {
                            tracker.finish(Code::Ok);
                        }
                        if !chunk.token_ids.is_empty() || !chunk.text.is_empty() || done {
                            yield Ok(chunk);
                        }
                        if done {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => Status::unavailable(format!(
                        "worker {} closed the stream before finishing",
                        attempt.lease.worker.url
                    )),
                    Err(s) => s,
                };
                let status = if err.code() == Code::DeadlineExceeded || past(deadline) {
                    Status::from(deadline_exceeded(started))
                } else {
                    err
                };
                let down = status.code() != Code::DeadlineExceeded
                    && matches!(classify(&status), Failure::Down);
                if down {
                    attempt.lease.failed();
                }
                let retry = !received
                    && status.code() != Code::DeadlineExceeded
                    && match classify(&status) {
                        Failure::Overloaded => true,
                        Failure::Down => self.may_retry(&mut retries),
                        Failure::Fatal => false,
                    };
                if retry {
                    if down && matches!(status.code(), Code::Unavailable | Code::Unknown) {
                        self.pool.mark_failed(&attempt.lease.worker);
                    }
                    tracing::warn!(
                        request_id = %valid.request_id,
                        worker = %attempt.lease.worker.url,
                        "worker failed before the first token, retrying elsewhere: {}: {}",
                        status.code(),
                        status.message()
                    );
                    match self.open(&valid, key, deadline, started, &mut tried, &mut retries).await {
                        Ok(a) => {
                            attempt = a;
                            continue;
                        }
                        Err(e) => {
                            tracker.finish(e.code());
                            yield Err(Status::from(e));
                            return;
                        }
                    }
                }
                if matches!(status.code(), Code::Unavailable | Code::Unknown) {
                    self.pool.mark_failed(&attempt.lease.worker);
                }
                let status = match status.code() {
                    Code::DeadlineExceeded => status,
                    // A worker that dies mid-stream: the client sees UNAVAILABLE and may retry.
                    Code::Unknown | Code::Internal | Code::Cancelled => Status::unavailable(format!(
                        "worker {} failed mid-generation: {}",
                        attempt.lease.worker.url,
                        status.message()
                    )),
                    _ => status,
                };
                tracker.finish(status.code());
                yield Err(status);
                return;
            }
        })
    }
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

fn deadline_exceeded(started: Instant) -> RequestError {
    RequestError::DeadlineExceeded {
        elapsed_ms: started.elapsed().as_millis(),
    }
}

fn to_chunk(
    valid: &ValidRequest,
    msg: shard::GenerateResponse,
    completion_tokens: usize,
) -> GenerateStreamResponse {
    let mut chunk = GenerateStreamResponse {
        request_id: valid.request_id.clone(),
        token_ids: Vec::with_capacity(msg.tokens.len()),
        text: String::new(),
        logprobs: Vec::new(),
        finish_reason: msg.finish_reason,
        usage: None,
    };
    for t in msg.tokens {
        chunk.token_ids.push(t.id);
        chunk.text.push_str(&t.text);
        if valid.logprobs {
            chunk.logprobs.push(TokenLogprob {
                token_id: t.id,
                logprob: t.logprob,
                top: t.top,
            });
        }
    }
    if msg.finish_reason != 0 {
        // The worker's usage when it sends one; our own count otherwise.
        chunk.usage = Some(msg.usage.unwrap_or(Usage {
            prompt_tokens: valid.prompt.len() as u32,
            completion_tokens: completion_tokens as u32,
            accepted_draft_tokens: 0,
        }));
    }
    chunk
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let started = Instant::now();
        let caller = self.shared.caller(request.metadata(), "Generate")?;
        let deadline = deadline(&request, started, &self.shared.cfg);
        let mut tracker = Tracker::new(&self.shared, "Generate", started)?;
        tracker.deadline = deadline;
        tracker.key = caller.as_ref().map(|c| c.name.clone());
        let (model, _, mut stream) = self
            .shared
            .generate(request.into_inner(), deadline, tracker, caller)
            .await?;
        let mut out = GenerateResponse {
            model,
            ..Default::default()
        };
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            if out.request_id.is_empty() {
                out.request_id = c.request_id;
            }
            out.text.push_str(&c.text);
            out.token_ids.extend(c.token_ids);
            out.logprobs.extend(c.logprobs);
            if c.finish_reason != 0 {
                out.finish_reason = c.finish_reason;
                out.usage = c.usage;
            }
        }
        Ok(Response::new(out))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let started = Instant::now();
        let caller = self.shared.caller(request.metadata(), "GenerateStream")?;
        let deadline = deadline(&request, started, &self.shared.cfg);
        let mut tracker = Tracker::new(&self.shared, "GenerateStream", started)?;
        tracker.deadline = deadline;
        tracker.key = caller.as_ref().map(|c| c.name.clone());
        let (_, leader, stream) = self
            .shared
            .generate(request.into_inner(), deadline, tracker, caller)
            .await?;
        let mut response = Response::new(stream);
        // Which group took the request (before any retry): for debugging and the routing
        // benchmark's locality count.
        if let Ok(v) = leader.parse() {
            response.metadata_mut().insert(GROUP_HEADER, v);
        }
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let caller = self.shared.caller(request.metadata(), "Tokenize")?;
        let result = async {
            let req = request.into_inner();
            let limit = self.shared.cfg.max_message_bytes;
            // Before any work: tonic lets up to 4x the limit through so this can say which.
            let size = prost::Message::encoded_len(&req);
            if size > limit {
                return Err(RequestError::invalid(
                    "request",
                    format!(
                        "message is {size} bytes; the limit is {limit} bytes (max_message_bytes): \
                         tokenize a shorter input or raise the router's --max-message-bytes"
                    ),
                ));
            }
            let snap = self.shared.pool.snapshot();
            let model = self.shared.resolve_model(&snap, &req.model)?;
            if let Some(c) = &caller {
                c.allow_model(&model.name).map_err(RequestError::Auth)?;
            }
            let input = validate::parse_tokenize_input(req.input)?;
            let token_ids = validate::tokenize(&model.text, input, model.vocab_size).await?;
            let tokens = token_ids
                .iter()
                .map(|&id| model.text.tokenizer.id_to_token(id).unwrap_or_default())
                .collect();
            let resp = TokenizeResponse { token_ids, tokens };
            // Ids plus token strings outgrow the text (3.5x for English with the test
            // tokenizer, up to ~6x for text of single-byte tokens). The response limit (4x) fits
            // ordinary text within the request limit; beyond it this names the limit instead
            // of failing in the encoder (OUT_OF_RANGE, which was counted as ok).
            let out = prost::Message::encoded_len(&resp);
            if out > response_limit(limit) {
                return Err(RequestError::invalid(
                    "input",
                    format!(
                        "the response would be {out} bytes; the limit is {} bytes (4 x \
                         max_message_bytes): tokenize a shorter input",
                        response_limit(limit)
                    ),
                ));
            }
            Ok::<_, RequestError>(resp)
        }
        .await;
        self.shared.metrics.request_done(
            "Tokenize",
            result
                .as_ref()
                .map_or_else(RequestError::code, |_| Code::Ok),
        );
        Ok(Response::new(result?))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.shared.caller(request.metadata(), "ListModels")?;
        let snap = self.shared.pool.snapshot();
        let limit = self.shared.cfg.max_new_tokens_limit;
        let models = snap
            .models
            .values()
            .map(|m| ModelInfo {
                name: m.name.clone(),
                context_length: m.context_length as u32,
                vocab_size: m.vocab_size as u32,
                tokenizer_hash: m.tokenizer_hash.clone(),
                replicas: m.replicas as u32,
                max_new_tokens_limit: effective_limit(limit, m.max_new_tokens_limit) as u32,
            })
            .collect();
        self.shared.metrics.request_done("ListModels", Code::Ok);
        Ok(Response::new(ListModelsResponse { models }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
