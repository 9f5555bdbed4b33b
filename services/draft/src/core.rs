//! The draft model and its per-sequence state, synchronous: the gRPC service runs it on its own
//! thread, tests call it directly.
//!
//! One `Propose` call: validate everything (a call that fails validation changes nothing), evict
//! idle and, when needed, least recently used sequences, then per sequence roll the KV back to
//! `rollback_to` and queue `append`. All sequences of the call share each forward: the first
//! forward(s) carry the appended tokens (chunked within a token budget, last-position logits
//! only), then one forward per further drafted position over the sequences still drafting. The
//! last drafted token is not run through the model, so the KV holds context + all drafts but the
//! last, and `held` says so.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tandem_model::{KvCache, Model, ModelError, SeqInput, SlotId, TextModel, Transformer};
use tandem_proto::draft::v1::{
    CandidateDraft, ProposeRequest, ProposeResponse, SequenceDraft, SparseDistribution,
};

use crate::error::DraftError;
use crate::sample::{self, Sampling, GREEDY_TEMPERATURE_EPS};

/// Most tokens one sequence may ask to draft in one call.
pub const MAX_DRAFT_TOKENS: usize = 16;
/// Tokens kept in q when the request leaves `max_q_tokens` at 0.
pub const DEFAULT_MAX_Q_TOKENS: usize = 32;
/// Largest `max_q_tokens` accepted (q travels in every response).
pub const MAX_Q_TOKENS_LIMIT: usize = 1024;

/// Limits of a [`DraftCore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    /// Sequences held at once, and the most one call may name; beyond it the least recently used
    /// sequence is evicted.
    pub max_sequences: usize,
    /// Most tokens drafted per sequence per call (≤ [`MAX_DRAFT_TOKENS`]).
    pub max_draft_tokens: usize,
    /// A sequence unused this long is evicted.
    pub idle_ttl: Duration,
    /// Token budget of one forward while appending (long appends are chunked, as in the engine's
    /// chunked prefill).
    pub max_forward_tokens: usize,
    /// KV positions held over all sequences (memory ≈ 2 × layers × KV heads × head dim × 4
    /// bytes per position, up to twice that while slots grow by doubling); least recently used
    /// sequences are evicted to stay under it. `None`: no budget.
    pub max_kv_tokens: Option<usize>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_sequences: 256,
            max_draft_tokens: MAX_DRAFT_TOKENS,
            idle_ttl: Duration::from_secs(60),
            max_forward_tokens: 256,
            max_kv_tokens: None,
        }
    }
}

/// What the last `propose` did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Sequences named in the call.
    pub sequences: usize,
    /// Of those, answered `unknown`.
    pub unknown: usize,
    /// Tokens drafted over all sequences.
    pub tokens_drafted: usize,
    /// Forwards run.
    pub forwards: usize,
    /// Sequences evicted to make room or for idleness during the call.
    pub evicted: usize,
}

struct SeqState {
    slot: SlotId,
    /// Exactly what the KV slot holds.
    tokens: Vec<u32>,
    last_used: Instant,
    /// Call counter at last use: least recently used first out.
    last_call: u64,
}

/// One sequence of a call, validated.
struct Plan<'a> {
    id: u64,
    rollback_to: usize,
    append: &'a [u32],
    max_tokens: usize,
    sampling: Option<Sampling>,
    min_confidence: f32,
    candidates: usize,
}

/// Most candidate drafts per sequence per call.
pub const MAX_CANDIDATES: usize = 8;

/// A sequence being worked on in this call.
struct Work {
    /// Index in the request / response.
    out: usize,
    id: u64,
    slot: SlotId,
    /// Tokens to run before drafting: `append`, or the last held token again.
    pending: Vec<u32>,
    fed: usize,
    /// Most tokens to draft.
    cap: usize,
    sampling: Option<Sampling>,
    min_confidence: f32,
    /// Seed of the race noise of sampled drafts (the verifier's seed for the main draft).
    noise_seed: u64,
    drafted: Vec<u32>,
    q: Vec<SparseDistribution>,
    done: bool,
    /// Candidates wanted (the main work item only).
    candidates: usize,
    /// The logits of the first drafted position, kept when more candidates branch from it.
    first_logits: Option<Vec<f32>>,
    /// An extra candidate: its slot is a scratch copy, freed after the call, and what it runs
    /// is not recorded as held.
    alternative: bool,
}

/// A small model with a KV slot per sequence, answering `Propose` and `Release`.
pub struct DraftCore {
    model: Transformer,
    text: TextModel,
    kv: KvCache,
    cfg: CoreConfig,
    seqs: HashMap<u64, SeqState>,
    calls: u64,
    last: CallStats,
    evictions: u64,
    /// Tests: fail the forward this many forwards from now, after the model ran (the slots have
    /// advanced but nothing was recorded: the worst case for consistency).
    #[cfg(test)]
    fail_forward_in: Option<usize>,
}

impl std::fmt::Debug for DraftCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraftCore")
            .field("cfg", &self.cfg)
            .field("sequences", &self.seqs.len())
            .finish_non_exhaustive()
    }
}

impl DraftCore {
    pub fn new(model: Model, mut cfg: CoreConfig) -> Self {
        cfg.max_draft_tokens = cfg.max_draft_tokens.min(MAX_DRAFT_TOKENS);
        cfg.max_sequences = cfg.max_sequences.max(1);
        cfg.max_forward_tokens = cfg.max_forward_tokens.max(1);
        let kv = model.transformer.new_cache();
        Self {
            model: model.transformer,
            text: model.text,
            kv,
            cfg,
            seqs: HashMap::new(),
            calls: 0,
            last: CallStats::default(),
            evictions: 0,
            #[cfg(test)]
            fail_forward_in: None,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn text(&self) -> &TextModel {
        &self.text
    }

    pub fn transformer(&self) -> &Transformer {
        &self.model
    }

    pub fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    /// The longest sequence (context + drafts) the draft holds.
    pub fn max_context(&self) -> usize {
        self.model.max_context()
    }

    /// Sequences held now.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Tokens the draft holds for `id`, or `None` when it holds no such sequence.
    pub fn held(&self, id: u64) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.tokens.len())
    }

    /// Cached positions over all sequences.
    pub fn kv_tokens(&self) -> usize {
        self.kv.tokens_in_use()
    }

    /// What the last `propose` call did.
    pub fn last_call(&self) -> CallStats {
        self.last
    }

    /// Sequences evicted since start (idle or least recently used).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// One small forward: candle repacks quantized weights lazily on first use.
    pub fn warm_up(&self) -> Result<(), ModelError> {
        self.model.warm_up()
    }

    /// Ends sequences and frees their KV; unknown ids are ignored. Returns how many were held.
    pub fn release(&mut self, ids: &[u64]) -> usize {
        ids.iter().filter(|&&id| self.drop_seq(id)).count()
    }

    /// Evicts sequences unused for longer than `idle_ttl` as of `now`. Returns how many.
    pub fn evict_idle(&mut self, now: Instant) -> usize {
        let ttl = self.cfg.idle_ttl;
        let idle: Vec<u64> = self
            .seqs
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_used) > ttl)
            .map(|(&id, _)| id)
            .collect();
        for &id in &idle {
            self.drop_seq(id);
        }
        self.evictions += idle.len() as u64;
        if !idle.is_empty() {
            tracing::debug!(evicted = idle.len(), "evicted idle sequences");
        }
        idle.len()
    }

    /// Drafts for every sequence of the call (proto semantics, `tandem.draft.v1`):
    /// - a sequence held with fewer than `rollback_to` tokens, or not held and `rollback_to` > 0,
    ///   answers `unknown` and is left as it is;
    /// - otherwise its KV is cut to `rollback_to`, `append` runs, and up to `max_tokens` tokens
    ///   are drafted (fewer at the context limit, or when the top probability of the next
    ///   position falls below `min_confidence`: temperature-applied when sampling, temperature 1
    ///   when greedy); with nothing appended, the last held token runs again for its logits;
    /// - greedy (no sampling, temperature < 1e-5 or top_k 1): argmax, q = {token: 1}; sampling:
    ///   temperature → top-k → top-p → the `max_q_tokens` most likely (default 32), renormalized
    ///   = q, raced with the noise of (`seed`, position) (`tandem_engine::sampling::race`): with
    ///   the verifier's seed, its own draw wherever the two models agree;
    /// - `held` = what the KV holds: context + every draft but the last.
    ///
    /// Validation errors change nothing. A failed forward fails the call and drops its
    /// sequences (the next call answers `unknown`).
    pub fn propose(&mut self, req: &ProposeRequest) -> Result<ProposeResponse, DraftError> {
        self.propose_at(req, Instant::now())
    }

    /// [`DraftCore::propose`] with the clock given (idle eviction and last use are measured
    /// against `now`).
    pub fn propose_at(
        &mut self,
        req: &ProposeRequest,
        now: Instant,
    ) -> Result<ProposeResponse, DraftError> {
        self.last = CallStats::default();
        let plans = self.parse(req)?;
        let mut stats = CallStats::default();
        let result = self.execute(&plans, now, &mut stats);
        self.last = stats;
        result.map(|sequences| ProposeResponse { sequences })
    }

    /// Several calls at once (concurrent callers), answered in order. Each is validated on its
    /// own; consecutive valid calls whose sequences don't overlap and fit in `max_sequences`
    /// together share their forwards. A forward error fails every call of its batch.
    pub fn propose_many(
        &mut self,
        reqs: &[&ProposeRequest],
        now: Instant,
    ) -> Vec<Result<ProposeResponse, DraftError>> {
        struct Batch<'a> {
            /// (request index, sequences) of each member, in order.
            members: Vec<(usize, usize)>,
            plans: Vec<Plan<'a>>,
            ids: HashSet<u64>,
        }
        self.last = CallStats::default();
        let mut results: Vec<Option<Result<ProposeResponse, DraftError>>> =
            reqs.iter().map(|_| None).collect();
        let mut batches: Vec<Batch<'_>> = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            let plans = match self.parse(req) {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Some(Err(e));
                    continue;
                }
            };
            let joins = batches.last().is_some_and(|b| {
                b.plans.len() + plans.len() <= self.cfg.max_sequences
                    && plans.iter().all(|p| !b.ids.contains(&p.id))
            });
            if !joins {
                batches.push(Batch {
                    members: Vec::new(),
                    plans: Vec::new(),
                    ids: HashSet::new(),
                });
            }
            if let Some(b) = batches.last_mut() {
                b.members.push((i, plans.len()));
                b.ids.extend(plans.iter().map(|p| p.id));
                b.plans.extend(plans);
            }
        }
        let mut stats = CallStats::default();
        for b in batches {
            match self.execute(&b.plans, now, &mut stats) {
                Ok(drafts) => {
                    let mut drafts = drafts.into_iter();
                    for (i, n) in b.members {
                        results[i] = Some(Ok(ProposeResponse {
                            sequences: drafts.by_ref().take(n).collect(),
                        }));
                    }
                }
                // Together over the KV budget: each call alone may still fit.
                Err(DraftError::KvBudget { .. }) if b.members.len() > 1 => {
                    let mut plans = b.plans.into_iter();
                    for (i, n) in b.members {
                        let mine: Vec<Plan<'_>> = plans.by_ref().take(n).collect();
                        results[i] = Some(
                            self.execute(&mine, now, &mut stats)
                                .map(|sequences| ProposeResponse { sequences }),
                        );
                    }
                }
                Err(e) => {
                    for (i, _) in b.members {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        self.last = stats;
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(DraftError::Stopped)))
            .collect()
    }

    /// Runs validated sequences: evictions, rollbacks, forwards. Adds to `stats`.
    fn execute(
        &mut self,
        plans: &[Plan<'_>],
        now: Instant,
        stats: &mut CallStats,
    ) -> Result<Vec<SequenceDraft>, DraftError> {
        self.calls += 1;
        stats.sequences += plans.len();
        stats.evicted += self.evict_idle(now);
        stats.evicted += self.make_room(plans)?;

        let mut response: Vec<SequenceDraft> = plans
            .iter()
            .map(|p| SequenceDraft {
                sequence_id: p.id,
                ..Default::default()
            })
            .collect();
        let mut work = Vec::with_capacity(plans.len());
        for (i, p) in plans.iter().enumerate() {
            match self.start(i, p, now) {
                Some(w) => work.push(w),
                None => {
                    response[i].unknown = true;
                    response[i].held = self.held(p.id).map_or(0, to_u32);
                    stats.unknown += 1;
                }
            }
        }

        let ran = self.run(&mut work, stats);
        // Extra candidates' scratch slots go at once, whatever happened.
        for w in work.iter().filter(|w| w.alternative) {
            self.kv.free(w.slot);
        }
        if let Err(e) = ran {
            // Slots may hold rows past what we recorded; drop the call's sequences so the next
            // call rebuilds them (`unknown`) instead of drafting from a state we can't vouch for.
            for w in work.iter().filter(|w| !w.alternative) {
                self.drop_seq(w.id);
            }
            tracing::error!(error = %e, sequences = work.len(), "draft forward failed; dropped the call's sequences");
            return Err(e);
        }
        for w in work {
            let r = &mut response[w.out];
            stats.tokens_drafted += w.drafted.len();
            if w.alternative {
                r.alternatives.push(CandidateDraft {
                    tokens: w.drafted,
                    q: w.q,
                });
                continue;
            }
            r.held = self.held(w.id).map_or(0, to_u32);
            r.tokens = w.drafted;
            r.q = w.q;
        }
        Ok(response)
    }

    /// Validates the whole call before anything changes.
    fn parse<'a>(&self, req: &'a ProposeRequest) -> Result<Vec<Plan<'a>>, DraftError> {
        let n = req.sequences.len();
        if n > self.cfg.max_sequences {
            return Err(DraftError::TooManySequences {
                got: n,
                limit: self.cfg.max_sequences,
            });
        }
        let vocab = self.vocab_size();
        let context = self.max_context();
        let mut seen: HashMap<u64, usize> = HashMap::with_capacity(n);
        let mut plans = Vec::with_capacity(n);
        for (index, s) in req.sequences.iter().enumerate() {
            if let Some(&first) = seen.get(&s.sequence_id) {
                return Err(DraftError::DuplicateSequence {
                    index,
                    first,
                    id: s.sequence_id,
                });
            }
            seen.insert(s.sequence_id, index);
            if s.max_tokens as usize > self.cfg.max_draft_tokens {
                return Err(DraftError::TooManyTokens {
                    index,
                    got: s.max_tokens,
                    limit: self.cfg.max_draft_tokens,
                });
            }
            if let Some((position, &token)) = s
                .append
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= vocab)
            {
                return Err(DraftError::TokenOutOfRange {
                    index,
                    position,
                    token,
                    vocab,
                });
            }
            let total = s.rollback_to as usize + s.append.len();
            if total > context {
                return Err(DraftError::ContextExceeded {
                    index,
                    rollback_to: s.rollback_to,
                    append: s.append.len(),
                    total,
                    limit: context,
                });
            }
            let invalid = |field: &'static str, got: String, expected: &'static str| {
                DraftError::InvalidValue {
                    index,
                    field,
                    got,
                    expected,
                }
            };
            if !(0.0..=1.0).contains(&s.min_confidence) {
                return Err(invalid(
                    "min_confidence",
                    s.min_confidence.to_string(),
                    "must be in [0, 1] (0 = never stop early)",
                ));
            }
            let sampling = match &s.sampling {
                None => None,
                Some(d) => {
                    if !(d.temperature.is_finite() && d.temperature >= 0.0) {
                        return Err(invalid(
                            "sampling.temperature",
                            d.temperature.to_string(),
                            "must be a finite number ≥ 0 (0 = greedy)",
                        ));
                    }
                    if !(0.0..=1.0).contains(&d.top_p) {
                        return Err(invalid(
                            "sampling.top_p",
                            d.top_p.to_string(),
                            "must be in [0, 1] (0 or 1 = off)",
                        ));
                    }
                    if d.max_q_tokens as usize > MAX_Q_TOKENS_LIMIT {
                        return Err(invalid(
                            "sampling.max_q_tokens",
                            d.max_q_tokens.to_string(),
                            "must be at most 1024 (0 = the default, 32)",
                        ));
                    }
                    let greedy = d.temperature < GREEDY_TEMPERATURE_EPS || d.top_k == 1;
                    (!greedy).then_some(Sampling {
                        temperature: d.temperature,
                        top_k: d.top_k as usize,
                        top_p: d.top_p,
                        seed: d.seed,
                        max_q: match d.max_q_tokens {
                            0 => DEFAULT_MAX_Q_TOKENS,
                            m => m as usize,
                        },
                    })
                }
            };
            if s.candidates as usize > MAX_CANDIDATES {
                return Err(invalid(
                    "candidates",
                    s.candidates.to_string(),
                    "must be at most 8 (0 or 1 = one draft)",
                ));
            }
            plans.push(Plan {
                id: s.sequence_id,
                rollback_to: s.rollback_to as usize,
                append: &s.append,
                max_tokens: s.max_tokens as usize,
                sampling,
                min_confidence: s.min_confidence,
                candidates: (s.candidates as usize).max(1),
            });
        }
        Ok(plans)
    }

    /// Evicts least recently used sequences not in this call until the call's new sequences fit
    /// in `max_sequences` and, with a KV budget, its tokens fit in it. Fails, evicting nothing,
    /// when the call alone needs more KV than the budget.
    fn make_room(&mut self, plans: &[Plan<'_>]) -> Result<usize, DraftError> {
        let new = plans
            .iter()
            .filter(|p| p.rollback_to == 0 && !self.seqs.contains_key(&p.id))
            .count();
        let over_seqs = (self.seqs.len() + new).saturating_sub(self.cfg.max_sequences);
        // KV positions the call's sequences may hold afterwards (an upper bound), and what they
        // hold now (their rollback frees it).
        let (mut need, mut theirs) = (0usize, 0usize);
        for p in plans {
            let held = self.seqs.get(&p.id).map(|s| s.tokens.len());
            let proceeds = match held {
                Some(h) => p.rollback_to <= h,
                None => p.rollback_to == 0,
            };
            if proceeds {
                // The last drafted token is not run, so not held.
                need += p.rollback_to + p.append.len() + p.max_tokens.saturating_sub(1);
                theirs += held.unwrap_or(0);
            }
        }
        let over_kv = |core: &Self| {
            core.cfg.max_kv_tokens.is_some_and(|budget| {
                core.kv.tokens_in_use().saturating_sub(theirs) + need > budget
            })
        };
        if let Some(budget) = self.cfg.max_kv_tokens.filter(|&b| need > b) {
            // Evicting everyone else would not help.
            return Err(DraftError::KvBudget { need, budget });
        }
        if over_seqs == 0 && !over_kv(self) {
            return Ok(0);
        }
        let in_call: HashSet<u64> = plans.iter().map(|p| p.id).collect();
        let mut candidates: Vec<(u64, u64)> = self
            .seqs
            .iter()
            .filter(|(id, _)| !in_call.contains(id))
            .map(|(&id, s)| (s.last_call, id))
            .collect();
        candidates.sort_unstable();
        let mut evicted = 0;
        for &(_, id) in &candidates {
            if evicted >= over_seqs && !over_kv(self) {
                break;
            }
            self.drop_seq(id);
            evicted += 1;
        }
        self.evictions += evicted as u64;
        tracing::debug!(evicted, "evicted least recently used sequences");
        match self.cfg.max_kv_tokens {
            Some(budget) if over_kv(self) => Err(DraftError::KvBudget { need, budget }),
            _ => Ok(evicted),
        }
    }

    /// Rolls the sequence back and queues its tokens; `None` when it is unknown.
    fn start(&mut self, out: usize, p: &Plan<'_>, now: Instant) -> Option<Work> {
        let held = self.seqs.get(&p.id).map(|s| s.tokens.len());
        match held {
            Some(h) if p.rollback_to > h => return None,
            None if p.rollback_to > 0 => return None,
            None => {
                let slot = self.kv.allocate();
                self.seqs.insert(
                    p.id,
                    SeqState {
                        slot,
                        tokens: Vec::new(),
                        last_used: now,
                        last_call: self.calls,
                    },
                );
            }
            Some(_) => {}
        }
        let context = self.max_context();
        let calls = self.calls;
        let s = self.seqs.get_mut(&p.id)?;
        s.last_used = now;
        s.last_call = calls;
        s.tokens.truncate(p.rollback_to);
        // The slot exists while the sequence does; truncating an existing slot cannot fail.
        let _ = self.kv.truncate(s.slot, p.rollback_to);
        let total = s.tokens.len() + p.append.len();
        let mut cap = p.max_tokens.min(context.saturating_sub(total));
        let mut pending = p.append.to_vec();
        if pending.is_empty() && cap > 0 {
            // Logits are needed to draft: run the last held token again.
            match s.tokens.pop() {
                Some(last) => {
                    let _ = self.kv.truncate(s.slot, s.tokens.len());
                    pending.push(last);
                }
                None => cap = 0,
            }
        }
        Some(Work {
            out,
            id: p.id,
            slot: s.slot,
            pending,
            fed: 0,
            cap,
            sampling: p.sampling,
            min_confidence: p.min_confidence,
            noise_seed: p.sampling.map_or(0, |s| s.seed),
            drafted: Vec::new(),
            q: Vec::new(),
            done: false,
            candidates: p.candidates,
            first_logits: None,
            alternative: false,
        })
    }

    /// Runs the call's forwards: appends (chunked), then one per drafted position.
    fn run(&mut self, work: &mut Vec<Work>, stats: &mut CallStats) -> Result<(), DraftError> {
        // Appended tokens, within the token budget per forward.
        loop {
            let mut batch: Vec<(usize, usize)> = Vec::new();
            let mut budget = self.cfg.max_forward_tokens;
            for (i, w) in work.iter().enumerate() {
                let left = w.pending.len() - w.fed;
                if left == 0 {
                    continue;
                }
                if budget == 0 {
                    break;
                }
                let n = left.min(budget);
                budget -= n;
                batch.push((i, n));
            }
            if batch.is_empty() {
                break;
            }
            let inputs: Vec<SeqInput<'_>> = batch
                .iter()
                .map(|&(i, n)| {
                    let w = &work[i];
                    SeqInput {
                        slot: w.slot,
                        tokens: &w.pending[w.fed..w.fed + n],
                        all_logits: false,
                    }
                })
                .collect();
            let rows = self.forward(&inputs, stats)?;
            for (&(i, n), mut seq_rows) in batch.iter().zip(rows) {
                let w = &mut work[i];
                self.record(w.id, &w.pending[w.fed..w.fed + n]);
                w.fed += n;
                if w.fed == w.pending.len() && w.cap > 0 {
                    if let Some(logits) = seq_rows.pop() {
                        choose(w, &logits, self.kv.len(w.slot).unwrap_or(0));
                        if w.candidates > 1 && w.sampling.is_none() {
                            w.first_logits = Some(logits);
                        }
                    }
                }
            }
        }
        for w in work.iter_mut() {
            if w.cap == 0 || w.fed < w.pending.len() {
                w.done = true;
            }
        }
        self.branch(work)?;
        // One forward per further position, over the sequences still drafting.
        loop {
            let running: Vec<usize> = (0..work.len()).filter(|&i| !work[i].done).collect();
            if running.is_empty() {
                break;
            }
            let last: Vec<[u32; 1]> = running
                .iter()
                .map(|&i| [*work[i].drafted.last().unwrap_or(&0)])
                .collect();
            let inputs: Vec<SeqInput<'_>> = running
                .iter()
                .zip(&last)
                .map(|(&i, t)| SeqInput {
                    slot: work[i].slot,
                    tokens: t,
                    all_logits: false,
                })
                .collect();
            let rows = self.forward(&inputs, stats)?;
            for ((&i, t), mut seq_rows) in running.iter().zip(&last).zip(rows) {
                let w = &mut work[i];
                if !w.alternative {
                    self.record(w.id, t);
                }
                if let Some(logits) = seq_rows.pop() {
                    choose(w, &logits, self.kv.len(w.slot).unwrap_or(0));
                } else {
                    w.done = true;
                }
            }
        }
        Ok(())
    }

    /// Adds the extra candidates of the sequences that asked for several, once their first
    /// position is drafted: each gets a scratch copy of the sequence's KV slot and its own first
    /// token. Greedy: the next most likely tokens after the main draft's, each continued
    /// greedily. Sampling: independent draws from the same q (each candidate its own RNG).
    fn branch(&mut self, work: &mut Vec<Work>) -> Result<(), DraftError> {
        let mut extra = Vec::new();
        for w in work.iter_mut() {
            if w.candidates <= 1 || w.drafted.len() != 1 {
                continue;
            }
            let Some(q0) = w.q.first().cloned() else {
                continue;
            };
            let len = self
                .kv
                .len(w.slot)
                .map_err(|e| DraftError::Forward(e.to_string()))?;
            let seed = w.sampling.map_or(0, |s| s.seed);
            let firsts: Vec<(u32, SparseDistribution)> = match w.sampling {
                None => w
                    .first_logits
                    .take()
                    .map(|l| sample::top_tokens(&l, w.candidates))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|&t| t != w.drafted[0])
                    .take(w.candidates - 1)
                    .map(|t| {
                        let q = SparseDistribution {
                            ids: vec![t],
                            probs: vec![1.0],
                        };
                        (t, q)
                    })
                    .collect(),
                Some(_) => {
                    let q: Vec<(u32, f32)> = q0.ids.iter().copied().zip(q0.probs.clone()).collect();
                    (1..w.candidates as u64)
                        .map(|c| {
                            let noise = seed ^ (c << 40);
                            let t =
                                tandem_engine::sampling::race(q.iter().copied(), noise, len as u64);
                            (t, q0.clone())
                        })
                        .collect()
                }
            };
            for (c, (token, q)) in firsts.into_iter().enumerate() {
                let slot = self.kv.allocate();
                if let Err(e) = self.kv.copy_slot(w.slot, slot, len) {
                    self.kv.free(slot);
                    return Err(DraftError::Forward(e.to_string()));
                }
                extra.push(Work {
                    out: w.out,
                    id: w.id,
                    slot,
                    pending: Vec::new(),
                    fed: 0,
                    cap: w.cap,
                    sampling: w.sampling,
                    min_confidence: w.min_confidence,
                    noise_seed: seed ^ ((c as u64 + 1) << 48),
                    drafted: vec![token],
                    q: vec![q],
                    done: w.cap <= 1 || w.done,
                    candidates: 1,
                    first_logits: None,
                    alternative: true,
                });
            }
        }
        work.extend(extra);
        Ok(())
    }

    fn forward(
        &mut self,
        inputs: &[SeqInput<'_>],
        stats: &mut CallStats,
    ) -> Result<Vec<Vec<Vec<f32>>>, DraftError> {
        stats.forwards += 1;
        let fail = |e: ModelError| DraftError::Forward(e.to_string());
        let out = self.model.forward(&mut self.kv, inputs).map_err(fail)?;
        #[cfg(test)]
        match self.fail_forward_in {
            Some(0) => {
                self.fail_forward_in = None;
                return Err(DraftError::Forward("injected failure".into()));
            }
            Some(n) => self.fail_forward_in = Some(n - 1),
            None => {}
        }
        out.to_vecs().map_err(fail)
    }

    /// Notes tokens the KV now holds.
    fn record(&mut self, id: u64, tokens: &[u32]) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.extend_from_slice(tokens);
        }
    }

    /// Forgets a sequence and frees its slot; false when it was not held.
    fn drop_seq(&mut self, id: u64) -> bool {
        match self.seqs.remove(&id) {
            Some(s) => {
                self.kv.free(s.slot);
                true
            }
            None => false,
        }
    }
}

/// Drafts one position for `w` from its logits, or stops it (confidence below the threshold).
fn choose(w: &mut Work, logits: &[f32], position: usize) {
    if w.min_confidence > 0.0 {
        let t = w.sampling.map_or(1.0, |s| s.temperature);
        if sample::top_probability(logits, t) < w.min_confidence {
            w.done = true;
            return;
        }
    }
    let c = sample::choose(logits, w.sampling.as_ref(), w.noise_seed, position as u64);
    w.drafted.push(c.token);
    w.q.push(SparseDistribution {
        ids: c.q.iter().map(|x| x.0).collect(),
        probs: c.q.iter().map(|x| x.1).collect(),
    });
    if w.drafted.len() >= w.cap {
        w.done = true;
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tandem_model::LoadOptions;
    use tandem_proto::draft::v1::SequenceDraftRequest;
    use tandem_testkit::{tiny_model, TinyConfig};

    fn seq(id: u64, rollback_to: u32, append: Vec<u32>, max_tokens: u32) -> SequenceDraftRequest {
        SequenceDraftRequest {
            sequence_id: id,
            rollback_to,
            append,
            max_tokens,
            ..Default::default()
        }
    }

    fn req(sequences: Vec<SequenceDraftRequest>) -> ProposeRequest {
        ProposeRequest { sequences }
    }

    #[test]
    fn a_failed_forward_drops_the_calls_sequences_and_nothing_else() {
        let tiny = tiny_model(&TinyConfig::llama()).unwrap();
        let model = Model::load(&tiny.dir, &LoadOptions::default()).unwrap();
        let mut core = DraftCore::new(model, CoreConfig::default());
        let p: Vec<u32> = (1..12).collect();
        let first = core
            .propose(&req(vec![seq(1, 0, p.clone(), 4), seq(2, 0, p.clone(), 4)]))
            .unwrap();
        let held = first.sequences[0].held;
        // Sequence 1 continues, sequence 3 starts; the second forward fails.
        core.fail_forward_in = Some(1);
        let e = core
            .propose(&req(vec![
                seq(1, held, vec![5], 4),
                seq(3, 0, p.clone(), 4),
            ]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e}");
        assert!(e.to_string().contains("resend them from 0"), "{e}");
        assert_eq!((core.held(1), core.held(3)), (None, None));
        assert_eq!(core.held(2), Some(held as usize));
        assert_eq!(core.kv_tokens(), held as usize);
        // The next call says unknown; restarted, the sequence drafts like a fresh one.
        let d = core.propose(&req(vec![seq(1, held, vec![5], 4)])).unwrap();
        assert!(d.sequences[0].unknown);
        let again = core.propose(&req(vec![seq(1, 0, p.clone(), 4)])).unwrap();
        assert_eq!(again.sequences[0].tokens, first.sequences[0].tokens);
        // Merged calls share the failure.
        core.fail_forward_in = Some(0);
        let a = req(vec![seq(4, 0, p.clone(), 2)]);
        let b = req(vec![seq(5, 0, p.clone(), 2)]);
        let r = core.propose_many(&[&a, &b], Instant::now());
        assert!(r
            .iter()
            .all(|r| r.as_ref().unwrap_err().code() == tonic::Code::Internal));
        assert_eq!((core.held(4), core.held(5)), (None, None));
        assert_eq!(core.sequences(), 2);
    }
}
