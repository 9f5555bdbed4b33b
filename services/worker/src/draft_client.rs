//! The verifier's side of a remote draft service (`tandem.draft.v1.Drafter`): an engine
//! `Drafter` that keeps each sequence's draft KV in sync with what the verifier accepted, sends
//! only what changed, and degrades to plain decoding when the draft is down, slow or restarted.
//!
//! The engine thread calls `propose` synchronously once per step for all its sequences; the
//! call runs on the worker's tokio runtime with a deadline, so a stuck draft costs at most the
//! deadline and then a back-off during which the engine doesn't ask (output never changes,
//! only speed).
//!
//! A sequence's context reaches the draft in the background first (a Propose that drafts
//! nothing): prefilling a long prompt on the draft takes seconds on a CPU, and the verifier must
//! not wait for it. The sequence gets drafts from the step after its context is in, and no step
//! waits behind a background prefill (the draft serves calls in order): while one runs, steps
//! decode without drafts.
//!
//! A timed-out call may still run on the draft later; that is harmless, because every call
//! says which prefix to keep (`rollback_to`) and the draft never holds less than what this
//! side believes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::draft::{Draft, DraftRequest, Drafter};
use tandem_proto::draft::v1 as pb;
use tandem_proto::draft::v1::drafter_client::DrafterClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;

/// How the verifier talks to its draft service.
#[derive(Debug, Clone)]
pub struct DraftClientConfig {
    /// `http://host:port` of the draft service.
    pub endpoint: String,
    /// Deadline of one Propose call; past it the step decodes without drafts.
    pub timeout: Duration,
    /// The draft stops drafting a sequence when its top probability falls below this (BiLD).
    pub min_confidence: f32,
    /// How a sequence's context first reaches the draft.
    pub catch_up: CatchUp,
    /// TLS to the draft service (its CA, and this worker's certificate for a draft with mTLS).
    pub tls: Option<tandem_runtime::tls::ClientTls>,
}

/// How a sequence the draft doesn't hold yet gets its context there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CatchUp {
    /// Sent in the background; steps decode without drafts until it is in. Right when the
    /// draft shares slow hardware with the verifier (a long prompt's prefill on a CPU draft
    /// takes seconds that no step should wait for).
    #[default]
    Background,
    /// Sent in the step's own draft call, which waits for the draft's prefill: every step of
    /// an available draft drafts. Right when the draft's prefill is cheap (its own GPU), and
    /// what makes drafting independent of timing (tests, benchmarks of acceptance).
    Inline,
}

impl DraftClientConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("http://{endpoint}")
        };
        Self {
            endpoint,
            timeout: Duration::from_millis(1500),
            min_confidence: 0.3,
            catch_up: CatchUp::Background,
            tls: None,
        }
    }
}

/// Counters the worker's metrics read.
#[derive(Debug, Default)]
pub struct DraftClientStats {
    pub calls: AtomicU64,
    /// Calls that failed or passed their deadline (the step decoded without drafts).
    pub failures: AtomicU64,
    /// Sequences the draft did not hold (restart, eviction) and got resent whole.
    pub resent: AtomicU64,
    /// Steps the engine decoded without asking, because the draft was backing off.
    pub skipped: AtomicU64,
    /// Whether the draft is paired now (reachable, same tokenizer).
    pub paired: AtomicBool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PairingError {
    #[error(
        "the draft service at {endpoint} serves {draft_model} with tokenizer hash {draft_hash}, \
         but this model's tokenizer hash is {target_hash}: pair a draft that shares the target's \
         tokenizer (e.g. Qwen2.5-Coder-0.5B for Qwen2.5-Coder-1.5B)"
    )]
    TokenizerMismatch {
        endpoint: String,
        draft_model: String,
        draft_hash: String,
        target_hash: String,
    },
    #[error("draft endpoint {0:?} is not a valid URI: {1}")]
    BadEndpoint(String, String),
}

/// What the draft service holds for one sequence: the context up to `synced` (identical to the
/// verifier's) followed by `tail`, drafted tokens it ran through its KV.
#[derive(Debug, Clone, Default)]
struct SeqSync {
    synced: usize,
    tail: Vec<u32>,
}

/// Where a sequence's draft-side KV stands.
#[derive(Debug, Clone)]
enum SeqState {
    /// Its context is being sent in the background.
    Syncing,
    Synced(SeqSync),
}

/// Outcomes of background syncs: sequence → tokens the draft now holds, or the error.
type SyncResults = Arc<std::sync::Mutex<HashMap<u64, Result<usize, String>>>>;

/// The `Drafter` over a remote draft service.
pub struct RemoteDrafter {
    cfg: DraftClientConfig,
    client: DrafterClient<Channel>,
    runtime: Handle,
    target_hash: String,
    /// High bits of every sequence id: verifiers sharing a draft service never collide.
    instance: u64,
    seqs: HashMap<u64, SeqState>,
    synced: SyncResults,
    /// Background syncs in flight.
    syncing: Arc<std::sync::atomic::AtomicUsize>,
    /// No calls before this instant (back-off after failures); doubles per failure.
    backoff_until: Option<Instant>,
    backoff: Duration,
    /// Pairing must be (re)checked before the next call: at start and after failures (the
    /// draft may have been restarted with another model).
    needs_pairing: bool,
    refused: Option<PairingError>,
    /// Whether the last call only appended a step's worth of tokens per sequence.
    last_call_plain: bool,
    stats: Arc<DraftClientStats>,
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl RemoteDrafter {
    /// Connects lazily (a draft that is down at start is paired when it comes up). Must be
    /// called within a tokio runtime (its handle runs the calls).
    pub fn new(
        cfg: DraftClientConfig,
        target_hash: String,
        stats: Arc<DraftClientStats>,
    ) -> Result<Self, PairingError> {
        let channel = tandem_runtime::tls::endpoint(&cfg.endpoint, cfg.tls.as_ref())
            .map_err(|e| PairingError::BadEndpoint(cfg.endpoint.clone(), e))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let instance = u64::from(rand_u32());
        Ok(Self {
            client: DrafterClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            cfg,
            runtime: Handle::current(),
            target_hash,
            instance,
            seqs: HashMap::new(),
            synced: Arc::default(),
            syncing: Arc::default(),
            backoff_until: None,
            backoff: MIN_BACKOFF,
            needs_pairing: true,
            refused: None,
            last_call_plain: false,
            stats,
        })
    }

    /// Checks the draft's tokenizer now (used at worker start so a mismatch fails loudly).
    /// `Ok(false)`: the draft is not reachable yet; pairing is retried before drafting.
    pub fn pair_now(&mut self) -> Result<bool, PairingError> {
        match self.check_pairing() {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(e)) => Err(e),
        }
    }

    /// `Err(None)`: unreachable; `Err(Some)`: refused.
    fn check_pairing(&mut self) -> Result<(), Option<PairingError>> {
        let mut client = self.client.clone();
        let timeout = self.cfg.timeout.max(Duration::from_secs(2));
        let info = self.runtime.block_on(async move {
            tokio::time::timeout(timeout, client.info(pb::InfoRequest {})).await
        });
        let info = match info {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %self.cfg.endpoint, error = %e, "draft service Info failed");
                return Err(None);
            }
            Err(_) => return Err(None),
        };
        if info.tokenizer_hash != self.target_hash {
            let e = PairingError::TokenizerMismatch {
                endpoint: self.cfg.endpoint.clone(),
                draft_model: info.model,
                draft_hash: info.tokenizer_hash,
                target_hash: self.target_hash.clone(),
            };
            tracing::error!(error = %e, "refusing the draft service");
            self.refused = Some(e.clone());
            self.stats.paired.store(false, Ordering::Relaxed);
            return Err(Some(e));
        }
        tracing::info!(endpoint = %self.cfg.endpoint, model = %info.model, "draft service paired");
        self.needs_pairing = false;
        self.stats.paired.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn wire_id(&self, seq: u64) -> u64 {
        (self.instance << 32) | (seq & 0xffff_ffff)
    }

    fn fail(&mut self, why: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.stats.paired.store(false, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %self.cfg.endpoint,
            error = why,
            backoff_ms = self.backoff.as_millis() as u64,
            "draft service call failed; decoding without drafts meanwhile"
        );
        self.backoff_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        // It may come back restarted (then it answers `unknown` and contexts are resent) or
        // with another model: check it again before the next call.
        self.needs_pairing = true;
    }

    fn entry(&self, r: &DraftRequest<'_>) -> pb::SequenceDraftRequest {
        let (rollback_to, from) = match self.seqs.get(&r.seq) {
            Some(SeqState::Synced(s)) => {
                // Keep the drafted tokens the verifier accepted: they match the context.
                let extra = s
                    .tail
                    .iter()
                    .zip(r.context.get(s.synced..).unwrap_or(&[]))
                    .take_while(|(a, b)| a == b)
                    .count();
                let keep = (s.synced + extra).min(r.context.len().saturating_sub(1));
                (keep, keep)
            }
            _ => (0, 0),
        };
        let sampling = (r.sampling.temperature > 0.0).then_some(pb::DraftSampling {
            temperature: r.sampling.temperature,
            top_k: r.sampling.top_k as u32,
            top_p: r.sampling.top_p,
            seed: r.sampling.seed,
            max_q_tokens: 0,
        });
        pb::SequenceDraftRequest {
            sequence_id: self.wire_id(r.seq),
            rollback_to: rollback_to as u32,
            append: r.context[from..].to_vec(),
            max_tokens: r.max_tokens as u32,
            sampling,
            min_confidence: self.cfg.min_confidence,
            candidates: r.candidates as u32,
        }
    }

    /// Sends a sequence's whole context to the draft without waiting (a Propose drafting
    /// nothing); `collect_syncs` picks up the outcome on a later step.
    fn start_sync(&mut self, r: &DraftRequest<'_>) {
        self.seqs.insert(r.seq, SeqState::Syncing);
        let mut client = self.client.clone();
        let req = pb::ProposeRequest {
            sequences: vec![pb::SequenceDraftRequest {
                sequence_id: self.wire_id(r.seq),
                rollback_to: 0,
                append: r.context.to_vec(),
                max_tokens: 0,
                sampling: None,
                min_confidence: 0.0,
                candidates: 0,
            }],
        };
        let (seq, len) = (r.seq, r.context.len());
        let results = self.synced.clone();
        let syncing = self.syncing.clone();
        syncing.fetch_add(1, Ordering::Relaxed);
        // Generous: a long prompt's prefill on a CPU draft takes seconds, and nobody waits.
        let timeout = self.cfg.timeout.max(Duration::from_secs(60));
        self.runtime.spawn(async move {
            let res = match tokio::time::timeout(timeout, client.propose(req)).await {
                Ok(Ok(r)) => match r.into_inner().sequences.first() {
                    Some(d) if !d.unknown => Ok(len.min(d.held as usize)),
                    _ => Err("the draft did not keep the context".to_owned()),
                },
                Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
                Err(_) => Err("no answer".to_owned()),
            };
            if let Ok(mut m) = results.lock() {
                m.insert(seq, res);
            }
            syncing.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Applies the outcomes of finished background syncs.
    fn collect_syncs(&mut self) {
        let done: Vec<(u64, Result<usize, String>)> = match self.synced.lock() {
            Ok(mut m) => m.drain().collect(),
            Err(_) => return,
        };
        for (seq, res) in done {
            match (self.seqs.get(&seq), res) {
                (Some(SeqState::Syncing), Ok(held)) => {
                    self.seqs.insert(
                        seq,
                        SeqState::Synced(SeqSync {
                            synced: held,
                            tail: Vec::new(),
                        }),
                    );
                }
                (Some(SeqState::Syncing), Err(e)) => {
                    // Tried again on the sequence's next step.
                    tracing::debug!(seq, error = %e, "sending a context to the draft failed");
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.seqs.remove(&seq);
                }
                (None, Ok(_)) => {
                    // Released while its context was on the way: free it on the draft too.
                    self.release_remote(seq);
                }
                _ => {}
            }
        }
    }

    fn release_remote(&self, seq: u64) {
        let mut client = self.client.clone();
        let id = self.wire_id(seq);
        // Fire and forget: an unreleased sequence is evicted by the draft when idle.
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                client.release(pb::ReleaseRequest {
                    sequence_ids: vec![id],
                }),
            )
            .await;
        });
    }

    fn call(
        &mut self,
        req: pb::ProposeRequest,
        deadline: Instant,
    ) -> Result<pb::ProposeResponse, String> {
        let mut client = self.client.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.runtime.block_on(async move {
            match tokio::time::timeout(left, client.propose(req)).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
                Err(_) => Err(format!("no answer within {} ms", left.as_millis())),
            }
        })
    }
}

impl Drafter for RemoteDrafter {
    fn propose(&mut self, reqs: &[DraftRequest<'_>]) -> Vec<Draft> {
        let mut out = vec![Draft::default(); reqs.len()];
        if !self.available() || reqs.is_empty() {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return out;
        }
        if self.needs_pairing {
            match self.check_pairing() {
                Ok(()) => {}
                Err(None) => {
                    self.fail("not reachable");
                    return out;
                }
                Err(Some(_)) => return out,
            }
        }
        self.collect_syncs();
        // Sequences the draft doesn't hold yet get their context sent in the background, or
        // whole in this call (`entry` sends everything for a sequence it doesn't know).
        let mut ready = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            match self.seqs.get(&r.seq) {
                Some(SeqState::Synced(_)) => ready.push(i),
                Some(SeqState::Syncing) => {}
                None if self.cfg.catch_up == CatchUp::Inline => ready.push(i),
                None => self.start_sync(r),
            }
        }
        if ready.is_empty() || self.syncing.load(Ordering::Relaxed) > 0 {
            // Nothing to draft for, or the draft is busy prefilling: don't queue behind it.
            return out;
        }
        let deadline = Instant::now() + self.cfg.timeout;
        let entries: Vec<_> = ready.iter().map(|&i| self.entry(&reqs[i])).collect();
        // A step's worth: the accepted drafts and the verifier's token (at most k + 1).
        self.last_call_plain = entries
            .iter()
            .all(|e| e.append.len() <= e.max_tokens as usize + 2);
        let sent: Vec<usize> = entries
            .iter()
            .map(|e| e.rollback_to as usize + e.append.len())
            .collect();
        let resp = match self.call(pb::ProposeRequest { sequences: entries }, deadline) {
            Ok(r) => r,
            Err(e) => {
                self.fail(&e);
                return out;
            }
        };
        // A healthy call ends any back-off.
        self.backoff = MIN_BACKOFF;
        let mut results = resp.sequences.into_iter();
        for (n, &i) in ready.iter().enumerate() {
            let r = &reqs[i];
            let Some(d) = results.next().filter(|d| !d.unknown) else {
                // The draft restarted or evicted it: resend its context (in the background).
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
                self.seqs.remove(&r.seq);
                continue;
            };
            let synced = sent[n];
            let held = d.held as usize;
            let tail_len = held.saturating_sub(synced).min(d.tokens.len());
            self.seqs.insert(
                r.seq,
                SeqState::Synced(SeqSync {
                    synced: synced.min(held),
                    tail: d.tokens[..tail_len].to_vec(),
                }),
            );
            let alternatives = d
                .alternatives
                .into_iter()
                .take(r.candidates.saturating_sub(1))
                .map(|a| to_draft(&a.tokens, r.max_tokens))
                .collect();
            out[i] = Draft {
                alternatives,
                ..to_draft(&d.tokens, r.max_tokens)
            };
        }
        out
    }

    fn feedback(&mut self, _seq: u64, _proposed: usize, _accepted: usize) {}

    fn release(&mut self, seq: u64) {
        if let Some(SeqState::Synced(_)) = self.seqs.remove(&seq) {
            self.release_remote(seq);
        }
    }

    fn busy(&self) -> bool {
        self.syncing.load(Ordering::Relaxed) > 0
    }

    fn last_call_measures_drafting(&self) -> bool {
        self.last_call_plain
    }

    fn available(&self) -> bool {
        self.refused.is_none() && self.backoff_until.is_none_or(|t| Instant::now() >= t)
    }
}

/// A random instance id without pulling in an RNG crate: std's hasher is randomly keyed per
/// process.
fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// One candidate from the wire: at most `max` tokens, each with its sparse q (a token without
/// its q is dropped with everything after it).
/// The draft service's tokens, at most `max`. Its q (the distributions it drew from) is not
/// needed: verification matches the target's own tokens.
fn to_draft(tokens: &[u32], max: usize) -> Draft {
    Draft {
        tokens: tokens[..tokens.len().min(max)].to_vec(),
        alternatives: Vec::new(),
    }
}
