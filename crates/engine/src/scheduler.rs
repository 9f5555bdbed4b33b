//! Continuous batching (iteration-level scheduling, as in Orca): one thread owns the model, the KV
//! cache and every sequence's state; requests join the running batch at any step and leave the
//! step they finish or are cancelled, their KV slot freed at once. Each step packs decode tokens
//! first (one per running sequence, so running streams never stall) and fills the rest of the
//! token budget with prompt chunks (chunked prefill).
//!
//! The rest of the program talks to the thread through a command channel; each request gets its
//! own event channel back. No locks are shared with callers; counters are atomics.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_collective::Communicator;
use tandem_model::{KvCache, Model, SeqInput, SlotId, TextModel, Transformer};
use tokio::sync::mpsc;

use crate::detokenize::IncrementalDecoder;
use crate::draft::{Draft, DraftRequest, DraftSampling, Drafter, NgramDrafter};
use crate::group::{SlotOp, StepPlan};
use crate::request::{EngineError, Event, Request, TokenEvent, Usage};
use crate::sampling::{Sampled, Sampler};
use crate::speculate::{
    Acceptance, Candidate, CostModel, SpecMode, MAX_DRAFT_CANDIDATES, MAX_DRAFT_TOKENS,
};
use crate::stopping::{FinishReason, StopChecker};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most tokens (decode + prefill) in one forward.
    pub max_batch_tokens: usize,
    /// Most sequences running at once (each holds a KV slot).
    pub max_running: usize,
    /// Most requests waiting to start; beyond it `submit` refuses with `QueueFull`.
    pub max_waiting: usize,
    /// What a request's `SpecMode::Default` means (a worker with a paired draft sets
    /// `DraftModel`).
    pub default_speculation: SpecMode,
    /// Most drafted tokens per sequence per step when the request leaves it to the engine; the
    /// cost model drafts fewer (or none) when more would not pay.
    pub max_draft_tokens: usize,
    /// Let the cost model choose draft lengths (default). Off: always draft the most allowed,
    /// as fixed-k implementations do (for comparison in benchmarks, and deterministic tests).
    pub adaptive_draft: bool,
    /// Candidate drafts per sequence per step when a request leaves it unset (multi-candidate
    /// drafting, n-gram or draft model). Each extra candidate is scored in its own KV slot, a
    /// copy of the sequence's, in the same forward; the verifier keeps the candidate it accepts
    /// most of. 1: a single draft.
    pub draft_candidates: usize,
    /// Longest a request may wait to start; past it the request fails with `QueueTimeout`
    /// (the client retries elsewhere instead of waiting minutes in an overload). `None`: no
    /// limit.
    pub max_queue_time: Option<Duration>,
}

/// `EngineConfig::max_queue_time` by default.
pub const DEFAULT_MAX_QUEUE_TIME: Duration = Duration::from_secs(60);

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 256,
            max_running: 32,
            max_waiting: 256,
            default_speculation: SpecMode::Off,
            max_draft_tokens: 8,
            adaptive_draft: true,
            draft_candidates: 1,
            max_queue_time: Some(DEFAULT_MAX_QUEUE_TIME),
        }
    }
}

/// Live numbers for routing (`Load`) and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_tokens: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub cancelled: AtomicU64,
    /// Requests failed before they started: their client's deadline passed, or they waited
    /// past `max_queue_time`.
    pub expired: AtomicU64,
    /// Set when a tensor-parallel group broke (a rank died): this replica can't serve anymore.
    pub group_failed: std::sync::atomic::AtomicBool,
    /// Speculative decoding: tokens drafted and accepted by the verifier.
    pub draft_tokens: AtomicU64,
    pub accepted_draft_tokens: AtomicU64,
    /// Steps where the verifier kept an alternative candidate (multi-candidate drafting).
    pub alternative_wins: AtomicU64,
    /// Drafts verified (one per sequence per step with at least one drafted token).
    pub drafts: AtomicU64,
    /// Per draft position (0 = the first drafted token): drafted there, accepted there.
    pub drafted_at: [AtomicU64; MAX_DRAFT_TOKENS],
    pub accepted_at: [AtomicU64; MAX_DRAFT_TOKENS],
    /// Steps where the cost model chose to draft nothing for sequences that asked for
    /// speculation, and the speedup it predicted for the last step that drafted (× 1000).
    pub spec_skipped_steps: AtomicU64,
    pub spec_predicted_speedup_milli: AtomicU64,
    /// Sum (× 1000) and count of the predicted speedups of the steps that drafted.
    pub spec_predicted_sum_milli: AtomicU64,
    pub spec_planned_steps: AtomicU64,
    /// The cost model's estimates, refreshed every few dozen steps.
    pub spec_costs: std::sync::Mutex<crate::speculate::CostSummary>,
}

enum Command {
    Submit(Box<Pending>),
    Cancel(u64),
    /// Stop now: refuse what is left, end the group, then answer on the channel.
    Shutdown(std_mpsc::Sender<()>),
}

struct Pending {
    id: u64,
    req: Request,
    events: mpsc::UnboundedSender<Event>,
    queued_at: Instant,
    /// The client's deadline: past it the request is not started.
    deadline: Option<Instant>,
}

/// A submitted request: its event stream. Dropping it cancels the request and frees its KV.
pub struct Generation {
    pub id: u64,
    pub events: mpsc::UnboundedReceiver<Event>,
    commands: std_mpsc::Sender<Command>,
}

impl Generation {
    /// Blocking convenience for tests and tools: waits for the whole result.
    pub fn collect_blocking(
        mut self,
    ) -> Result<(Vec<TokenEvent>, FinishReason, Usage), EngineError> {
        let mut tokens = Vec::new();
        while let Some(ev) = self.events.blocking_recv() {
            match ev {
                Event::Token(t) => tokens.push(t),
                Event::Finished { reason, usage, .. } => return Ok((tokens, reason, usage)),
                Event::Error(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Ignored when the engine is gone or the request already finished.
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}

/// What an engine may run with besides its model.
#[derive(Default)]
pub struct EngineParts {
    /// The communicator of a tensor-parallel group this engine leads.
    pub group: Option<Arc<dyn Communicator>>,
    /// A draft model (usually a remote draft service) for `SpecMode::DraftModel`.
    pub draft_model: Option<Box<dyn Drafter>>,
}

/// The handle the services hold. Cloning is cheap; the engine thread stops when every handle
/// (and every `Generation`) is dropped.
#[derive(Clone)]
pub struct Engine {
    commands: std_mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    text: TextModel,
    max_context: usize,
    vocab_size: usize,
    cfg: EngineConfig,
    next_id: Arc<AtomicU64>,
    _thread: Arc<ThreadGuard>,
}

struct ThreadGuard(Option<JoinHandle<()>>);

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        // The thread exits once all senders are gone; don't block a dropping runtime on it.
        drop(self.0.take());
    }
}

impl Engine {
    pub fn start(model: Model, cfg: EngineConfig) -> Engine {
        Self::start_with(model, cfg, EngineParts::default())
    }

    /// The leader (rank 0) of a tensor-parallel group: `model` holds this rank's shard over
    /// `comm`, and every other rank runs a `group::Follower` over the same communicator.
    pub fn start_group(model: Model, cfg: EngineConfig, comm: Arc<dyn Communicator>) -> Engine {
        Self::start_with(
            model,
            cfg,
            EngineParts {
                group: Some(comm),
                ..Default::default()
            },
        )
    }

    /// Starts with optional parts: a tensor-parallel group and a draft model drafter.
    pub fn start_with(model: Model, cfg: EngineConfig, parts: EngineParts) -> Engine {
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let text = model.text.clone();
        let max_context = model.transformer.max_context();
        let vocab_size = model.transformer.config().vocab_size;
        let mut sched = Scheduler::new(
            model.transformer,
            text.clone(),
            cfg.clone(),
            stats.clone(),
            parts,
        );
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || sched.run(rx))
            .ok();
        Engine {
            commands: tx,
            stats,
            text,
            max_context,
            vocab_size,
            cfg,
            next_id: Arc::new(AtomicU64::new(1)),
            _thread: Arc::new(ThreadGuard(thread)),
        }
    }

    pub fn text(&self) -> &TextModel {
        &self.text
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Stops the engine thread and, in a group, ends the followers with a shutdown plan; waits
    /// up to `timeout` for that to happen. A process must call this before it exits: other
    /// handles (a server's, a stream's) may outlive its `main`, and a follower would otherwise
    /// see the leader's connection drop and report the group failed. Requests still queued or
    /// running get `EngineError::Stopped`. Returns false if the thread did not answer in time.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let (tx, rx) = std_mpsc::channel();
        if self.commands.send(Command::Shutdown(tx)).is_err() {
            // The thread is already gone.
            return true;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    /// Validates and queues a request. Refuses at once (nothing queued) on bad input, a prompt
    /// that does not fit the context, or a full queue.
    pub fn submit(&self, req: Request) -> Result<Generation, EngineError> {
        self.submit_with_deadline(req, None)
    }

    /// [`Engine::submit`] for a client with a deadline: a request still waiting when it passes
    /// is never started (it fails with `DeadlineExceeded`), so it frees its queue place for
    /// requests that can still be answered.
    pub fn submit_with_deadline(
        &self,
        req: Request,
        deadline: Option<Instant>,
    ) -> Result<Generation, EngineError> {
        req.validate(self.max_context, self.vocab_size)?;
        if self.stats.group_failed.load(Ordering::SeqCst) {
            return Err(EngineError::GroupFailed(
                "a rank of this tensor-parallel group is gone".into(),
            ));
        }
        // Reserve the queue place before sending, so concurrent submits can't overshoot.
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.cfg.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull {
                limit: self.cfg.max_waiting,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::unbounded_channel();
        let pending = Pending {
            id,
            req,
            events: etx,
            queued_at: Instant::now(),
            deadline,
        };
        if self
            .commands
            .send(Command::Submit(Box::new(pending)))
            .is_err()
        {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(Generation {
            id,
            events: erx,
            commands: self.commands.clone(),
        })
    }
}

struct Running {
    id: u64,
    slot: SlotId,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already in the KV cache.
    cached: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopChecker,
    events: mpsc::UnboundedSender<Event>,
    queued_at: Instant,
    first_token_at: Option<Instant>,
    /// Speculation: which drafter (None = off), most drafted tokens per step, the request's
    /// token budget, accepted drafted tokens so far, the running acceptance rate, and decode
    /// steps since the last draft (to probe again after the cost model stopped drafting).
    drafter: Option<DrafterKind>,
    max_draft: usize,
    /// Candidate drafts per step (multi-candidate drafting).
    candidates: usize,
    max_new: usize,
    accepted_draft: usize,
    acceptance: Acceptance,
    steps_since_draft: usize,
}

/// Index into the scheduler's drafters (and the cost model's drafter tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrafterKind {
    Ngram = 0,
    Model = 1,
}

/// After this many decode steps without a draft, a sequence drafts a little anyway, so its
/// acceptance rate and the drafter's cost stay measured (they may have changed).
const PROBE_EVERY: usize = 16;

struct Scheduler {
    model: Transformer,
    kv: KvCache,
    text: TextModel,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Pending>,
    running: Vec<Running>,
    /// Tensor-parallel group (leader side) and the slot operations followers haven't seen yet.
    group: Option<Arc<dyn Communicator>>,
    pending_ops: Vec<SlotOp>,
    failed: Option<String>,
    /// The model-free drafter, and the draft model when one is paired.
    ngram: NgramDrafter,
    draft_model: Option<Box<dyn Drafter>>,
    costs: CostModel,
    /// Set by `Engine::shutdown`: the loop ends and answers here once the group is told.
    shutdown_ack: Option<std_mpsc::Sender<()>>,
}

impl Scheduler {
    fn new(
        model: Transformer,
        text: TextModel,
        cfg: EngineConfig,
        stats: Arc<EngineStats>,
        parts: EngineParts,
    ) -> Self {
        let kv = model.new_cache();
        let max_tokens = cfg.max_batch_tokens.max(1);
        Self {
            model,
            kv,
            text,
            cfg,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            group: parts.group,
            pending_ops: Vec::new(),
            failed: None,
            ngram: NgramDrafter::new(2, 4, MAX_DRAFT_TOKENS),
            draft_model: parts.draft_model,
            // Prior cost of a drafted position relative to a verifier step: prompt lookup is
            // free; a draft model a third of the target's size, about a third (measured after
            // its first call).
            costs: CostModel::new(max_tokens, &[0.0, 0.35]),
            shutdown_ack: None,
        }
    }

    fn allocate_slot(&mut self) -> SlotId {
        let id = self.kv.allocate();
        if self.group.is_some() {
            self.pending_ops.push(SlotOp::Alloc(id.0));
        }
        id
    }

    fn free_slot(&mut self, id: SlotId) {
        self.kv.free(id);
        if self.group.is_some() {
            self.pending_ops.push(SlotOp::Free(id.0));
        }
    }

    /// A rank is gone: nothing can run anymore. Fail everything, now and from now on.
    fn fail_group(&mut self, why: String) {
        tracing::error!(error = %why, "tensor-parallel group failed");
        self.stats.group_failed.store(true, Ordering::SeqCst);
        let err = EngineError::GroupFailed(why.clone());
        for r in self.running.drain(..) {
            let _ = r.events.send(Event::Error(err.clone()));
        }
        for p in self.waiting.drain(..) {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = p.events.send(Event::Error(err.clone()));
        }
        self.failed = Some(why);
    }

    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        // Requests sent meanwhile wait in the channel. In a group every follower runs the same
        // warm-up, meeting us in its all-reduces.
        if let Err(e) = self.model.warm_up() {
            if self.group.is_some() {
                self.fail_group(format!("warm-up forward: {e}"));
            } else {
                tracing::warn!(error = %e, "warm-up forward failed");
            }
        }
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                // Idle: block until work arrives; exit when every handle is gone.
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            if self.shutdown_ack.is_some() {
                break;
            }
            if let Some(why) = &self.failed {
                // Refuse what arrived; keep draining commands until every handle is gone.
                let err = EngineError::GroupFailed(why.clone());
                for p in self.waiting.drain(..) {
                    self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = p.events.send(Event::Error(err.clone()));
                }
                continue;
            }
            self.expire_waiting();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish_stats();
        }
        for r in self.running.drain(..) {
            let _ = r.events.send(Event::Error(EngineError::Stopped));
        }
        for p in self.waiting.drain(..) {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = p.events.send(Event::Error(EngineError::Stopped));
        }
        // Tell the followers to stop (they would otherwise wait for the next plan forever).
        if let (Some(comm), None) = (&self.group, &self.failed) {
            let mut bytes = StepPlan {
                shutdown: true,
                ..Default::default()
            }
            .encode();
            let _ = comm.broadcast(0, &mut bytes);
        }
        if let Some(ack) = self.shutdown_ack.take() {
            let _ = ack.send(());
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Shutdown(ack) => self.shutdown_ack = Some(ack),
            Command::Submit(p) => self.waiting.push_back(*p),
            Command::Cancel(id) => {
                if let Some(i) = self.waiting.iter().position(|p| p.id == id) {
                    self.waiting.remove(i);
                    self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                } else if let Some(i) = self.running.iter().position(|r| r.id == id) {
                    let r = self.running.swap_remove(i);
                    // The drafter's state too (a draft service's KV), at once, as for a
                    // finished sequence: not after the draft's idle eviction.
                    self.release_drafts(r.id, r.drafter);
                    self.free_slot(r.slot);
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Fails waiting requests whose client deadline passed or that waited past
    /// `max_queue_time`: they would only be answered too late.
    fn expire_waiting(&mut self) {
        let now = Instant::now();
        let limit = self.cfg.max_queue_time;
        let expired = |p: &Pending| -> Option<EngineError> {
            if p.deadline.is_some_and(|d| now >= d) {
                return Some(EngineError::DeadlineExceeded {
                    waited_ms: now.duration_since(p.queued_at).as_millis() as u64,
                });
            }
            let waited = now.duration_since(p.queued_at);
            match limit {
                Some(l) if waited > l => Some(EngineError::QueueTimeout {
                    waited_ms: waited.as_millis() as u64,
                    limit_ms: l.as_millis() as u64,
                }),
                _ => None,
            }
        };
        if !self.waiting.iter().any(|p| expired(p).is_some()) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for p in self.waiting.drain(..) {
            match expired(&p) {
                Some(e) => {
                    self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.stats.expired.fetch_add(1, Ordering::Relaxed);
                    let _ = p.events.send(Event::Error(e));
                }
                None => kept.push_back(p),
            }
        }
        self.waiting = kept;
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if p.events.is_closed() {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let tail_start = p.req.prompt.len().saturating_sub(8);
            let decoder =
                IncrementalDecoder::new(self.text.tokenizer.clone(), &p.req.prompt[tail_start..]);
            let slot = self.allocate_slot();
            let spec = p.req.speculation;
            let mode = match spec.mode {
                SpecMode::Default => self.cfg.default_speculation,
                m => m,
            };
            let drafter = match mode {
                SpecMode::Ngram => Some(DrafterKind::Ngram),
                SpecMode::DraftModel if self.draft_model.is_some() => Some(DrafterKind::Model),
                _ => None,
            };
            let max_draft = match spec.max_draft_tokens {
                0 => self.cfg.max_draft_tokens,
                n => n,
            }
            .min(MAX_DRAFT_TOKENS);
            let candidates = match spec.candidates {
                0 => self.cfg.draft_candidates,
                n => n,
            }
            .clamp(1, MAX_DRAFT_CANDIDATES);
            let max_new = p.req.stop.max_new_tokens;
            let mut stop = p.req.stop.clone();
            if !p.req.ignore_eos {
                stop.eos_ids.extend(&self.text.eos_token_ids);
            }
            self.stats
                .prompt_tokens
                .fetch_add(p.req.prompt.len() as u64, Ordering::Relaxed);
            self.running.push(Running {
                id: p.id,
                slot,
                prompt_len: p.req.prompt.len(),
                cached: 0,
                sampler: Sampler::new(p.req.sampling.clone(), &p.req.prompt),
                decoder,
                stop: StopChecker::new(stop),
                tokens: p.req.prompt,
                events: p.events,
                queued_at: p.queued_at,
                first_token_at: None,
                drafter,
                max_draft,
                candidates,
                max_new,
                accepted_draft: 0,
                acceptance: Acceptance::new(0.6),
                steps_since_draft: 0,
            });
        }
    }

    /// Draft lengths for this step's decoding sequences (index into `running`, k) from the cost
    /// model, then the drafts themselves: one call per drafter for all its sequences.
    fn draft(&mut self, decoding: &[usize], budget: usize, prefill: usize) -> Vec<Draft> {
        let mut drafts = vec![Draft::default(); decoding.len()];
        let model_up = self.draft_model.as_ref().is_some_and(|d| d.available());
        let mut cands = Vec::new();
        let mut which = Vec::new();
        for (j, &i) in decoding.iter().enumerate() {
            let r = &self.running[i];
            let Some(kind) = r.drafter else { continue };
            if kind == DrafterKind::Model && !model_up {
                continue;
            }
            // Never draft past the request's token budget: its last token is the target's.
            let left = r.max_new.saturating_sub(r.tokens.len() - r.prompt_len);
            let max_k = r.max_draft.min(left.saturating_sub(1));
            if max_k == 0 {
                continue;
            }
            cands.push(Candidate {
                alpha: r.acceptance.rate(),
                max_k,
                drafter: kind as usize,
            });
            which.push(j);
        }
        if cands.is_empty() {
            return drafts;
        }
        let plan = if self.cfg.adaptive_draft {
            self.costs
                .plan(decoding.len() + prefill, decoding.len(), &cands)
        } else {
            let ks: Vec<usize> = cands.iter().map(|c| c.max_k).collect();
            crate::speculate::Plan {
                predicted_speedup: self.costs.predict(
                    decoding.len() + prefill,
                    decoding.len(),
                    &cands,
                    &ks,
                ),
                ks,
            }
        };
        let mut ks = plan.ks;
        let mut room = budget.saturating_sub(decoding.len());
        let mut any = false;
        for (n, k) in ks.iter_mut().enumerate() {
            let r = &mut self.running[decoding[which[n]]];
            if *k == 0 && r.steps_since_draft >= PROBE_EVERY {
                *k = cands[n].max_k.min(2);
            }
            *k = (*k).min(room);
            room -= *k;
            if *k == 0 {
                r.steps_since_draft += 1;
            } else {
                r.steps_since_draft = 0;
                any = true;
            }
        }
        if !any {
            self.stats
                .spec_skipped_steps
                .fetch_add(1, Ordering::Relaxed);
            return drafts;
        }
        let milli = (plan.predicted_speedup * 1000.0).round() as u64;
        self.stats
            .spec_predicted_speedup_milli
            .store(milli, Ordering::Relaxed);
        self.stats
            .spec_predicted_sum_milli
            .fetch_add(milli, Ordering::Relaxed);
        let planned = self
            .stats
            .spec_planned_steps
            .fetch_add(1, Ordering::Relaxed);
        if planned.is_multiple_of(32) {
            if let Ok(mut c) = self.stats.spec_costs.lock() {
                *c = self.costs.summary();
            }
        }
        for kind in [DrafterKind::Ngram, DrafterKind::Model] {
            let mut reqs = Vec::new();
            let mut slots = Vec::new();
            for (n, &k) in ks.iter().enumerate() {
                if k == 0 || cands[n].drafter != kind as usize {
                    continue;
                }
                let r = &mut self.running[decoding[which[n]]];
                let p = r.sampler.params().clone();
                let sampling = if p.is_greedy() {
                    DraftSampling::default()
                } else {
                    DraftSampling {
                        temperature: p.temperature,
                        top_k: p.top_k,
                        top_p: p.top_p,
                        seed: r.sampler.seed(),
                    }
                };
                slots.push((which[n], k));
                reqs.push((r.id, k, sampling, r.candidates));
            }
            if reqs.is_empty() {
                continue;
            }
            let requests: Vec<DraftRequest<'_>> = reqs
                .iter()
                .zip(&slots)
                .map(|(&(seq, k, sampling, candidates), &(j, _))| DraftRequest {
                    seq,
                    context: &self.running[decoding[j]].tokens,
                    max_tokens: k,
                    candidates,
                    sampling,
                })
                .collect();
            let max_k = slots.iter().map(|s| s.1).max().unwrap_or(0);
            let started = Instant::now();
            let out = match kind {
                DrafterKind::Ngram => self.ngram.propose(&requests),
                DrafterKind::Model => match self.draft_model.as_mut() {
                    Some(d) => d.propose(&requests),
                    None => Vec::new(),
                },
            };
            // Only calls that drafted measure the drafter (one that skipped a step, e.g. a draft
            // service still receiving a context, answers at once with nothing).
            let measures = match kind {
                DrafterKind::Ngram => true,
                DrafterKind::Model => self
                    .draft_model
                    .as_ref()
                    .is_some_and(|d| d.last_call_measures_drafting()),
            };
            if measures && out.iter().any(|d| !d.tokens.is_empty()) {
                self.costs.drafters[kind as usize].record(max_k, started.elapsed().as_secs_f64());
            }
            for ((j, k), mut d) in slots.into_iter().zip(out) {
                // A drafter must not hand back more than asked.
                let fit = |d: &mut Draft| d.tokens.truncate(k);
                fit(&mut d);
                d.alternatives
                    .truncate(self.running[decoding[j]].candidates.saturating_sub(1));
                d.alternatives.iter_mut().for_each(fit);
                d.alternatives.retain(|a| !a.tokens.is_empty());
                if d.tokens.is_empty() {
                    d.alternatives.clear();
                }
                drafts[j] = d;
            }
        }
        drafts
    }

    /// One forward over the running batch, then sampling (and verifying drafts) and events.
    fn step(&mut self) {
        // Decode tokens first: every sequence past its prompt advances by one, plus what it
        // drafted; then prompt chunks, oldest first, within what is left of the budget.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                r.cached + 1 == r.tokens.len()
            })
            .take(budget)
            .collect();
        let prefill_wanted: usize = self
            .running
            .iter()
            .map(|r| r.tokens.len() - r.cached)
            .filter(|&left| left > 1)
            .sum();
        let prefill = prefill_wanted.min(budget.saturating_sub(decoding.len()));
        let drafts = self.draft(&decoding, budget, prefill);
        // (running index, input tokens, the draft verified in it)
        let mut plan: Vec<(usize, Vec<u32>, Draft)> = Vec::new();
        // Extra candidates: (plan index, their own slot, input tokens), scored after `plan`.
        let mut alts: Vec<(usize, SlotId, Vec<u32>)> = Vec::new();
        for (&i, mut d) in decoding.iter().zip(drafts) {
            let (last, src, cached) = {
                let r = &self.running[i];
                (r.tokens[r.cached], r.slot, r.cached)
            };
            let mut input = vec![last];
            input.extend_from_slice(&d.tokens);
            budget = budget.saturating_sub(input.len());
            for a in std::mem::take(&mut d.alternatives) {
                let n = 1 + a.tokens.len();
                if n > budget {
                    break;
                }
                let slot = self.allocate_slot();
                if let Err(e) = self.kv.copy_slot(src, slot, cached) {
                    tracing::error!(error = %e, "copying a KV slot for a draft candidate");
                    self.free_slot(slot);
                    break;
                }
                if self.group.is_some() {
                    self.pending_ops.push(SlotOp::Copy(src.0, slot.0, cached));
                }
                budget -= n;
                let mut alt_input = vec![last];
                alt_input.extend_from_slice(&a.tokens);
                alts.push((plan.len(), slot, alt_input));
                d.alternatives.push(a);
            }
            plan.push((i, input, d));
        }
        for (i, r) in self.running.iter().enumerate() {
            let left = r.tokens.len() - r.cached;
            if left > 1 && budget > 0 {
                let n = left.min(budget);
                plan.push((
                    i,
                    r.tokens[r.cached..r.cached + n].to_vec(),
                    Draft::default(),
                ));
                budget -= n;
            }
        }
        if plan.is_empty() {
            return;
        }
        let batch: Vec<SeqInput<'_>> = plan
            .iter()
            .map(|(i, input, d)| SeqInput {
                slot: self.running[*i].slot,
                tokens: input,
                all_logits: !d.tokens.is_empty(),
            })
            .chain(alts.iter().map(|(_, slot, input)| SeqInput {
                slot: *slot,
                tokens: input,
                all_logits: true,
            }))
            .collect();
        let started = Instant::now();
        if let Some(comm) = &self.group {
            let plan = StepPlan {
                ops: std::mem::take(&mut self.pending_ops),
                batch: batch
                    .iter()
                    .map(|s| (s.slot.0, s.tokens.to_vec(), s.all_logits))
                    .collect(),
                shutdown: false,
            };
            let mut bytes = plan.encode();
            if let Err(e) = comm.broadcast(0, &mut bytes) {
                drop(batch);
                self.fail_group(format!("broadcasting the step plan: {e}"));
                return;
            }
        }
        let result = self
            .model
            .forward(&mut self.kv, &batch)
            .and_then(|l| l.to_vecs());
        let tokens_in_step: usize = batch.iter().map(|s| s.tokens.len()).sum();
        drop(batch);
        // A draft service prefilling in the background shares the cores: such a step's time
        // says nothing about the verifier's own cost.
        if !self.draft_model.as_ref().is_some_and(|d| d.busy()) {
            self.costs
                .forward
                .record(tokens_in_step, started.elapsed().as_secs_f64());
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let alt_slots: Vec<SlotId> = alts.iter().map(|a| a.1).collect();
        let logits = match result {
            Ok(mut l) => {
                // Each extra candidate's rows, by the plan entry it belongs to.
                let mut alt_rows: Vec<Vec<(SlotId, Vec<Vec<f32>>)>> = vec![Vec::new(); plan.len()];
                for ((p, slot, _), rows) in alts.iter().zip(l.split_off(plan.len().min(l.len()))) {
                    alt_rows[*p].push((*slot, rows));
                }
                l.into_iter().zip(alt_rows).collect::<Vec<_>>()
            }
            Err(e) if self.group.is_some() => {
                // In a group a failed forward means a failed all-reduce: a rank is gone.
                self.fail_group(format!("forward: {e}"));
                return;
            }
            Err(e) => {
                for slot in alt_slots {
                    self.free_slot(slot);
                }
                // A failed forward must not hang anyone: fail the sequences of this step.
                tracing::error!(error = %e, "forward failed; failing the step's sequences");
                let mut ids: Vec<usize> = plan.iter().map(|(i, _, _)| *i).collect();
                ids.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in ids {
                    let r = self.running.swap_remove(i);
                    self.release_drafts(r.id, r.drafter);
                    self.free_slot(r.slot);
                    let _ = r
                        .events
                        .send(Event::Error(EngineError::Model(e.to_string())));
                }
                return;
            }
        };
        let mut finished = Vec::new();
        let mut alt_free = Vec::new();
        for ((i, input, mut draft), (rows, alt_rows)) in plan.into_iter().zip(logits) {
            let r = &mut self.running[i];
            let drafted = draft.tokens.len();
            if drafted == 0 {
                r.cached += input.len();
                if r.cached < r.tokens.len() {
                    continue; // prompt chunk, more to come
                }
                let Some(row) = rows.last() else { continue };
                let s = r.sampler.sample(row);
                if let Some(done) = Self::deliver(r, s, &self.stats) {
                    finished.push((i, done));
                } else if r.events.is_closed() {
                    finished.push((i, None));
                }
                continue;
            }
            // The candidates: this draft, then its alternatives with their own slots and rows.
            let alternatives = std::mem::take(&mut draft.alternatives);
            let mut candidates = vec![draft];
            candidates.extend(alternatives);
            let mut cand_rows: Vec<&[Vec<f32>]> = vec![&rows];
            cand_rows.extend(alt_rows.iter().map(|(_, r)| &r[..]));
            let (winner, accepted, done) = Self::verify(r, &candidates, &cand_rows, &self.stats);
            let drafted = candidates[winner].tokens.len();
            if winner > 0 {
                self.stats.alternative_wins.fetch_add(1, Ordering::Relaxed);
                // The winning candidate's slot holds the accepted tokens: it becomes the
                // sequence's; the old one is freed with the other candidates' below.
                let old = r.slot;
                r.slot = alt_rows[winner - 1].0;
                alt_free.push(old);
            }
            for (n, (slot, _)) in alt_rows.iter().enumerate() {
                if n + 1 != winner {
                    alt_free.push(*slot);
                }
            }
            r.acceptance.record(drafted, accepted);
            match r.drafter {
                Some(DrafterKind::Ngram) => self.ngram.feedback(r.id, drafted, accepted),
                Some(DrafterKind::Model) => {
                    if let Some(d) = self.draft_model.as_mut() {
                        d.feedback(r.id, drafted, accepted);
                    }
                }
                None => {}
            }
            // The forward cached the last token and every drafted one; keep what was accepted.
            r.cached += 1 + accepted;
            let (slot, keep) = (r.slot, r.cached);
            if let Some(d) = done {
                finished.push((i, d));
            } else if r.events.is_closed() {
                finished.push((i, None));
            } else if let Err(e) = self.kv.truncate(slot, keep) {
                tracing::error!(error = %e, "truncating a rejected draft");
            } else if self.group.is_some() {
                self.pending_ops.push(SlotOp::Truncate(slot.0, keep));
            }
        }
        for slot in alt_free {
            self.free_slot(slot);
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let r = self.running.swap_remove(i);
            self.release_drafts(r.id, r.drafter);
            self.free_slot(r.slot);
            if reason.is_none() {
                // The client went away (its receiver is gone): that is a cancellation too.
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn release_drafts(&mut self, seq: u64, kind: Option<DrafterKind>) {
        match kind {
            Some(DrafterKind::Ngram) => self.ngram.release(seq),
            Some(DrafterKind::Model) => {
                if let Some(d) = self.draft_model.as_mut() {
                    d.release(seq);
                }
            }
            None => {}
        }
    }

    /// Verifies a draft (`speculate::verify`) and delivers the tokens it yields, in order, until
    /// one ends the sequence. Returns the accepted drafted tokens among those delivered, and
    /// `Some` when the sequence is done.
    fn verify(
        r: &mut Running,
        drafts: &[Draft],
        rows: &[&[Vec<f32>]],
        stats: &EngineStats,
    ) -> (usize, usize, Option<Option<FinishReason>>) {
        let (winner, v) = crate::speculate::verify_candidates(&mut r.sampler, drafts, rows);
        // Counted before the tokens go out, so a caller that saw the last token sees them.
        let drafted = drafts.get(winner).map_or(0, |d| d.tokens.len());
        stats.drafts.fetch_add(1, Ordering::Relaxed);
        stats
            .draft_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        stats
            .accepted_draft_tokens
            .fetch_add(v.accepted as u64, Ordering::Relaxed);
        for pos in 0..drafted.min(MAX_DRAFT_TOKENS) {
            stats.drafted_at[pos].fetch_add(1, Ordering::Relaxed);
            if pos < v.accepted {
                stats.accepted_at[pos].fetch_add(1, Ordering::Relaxed);
            }
        }
        for (n, s) in v.tokens.into_iter().enumerate() {
            let drafted = n < v.accepted;
            if drafted {
                r.accepted_draft += 1;
            }
            if let Some(done) = Self::deliver(r, s, stats) {
                return (winner, n.min(v.accepted) + usize::from(drafted), Some(done));
            }
        }
        (winner, v.accepted, None)
    }

    /// Sends one chosen token's event; returns `Some` when the sequence is done.
    fn deliver(r: &mut Running, s: Sampled, stats: &EngineStats) -> Option<Option<FinishReason>> {
        r.tokens.push(s.token);
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        r.first_token_at.get_or_insert(now);
        let delta = match r.decoder.push(s.token) {
            Ok(d) => d,
            Err(e) => {
                let _ = r
                    .events
                    .send(Event::Error(EngineError::Detokenize(e.to_string())));
                return Some(None);
            }
        };
        // Requests are validated to fit the context, so max_new_tokens ends them in time.
        let mut step = r.stop.push(s.token, &delta);
        if step.finish == Some(FinishReason::Length) {
            // Release what was held back as a possible stop string, then any partial character.
            step.text.push_str(&r.stop.flush());
            if let Ok(rest) = r.decoder.finish() {
                step.text.push_str(&rest);
            }
        }
        let ev = TokenEvent {
            token: s.token,
            text: step.text,
            logprob: s.logprob,
            top_logprobs: s.top,
        };
        if r.events.send(Event::Token(ev)).is_err() {
            return Some(None);
        }
        let reason = step.finish?;
        let usage = Usage {
            prompt_tokens: r.prompt_len,
            completion_tokens: r.tokens.len() - r.prompt_len,
            accepted_draft_tokens: r.accepted_draft,
            queue_ms: r
                .first_token_at
                .map(|t| t.duration_since(r.queued_at).as_secs_f64() * 1e3)
                .unwrap_or_default(),
        };
        let _ = r.events.send(Event::Finished {
            reason,
            usage,
            total_ms: now.duration_since(r.queued_at).as_secs_f64() * 1e3,
        });
        Some(Some(reason))
    }

    fn publish_stats(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .kv_tokens
            .store(self.kv.tokens_in_use(), Ordering::Relaxed);
        self.stats
            .kv_bytes
            .store(self.kv.bytes_reserved(), Ordering::Relaxed);
    }
}
