//! Per-sequence token sampling: penalties, temperature, top-k, top-p, min-p and a seeded draw.
//!
//! Logits arrive as one `&[f32]` vocabulary row, independent of the model. The pipeline is
//! penalties → temperature → top-k → top-p → min-p → renormalise → draw, matching HF / vLLM
//! semantics.
//!
//! The draw is a function of (seed, position, logits) alone, with no RNG stream: an exponential
//! race (Gumbel-max), token t winning where E_t / w_t is smallest, E_t = −ln U and U a hash of
//! (seed, position, t). It draws t with probability w_t / Σw exactly, and:
//! - a request's tokens don't depend on how many random numbers other steps used, so seeded
//!   output is the same batched or alone, with speculation or without, and after a request is
//!   resumed elsewhere from its tokens so far;
//! - speculative verification of sampled drafts becomes an exact match, as for greedy: the
//!   target's token at a position is fixed before any draft is seen, and a draft that races its
//!   own probabilities with the same noise (`race`) proposes it whenever the two models
//!   agree closely enough (Gumbel coupling).
//!
//! It is written for large vocabularies (Qwen's 151 936) and many concurrent sequences: every
//! full-vocabulary pass is linear and written to auto-vectorise (libm's `expf` alone would cost
//! ~0.5 ms a step), partial selection replaces full sorts where it can, and the vocabulary-sized
//! scratch buffers are per thread rather than per sequence, so a `Sampler` stays small and a
//! step does not allocate.

use std::cell::Cell;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// Temperatures below this are greedy: dividing by ~0 overflows the logits, and the limit
/// distribution is a point mass on the argmax anyway (vLLM uses the same epsilon).
const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// First window of the partial sort used by top-p. The nucleus is usually a few dozen tokens,
/// so sorting a small window after an O(n) selection avoids sorting the whole vocabulary; the
/// window grows ×8 whenever the nucleus is not yet covered.
const TOP_P_FIRST_WINDOW: usize = 64;

/// Thresholds 1/16, 1/256, … tried to bound the top-p nucleus before materialising candidates.
const TOP_P_PRUNE_STEPS: usize = 5;

/// Independent accumulators in reductions (one AVX register of f32), so they vectorise instead
/// of forming one long dependency chain.
const LANES: usize = 8;

/// Exponentials are computed this many at a time into a stack buffer before being summed: a
/// plain map loop vectorises far better than a fused exp-and-accumulate loop.
const EXP_BLOCK: usize = 256;

/// How to pick the next token. The default is greedy decoding with every filter off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; values below 1e-5 (and NaN) mean greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass is ≥ `top_p`; 1.0 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` × the top probability; 0 = off.
    pub min_p: f32,
    /// HF repetition penalty over prompt and generated tokens; 1.0 = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens; 0 = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens; 0 = off.
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Number of best alternatives to report with each sampled token; 0 = none.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Whether the choice is deterministic (argmax of the penalised logits): a (near-)zero
    /// temperature, or `top_k == 1`, which leaves a point mass on the argmax whatever follows.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE_EPS || self.top_k == 1
    }
}

/// One sampled token with the model's view of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-softmax of the penalised logits at temperature 1 (what OpenAI reports), not the
    /// probability under the filtered distribution actually drawn from.
    pub logprob: f32,
    /// The `top_logprobs` best `(token, logprob)` on the same scale, best first, ties by lower
    /// id; tokens with logprob −∞ are never listed.
    pub top: Vec<(u32, f32)>,
}

/// Sampling state of one sequence: its parameters, its seed, the position of its next token and
/// the token history the penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// The request's seed, or one from OS entropy.
    seed: u64,
    /// Position in the whole sequence (prompt included) of the next token.
    position: u64,
    /// Distinct prompt and generated tokens: the repetition penalty's set (HF counts the prompt).
    seen: HashSet<u32>,
    /// Occurrences of each generated token: presence / frequency penalties (OpenAI counts only
    /// generated tokens).
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `prompt` seeds the repetition penalty's token set.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(os_seed);
        Self {
            params,
            seed,
            position: prompt.len() as u64,
            seen: prompt.iter().copied().collect(),
            counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed of this sequence's draws (a drafter racing with the same noise proposes the
    /// target's own draw where the two distributions agree).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from one row of logits and records it for the penalties.
    ///
    /// NaN logits count as −∞. If every logit is masked (or the row is empty) the result is
    /// token 0 with logprob −∞, which the caller should treat as a model fault.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let sampled = with_scratch(|scratch| {
            let Scratch {
                penalized,
                weights,
                candidates,
            } = scratch;
            self.penalize_into(logits, penalized);
            let pen = &*penalized;
            let max = max_value(pen);
            let lse = log_sum_exp(pen, max);
            if lse == f32::NEG_INFINITY {
                tracing::warn!(
                    vocab = logits.len(),
                    "all logits masked or empty; sampling token 0"
                );
            }
            let (seed, position) = (self.seed, self.position);
            let token = if self.params.is_greedy() {
                argmax(pen, max)
            } else {
                match filter_candidates(&self.params, pen, max, weights, candidates) {
                    Some(Filtered::Dense) => race(
                        weights.iter().enumerate().map(|(i, &w)| (i as u32, w)),
                        seed,
                        position,
                    ),
                    Some(Filtered::Sparse { .. }) => {
                        race(candidates.iter().copied(), seed, position)
                    }
                    None => argmax(pen, max),
                }
            };
            let logprob = pen
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| logprob(l, lse));
            Sampled {
                token,
                logprob,
                top: top_logprobs(pen, self.params.top_logprobs, lse),
            }
        });
        self.accept(sampled.token);
        sampled
    }

    /// The final distribution `sample` would draw from for these logits, after every transform
    /// and renormalisation, as `(token, prob)` sorted by probability descending (ties by lower
    /// id). Only tokens with nonzero probability are listed. Greedy parameters give the argmax
    /// with probability 1; an empty row gives an empty distribution. Touches neither the RNG nor
    /// the history.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        if logits.is_empty() {
            return Vec::new();
        }
        with_scratch(|scratch| {
            let Scratch {
                penalized,
                weights,
                candidates: cands,
                ..
            } = scratch;
            self.penalize_into(logits, penalized);
            let max = max_value(penalized);
            if self.params.is_greedy() {
                return vec![(argmax(penalized, max), 1.0)];
            }
            let Some(filtered) = filter_candidates(&self.params, penalized, max, weights, cands)
            else {
                return vec![(argmax(penalized, max), 1.0)];
            };
            match filtered {
                Filtered::Dense => {
                    cands.clear();
                    cands.extend(
                        weights
                            .iter()
                            .enumerate()
                            .filter(|&(_, &w)| w > 0.0)
                            .map(|(i, &w)| (i as u32, w)),
                    );
                    cands.sort_unstable_by(by_value_desc);
                }
                Filtered::Sparse { sorted: false } => cands.sort_unstable_by(by_value_desc),
                Filtered::Sparse { sorted: true } => {}
            }
            let total = sum_weights(cands);
            cands
                .iter()
                .map(|&(t, w)| (t, (f64::from(w) / total) as f32))
                .collect()
        })
    }

    /// Reports `token`, chosen by the verifier instead of drawn here, exactly as `sample` would
    /// have reported it (logprob, top alternatives), and records it for the penalties.
    pub fn observe(&mut self, logits: &[f32], token: u32) -> Sampled {
        let sampled = with_scratch(|scratch| {
            self.penalize_into(logits, &mut scratch.penalized);
            let pen = &scratch.penalized;
            let lse = log_sum_exp(pen, max_value(pen));
            Sampled {
                token,
                logprob: pen
                    .get(token as usize)
                    .map_or(f32::NEG_INFINITY, |&l| logprob(l, lse)),
                top: top_logprobs(pen, self.params.top_logprobs, lse),
            }
        });
        self.accept(token);
        sampled
    }

    /// Records a token chosen elsewhere (e.g. accepted by speculative decoding) for the penalties.
    pub fn accept(&mut self, token: u32) {
        self.position += 1;
        self.seen.insert(token);
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Copies `logits` into `out` with NaN masked, +∞ clamped (so max subtraction never computes
    /// ∞ − ∞) and the penalties applied.
    fn penalize_into(&self, logits: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.extend(logits.iter().map(|&l| sanitize(l)));

        let rp = self.params.repetition_penalty;
        if rp != 1.0 && rp.is_finite() && rp > 0.0 {
            for &t in &self.seen {
                if let Some(l) = out.get_mut(t as usize) {
                    // HF: shrink positive logits, push negative ones further down.
                    *l = sanitize(if *l > 0.0 { *l / rp } else { *l * rp });
                }
            }
        }

        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&t, &count) in &self.counts {
                if let Some(l) = out.get_mut(t as usize) {
                    *l = sanitize(*l - (fp * count as f32 + pp));
                }
            }
        }
    }
}

/// Vocabulary-sized working memory, one set per thread (see `with_scratch`).
#[derive(Default)]
struct Scratch {
    penalized: Vec<f32>,
    weights: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers. They are moved out of the `Cell` and back, so
/// nothing can panic: a nested call (none exists) or a call during thread teardown just gets
/// fresh, empty buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    let result = f(&mut scratch);
    // Ignoring the error is right: during teardown there is nowhere to keep the buffers.
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

/// A seed from OS entropy; if that fails (it should not), from the clock, since sampling
/// quality does not depend on cryptographic seeding.
fn os_seed() -> u64 {
    use rand::TryRngCore as _;
    let mut buf = [0u8; 8];
    match rand::rngs::OsRng.try_fill_bytes(&mut buf) {
        Ok(()) => u64::from_le_bytes(buf),
        Err(err) => {
            tracing::warn!(%err, "OS entropy unavailable; seeding sampler from the clock");
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (nanos as u64) ^ ((nanos >> 64) as u64)
        }
    }
}

fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l.min(f32::MAX)
    }
}

/// Temperature scaling kept finite: overflow saturates, and −∞ (masked) maps to −MAX, whose
/// weight is 0 anyway, as does the NaN of −∞ · 0 (infinite temperature).
fn scale_logit(l: f32, inv_t: f32) -> f32 {
    let s = l * inv_t;
    if s.is_nan() {
        -f32::MAX
    } else {
        s.clamp(-f32::MAX, f32::MAX)
    }
}

/// Orders `(token, value)` by value descending, then token ascending: a strict total order, so
/// selection and sorting are deterministic and ties go to the lowest id like greedy does.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the first occurrence of `max` (the row's maximum): the argmax with ties to the
/// lowest id; 0 when empty or all −∞.
fn argmax(v: &[f32], max: f32) -> u32 {
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// Largest value (−∞ when empty), for NaN-free input (see `sanitize`).
fn max_value(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = if x > *l { x } else { *l };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// log Σ exp(v) given `max = max_value(v)`; −∞ when `v` is empty or all −∞.
fn log_sum_exp(v: &[f32], max: f32) -> f32 {
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let mut buf = [0f32; EXP_BLOCK];
    let mut sum = 0f64;
    for chunk in v.chunks(EXP_BLOCK) {
        let buf = &mut buf[..chunk.len()];
        for (b, &x) in buf.iter_mut().zip(chunk) {
            *b = exp_nonpos(x - max);
        }
        sum += lane_sum(buf, |&w| w);
    }
    max + sum.ln() as f32
}

/// Σ weight(item) in f64 lanes: accurate over ~150k terms without a serial add chain.
#[inline]
fn lane_sum<T>(items: &[T], weight: impl Fn(&T) -> f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = items.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, item) in lanes.iter_mut().zip(chunk) {
            *l += f64::from(weight(item));
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|item| f64::from(weight(item))).sum::<f64>()
}

fn sum_weights(cands: &[(u32, f32)]) -> f64 {
    lane_sum(cands, |c| c.1)
}

/// `exp(x)` for `x ≤ 0` (larger inputs are treated as 0), including −∞ → 0; results below
/// e^−87 are flushed to 0, otherwise within ~1e-7 relative. libm's `expf` is an opaque scalar
/// call, so this is branch-free arithmetic the compiler can vectorise (Cephes' `expf`):
/// x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact reduction), e^r by a
/// polynomial, 2^n built directly in the exponent bits.
#[inline]
fn exp_nonpos(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4; // = 0.693359375, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.0, 0.0);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let y = 1.987_569_1e-4f32;
    let y = y * r + 1.398_199_9e-3;
    let y = y * r + 8.333_452e-3;
    let y = y * r + 4.166_579_6e-2;
    let y = y * r + 1.666_666_5e-1;
    let y = y * r + 0.5;
    let e_r = y * r * r + r + 1.0;
    // n ∈ [-126, 0], so the biased exponent n + 127 is a normal one.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    // A bit mask rather than `if`, which the optimiser may turn into a branch that blocks
    // vectorisation.
    let keep = 0u32.wrapping_sub(u32::from(x >= -87.0));
    f32::from_bits((e_r * scale).to_bits() & keep)
}

fn logprob(l: f32, lse: f32) -> f32 {
    if lse == f32::NEG_INFINITY {
        f32::NEG_INFINITY
    } else {
        l - lse
    }
}

/// The `n` best finite logits as logprobs, via a small sorted insertion buffer: one linear pass
/// with no vocab-sized allocation (n is small, ≤ 20 in the OpenAI API).
fn top_logprobs(pen: &[f32], n: usize, lse: f32) -> Vec<(u32, f32)> {
    let n = n.min(pen.len());
    if n == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &x) in pen.iter().enumerate() {
        if x == f32::NEG_INFINITY {
            continue;
        }
        if best.len() == n && best.last().is_some_and(|&(_, worst)| x <= worst) {
            continue;
        }
        // After any equal values: earlier (lower) ids win ties.
        let pos = best.partition_point(|&(_, y)| y >= x);
        best.insert(pos, (i as u32, x));
        best.truncate(n);
    }
    for b in &mut best {
        b.1 = logprob(b.1, lse);
    }
    best
}

/// Where `filter_candidates` left the distribution to draw from.
enum Filtered {
    /// No filter applies: the weight of token `i` is `weights[i]`, zeros included.
    Dense,
    /// The surviving `(token, weight)` pairs, all weights positive, in `cands`; `sorted` if by
    /// weight descending.
    Sparse { sorted: bool },
}

/// Applies temperature, top-k, top-p and min-p to the penalised logits `pen` (whose maximum is
/// `max`), leaving unnormalised weights `exp(l/T − max/T)` in `weights` or `cands`. Returns
/// `None` when no token has a finite logit.
fn filter_candidates(
    params: &SamplingParams,
    pen: &[f32],
    max: f32,
    weights: &mut Vec<f32>,
    cands: &mut Vec<(u32, f32)>,
) -> Option<Filtered> {
    if max == f32::NEG_INFINITY {
        return None;
    }
    let inv_t = 1.0 / params.temperature;
    let scaled_max = scale_logit(max, inv_t);
    let use_min_p = params.min_p > 0.0;
    let use_top_p = params.top_p < 1.0;

    // Min-p: prob ≥ min_p · max_prob ⇔ weight ≥ min_p, because the top weight is exactly 1.
    // The survivors are a prefix of the weight order, so filtering before top-p gives the same
    // result as after it, provided top-p keeps normalising by the pre-min-p mass (it does).
    let min_weight = if use_min_p {
        params.min_p.min(1.0)
    } else {
        0.0
    };

    let k = params.top_k;
    let mut sorted = false;
    // `z` normalises the post-top-k distribution that top-p is defined on; `target` is the
    // top-p mass in the same unnormalised units.
    let z;
    if k > 0 && k < pen.len() {
        // Top-k before any exponential: temperature scaling is monotone, so the k best logits
        // are the k best scaled ones.
        top_k_into(pen, k, cands);
        for c in cands.iter_mut() {
            c.1 = exp_nonpos(scale_logit(c.1, inv_t) - scaled_max);
        }
        cands.retain(|c| c.1 > 0.0);
        z = sum_weights(cands);
        cands.retain(|c| c.1 >= min_weight);
        sorted = true;
    } else {
        // Whole vocabulary: exponentiate in one contiguous (vectorised) pass. Masked tokens and
        // underflows below e^-87 get weight 0.
        weights.clear();
        weights.extend(
            pen.iter()
                .map(|&l| exp_nonpos(scale_logit(l, inv_t) - scaled_max)),
        );
        if !use_min_p && !use_top_p {
            return Some(Filtered::Dense);
        }
        z = lane_sum(weights, |&w| w);
        // Only materialise tokens that can survive: above the min-p weight and, for top-p, above
        // the largest of a few thresholds whose tokens already hold the top-p mass (the nucleus
        // is a prefix of the weight order, so it lies inside). Typical nuclei then cost a few
        // vectorised passes instead of selecting over the whole vocabulary.
        let mut floor = min_weight;
        if use_top_p {
            let target = f64::from(params.top_p.max(0.0)) * z;
            let mut tau = 1.0 / 16.0;
            for _ in 0..TOP_P_PRUNE_STEPS {
                if tau <= floor {
                    break;
                }
                if lane_sum(weights, |&w| if w >= tau { w } else { 0.0 }) >= target {
                    floor = tau;
                    break;
                }
                tau /= 16.0;
            }
        }
        cands.clear();
        cands.extend(
            weights
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w > 0.0 && w >= floor)
                .map(|(i, &w)| (i as u32, w)),
        );
    }

    // Top-p: smallest prefix (by weight) with mass ≥ top_p, at least one token.
    if use_top_p {
        let target = f64::from(params.top_p.max(0.0)) * z;
        let mut cum = 0f64;
        let mut done = 0usize;
        let mut window = TOP_P_FIRST_WINDOW;
        let mut cut = None;
        while done < cands.len() && cut.is_none() {
            let end = done.saturating_add(window).min(cands.len());
            if !sorted {
                // Bring the next best (end − done) tokens to the front of the unsorted tail,
                // then sort just them; earlier windows stay put.
                let tail = &mut cands[done..];
                if end < done + tail.len() {
                    tail.select_nth_unstable_by(end - done - 1, by_value_desc);
                }
                cands[done..end].sort_unstable_by(by_value_desc);
            }
            for (i, c) in cands[done..end].iter().enumerate() {
                cum += f64::from(c.1);
                if cum >= target {
                    cut = Some(done + i + 1);
                    break;
                }
            }
            done = end;
            window = window.saturating_mul(8);
        }
        if let Some(cut) = cut {
            cands.truncate(cut);
        }
        // Either cut inside a sorted prefix or the loop sorted everything.
        sorted = true;
    }

    (!cands.is_empty()).then_some(Filtered::Sparse { sorted })
}

/// The `k` best finite `(token, logit)` pairs, sorted by `by_value_desc`, in one streaming pass:
/// only logits above the current k-th best are buffered, and the buffer is cut back to k
/// whenever it fills. Far cheaper than materialising and selecting over the whole vocabulary.
fn top_k_into(pen: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    let capacity = k.saturating_mul(2).max(256);
    let mut threshold = f32::NEG_INFINITY;
    for (i, &l) in pen.iter().enumerate() {
        // Strict: a later token equal to the k-th best loses the tie (higher id).
        if l > threshold {
            out.push((i as u32, l));
            if out.len() >= capacity {
                out.select_nth_unstable_by(k - 1, by_value_desc);
                out.truncate(k);
                threshold = out.last().map_or(threshold, |c| c.1);
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by_value_desc);
        out.truncate(k);
    }
    out.sort_unstable_by(by_value_desc);
}

/// The exponential race over `(token, weight)` pairs: the token with the smallest
/// E_t / w_t, E_t = −ln U(seed, position, t), which is token t with probability w_t / Σw
/// (weights need not be normalised). Zero weights never win; no positive weight: token 0.
pub fn race(items: impl Iterator<Item = (u32, f32)>, seed: u64, position: u64) -> u32 {
    let mut best = (0u32, f64::INFINITY);
    for (t, w) in items {
        if w <= 0.0 {
            continue;
        }
        let w = f64::from(w);
        let u = race_uniform(seed, position, t);
        // E = −ln U ≥ 1 − U: where that bound already loses, skip the logarithm (most of a
        // 150k vocabulary, whose weights are tiny). Exact: a skipped key could not have won.
        if 1.0 - u >= best.1 * w {
            continue;
        }
        let key = -u.ln() / w;
        if key < best.1 {
            best = (t, key);
        }
    }
    best.0
}

/// U in (0, 1) from a hash of (seed, position, token): the noise of the race. Counter-based
/// (SplitMix64's finalizer, three rounds) rather than an RNG stream, so any position's noise
/// is known without drawing the ones before it.
fn race_uniform(seed: u64, position: u64, token: u32) -> f64 {
    let h = mix(
        mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(position))
            .wrapping_add(u64::from(token)),
    );
    // 53 random bits, centred in their interval: never 0 or 1.
    ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The race with its logarithm-skipping bound picks what the plain argmin of −ln U / w
    /// picks, and draws each token with probability w / Σw (chi-square over positions).
    #[test]
    fn race_is_the_exponential_race_and_draws_the_weights() {
        let weights: Vec<(u32, f32)> = vec![(0, 0.5), (1, 0.25), (2, 0.125), (3, 0.0), (4, 0.125)];
        let mut counts = [0u64; 5];
        const N: u64 = 40_000;
        for position in 0..N {
            let t = race(weights.iter().copied(), 42, position);
            let naive = weights
                .iter()
                .filter(|e| e.1 > 0.0)
                .map(|&(t, w)| (t, -race_uniform(42, position, t).ln() / f64::from(w)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0;
            assert_eq!(t, naive, "position {position}");
            counts[t as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        let chi: f64 = [0usize, 1, 2, 4]
            .iter()
            .map(|&i| {
                let e = f64::from(weights[i].1) * N as f64;
                (counts[i] as f64 - e).powi(2) / e
            })
            .sum();
        // 3 degrees of freedom, p = 0.001.
        assert!(chi < 16.3, "chi2 {chi}: {counts:?}");
        // A function of (seed, position): the same again, another seed differs somewhere.
        let again: Vec<u32> = (0..64)
            .map(|p| race(weights.iter().copied(), 42, p))
            .collect();
        let first: Vec<u32> = (0..64)
            .map(|p| race(weights.iter().copied(), 42, p))
            .collect();
        let other: Vec<u32> = (0..64)
            .map(|p| race(weights.iter().copied(), 43, p))
            .collect();
        assert_eq!(again, first);
        assert_ne!(other, first);
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(1234),
            ..SamplingParams::default()
        }
    }

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
    }

    /// Straightforward reference: softmax at T, then top-k, top-p, min-p on renormalised probs.
    fn reference(logits: &[f32], t: f64, top_k: usize, top_p: f64, min_p: f64) -> Vec<f64> {
        let n = logits.len();
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
        let mut p: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / t).exp())
            .collect();
        let renorm = |p: &mut Vec<f64>| {
            let s: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= s);
        };
        renorm(&mut p);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        if top_k > 0 && top_k < n {
            for &i in &order[top_k..] {
                p[i] = 0.0;
            }
            renorm(&mut p);
        }
        if top_p < 1.0 {
            let mut cum = 0.0;
            let mut reached = false;
            for &i in &order {
                if reached {
                    p[i] = 0.0;
                } else {
                    cum += p[i];
                    reached = cum >= top_p;
                }
            }
            renorm(&mut p);
        }
        if min_p > 0.0 {
            let pmax = p.iter().cloned().fold(0.0, f64::max);
            p.iter_mut().for_each(|x| {
                if *x < min_p * pmax {
                    *x = 0.0
                }
            });
            renorm(&mut p);
        }
        p
    }

    /// Chi-square critical values at the 0.999 quantile, by degrees of freedom 1..=10.
    const CHI2_999: [f64; 10] = [
        10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
    ];

    fn chi_square_check(sp: SamplingParams, logits: &[f32], expected: &[f64]) {
        const DRAWS: usize = 20_000;
        let mut sampler = Sampler::new(sp, &[]);
        let mut observed = vec![0u64; logits.len()];
        for _ in 0..DRAWS {
            observed[sampler.sample(logits).token as usize] += 1;
        }
        let mut stat = 0.0;
        let mut categories = 0;
        for (i, (&o, &p)) in observed.iter().zip(expected).enumerate() {
            if p == 0.0 {
                assert_eq!(o, 0, "token {i} is outside the allowed set but was drawn");
                continue;
            }
            let e = p * DRAWS as f64;
            assert!(e >= 5.0, "expected count too small for chi-square");
            stat += (o as f64 - e).powi(2) / e;
            categories += 1;
        }
        let df = categories - 1;
        assert!(df >= 1);
        let critical = CHI2_999[df - 1];
        assert!(
            stat < critical,
            "chi-square {stat:.3} ≥ {critical} (df {df}); observed {observed:?}, expected {expected:?}"
        );
    }

    const CHI_LOGITS: [f32; 8] = [1.5, 1.0, 0.6, 0.2, 0.0, -0.4, -0.9, -1.5];

    #[test]
    fn chi_square_temperature() {
        let expected = reference(&CHI_LOGITS, 0.7, 0, 1.0, 0.0);
        assert!(expected.iter().all(|&p| p > 0.0));
        chi_square_check(params(0.7), &CHI_LOGITS, &expected);
    }

    #[test]
    fn chi_square_top_k() {
        let expected = reference(&CHI_LOGITS, 1.0, 3, 1.0, 0.0);
        assert_eq!(expected.iter().filter(|&&p| p > 0.0).count(), 3);
        let sp = SamplingParams {
            top_k: 3,
            ..params(1.0)
        };
        chi_square_check(sp, &CHI_LOGITS, &expected);
    }

    #[test]
    fn chi_square_top_p() {
        let expected = reference(&CHI_LOGITS, 1.0, 0, 0.8, 0.0);
        assert_eq!(expected.iter().filter(|&&p| p > 0.0).count(), 4);
        let sp = SamplingParams {
            top_p: 0.8,
            ..params(1.0)
        };
        chi_square_check(sp, &CHI_LOGITS, &expected);
    }

    #[test]
    fn chi_square_min_p() {
        let expected = reference(&CHI_LOGITS, 1.0, 0, 1.0, 0.1);
        assert_eq!(expected.iter().filter(|&&p| p > 0.0).count(), 6);
        let sp = SamplingParams {
            min_p: 0.1,
            ..params(1.0)
        };
        chi_square_check(sp, &CHI_LOGITS, &expected);
    }

    #[test]
    fn chi_square_combined() {
        let expected = reference(&CHI_LOGITS, 0.8, 6, 0.95, 0.1);
        let sp = SamplingParams {
            top_k: 6,
            top_p: 0.95,
            min_p: 0.1,
            ..params(0.8)
        };
        chi_square_check(sp, &CHI_LOGITS, &expected);
    }

    /// The blocked draw over a whole vocabulary of several draw blocks: the mass sits on 8
    /// tokens spread over different blocks; the rest (weights ~e^-35) must practically never be
    /// drawn. Unfiltered (unsorted candidates) and top-p (sorted) paths.
    #[test]
    fn chi_square_large_vocab_blocked_draw() {
        const DRAWS: usize = 10_000;
        let hot: [usize; 8] = [3, 100, 200, 290, 400, 470, 530, 599];
        let mut logits = vec![-30.0f32; 600];
        for (i, &h) in hot.iter().enumerate() {
            logits[h] = CHI_LOGITS[i] + 4.0;
        }
        for (t, top_p) in [(0.7f32, 1.0f32), (1.0, 0.8)] {
            let expected = reference(&logits, t as f64, 0, top_p as f64, 0.0);
            // Compare over the hot tokens (the cold ones' expected count is ~1e-8 in total).
            let e: Vec<f64> = hot.iter().map(|&h| expected[h]).collect();
            let sum: f64 = e.iter().sum();
            let e: Vec<f64> = e.iter().map(|p| p / sum).collect();
            let sp = SamplingParams { top_p, ..params(t) };
            let mut sampler = Sampler::new(sp.clone(), &[]);
            let mut observed = vec![0u64; hot.len()];
            for _ in 0..DRAWS {
                let tok = sampler.sample(&logits).token as usize;
                let i = hot.iter().position(|&h| h == tok).unwrap();
                observed[i] += 1;
            }
            let stat: f64 = observed
                .iter()
                .zip(&e)
                .filter(|(_, &p)| p > 0.0)
                .map(|(&o, &p)| (o as f64 - p * DRAWS as f64).powi(2) / (p * DRAWS as f64))
                .sum();
            let df = e.iter().filter(|&&p| p > 0.0).count() - 1;
            assert!(stat < CHI2_999[df - 1], "{sp:?}: {stat} {observed:?}");
            for (o, p) in observed.iter().zip(&e) {
                assert!(*p > 0.0 || *o == 0);
            }
        }
    }

    #[test]
    fn streaming_top_k_matches_sort() {
        let mut rng = StdRng::seed_from_u64(9);
        // Random, heavily tied, ascending (worst case for the threshold) and masked rows.
        let rows: Vec<Vec<f32>> = vec![
            random_logits(3000, 1),
            (0..3000)
                .map(|_| (rng.random::<f32>() * 4.0).floor())
                .collect(),
            (0..3000).map(|i| i as f32 * 0.01).collect(),
            (0..3000)
                .map(|i| if i % 7 == 0 { 1.0 } else { f32::NEG_INFINITY })
                .collect(),
        ];
        for row in &rows {
            for k in [1, 2, 5, 50, 129, 300, 2999, 5000] {
                let mut want: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l > f32::NEG_INFINITY)
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                want.sort_by(by_value_desc);
                want.truncate(k);
                let mut got = Vec::new();
                top_k_into(row, k, &mut got);
                assert_eq!(got, want, "k = {k}");
            }
        }
    }

    #[test]
    fn exp_kernel_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let got = exp_nonpos(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(-f32::MAX), 0.0);
        let v = random_logits(10_001, 3);
        let max = max_value(&v);
        let naive = v
            .iter()
            .map(|&x| (x as f64 - max as f64).exp())
            .sum::<f64>()
            .ln()
            + max as f64;
        assert!((log_sum_exp(&v, max) as f64 - naive).abs() < 1e-5);
        assert_eq!(max, v.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = random_logits(1000, 7);
        let sp = SamplingParams {
            top_p: 0.95,
            ..params(1.0)
        };
        let mut a = Sampler::new(sp.clone(), &[1, 2, 3]);
        let mut b = Sampler::new(sp.clone(), &[1, 2, 3]);
        let da: Vec<u32> = (0..200).map(|_| a.sample(&logits).token).collect();
        let db: Vec<u32> = (0..200).map(|_| b.sample(&logits).token).collect();
        assert_eq!(da, db);
        let mut c = Sampler::new(
            SamplingParams {
                seed: Some(99),
                ..sp
            },
            &[1, 2, 3],
        );
        let dc: Vec<u32> = (0..200).map(|_| c.sample(&logits).token).collect();
        assert_ne!(da, dc, "a different seed should give a different sequence");
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert!(s.params().is_greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]).token, 1);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0, 3.0]).token, 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN]).token, 1);
        let d = s.distribution(&[0.1, 3.0, -1.0, 3.0]);
        assert_eq!(d, vec![(1, 1.0)]);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut greedy = Sampler::new(SamplingParams::default(), &[]);
        let mut k1 = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params(1.5)
            },
            &[],
        );
        for seed in 0..50 {
            let mut logits = random_logits(3000, seed);
            // Plant a tie for the maximum.
            logits[2000] = 10.0;
            logits[1000] = 10.0;
            assert_eq!(k1.sample(&logits).token, greedy.sample(&logits).token);
            assert_eq!(greedy.sample(&logits).token, 1000);
        }
        // Also through the sampling path (is_greedy short-circuits top_k == 1).
        let mut filter = [(0u32, 0f32); 0].to_vec();
        let p = SamplingParams {
            top_k: 1,
            ..params(1.5)
        };
        let pen = [1.0, 5.0, 5.0, 2.0];
        let f = filter_candidates(&p, &pen, 5.0, &mut Vec::new(), &mut filter).unwrap();
        assert!(matches!(f, Filtered::Sparse { sorted: true }));
        assert_eq!(filter, vec![(1, 1.0)]);
    }

    #[test]
    fn repetition_penalty_uses_prompt() {
        let logits = [1.0, 0.9, -0.5, -0.6];
        let sp = SamplingParams {
            repetition_penalty: 1.2,
            ..SamplingParams::default()
        };
        // 1.0 / 1.2 = 0.833 < 0.9.
        assert_eq!(Sampler::new(sp.clone(), &[0]).sample(&logits).token, 1);
        assert_eq!(Sampler::new(sp.clone(), &[]).sample(&logits).token, 0);
        // Negative logits are multiplied: -0.5 * 1.2 = -0.6 ties -0.6 → lowest id among them.
        let neg = [-0.5, -0.55];
        assert_eq!(Sampler::new(sp.clone(), &[0]).sample(&neg).token, 1);
        // Generated tokens count too.
        let mut s = Sampler::new(sp, &[]);
        assert_eq!(s.sample(&logits).token, 0);
        assert_eq!(s.sample(&logits).token, 1);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_only() {
        let logits = [1.0, 0.7, 0.0];
        let presence = SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::default()
        };
        // The prompt does not count for presence.
        let mut s = Sampler::new(presence, &[0, 0, 0]);
        assert_eq!(s.sample(&logits).token, 0);
        // Now 0 was generated once: 1.0 - 0.5 = 0.5 < 0.7.
        assert_eq!(s.sample(&logits).token, 1);
        // Both penalised once: 0.5 vs 0.2 → 0.
        assert_eq!(s.sample(&logits).token, 0);

        let frequency = SamplingParams {
            frequency_penalty: 0.2,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(frequency, &[]);
        s.accept(0);
        // 1.0 - 0.2 = 0.8 > 0.7.
        assert_eq!(s.sample(&logits).token, 0);
        // 1.0 - 0.4 = 0.6 < 0.7.
        assert_eq!(s.sample(&logits).token, 1);
    }

    #[test]
    fn logprob_and_top_logprobs_use_penalized_logits_at_temperature_one() {
        let logits = [2.0f32, 1.0, 0.5, 3.0, 1.0];
        let sp = SamplingParams {
            top_logprobs: 3,
            temperature: 0.3,
            seed: Some(5),
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(sp, &[3]);
        let pen = [2.0f64, 1.0, 0.5, 2.0, 1.0];
        let lse = pen.iter().map(|x| x.exp()).sum::<f64>().ln();
        let out = s.sample(&logits);
        assert!((out.logprob as f64 - (pen[out.token as usize] - lse)).abs() < 1e-5);
        let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![0, 3, 1]);
        for (t, lp) in out.top {
            assert!((lp as f64 - (pen[t as usize] - lse)).abs() < 1e-5);
        }
    }

    #[test]
    fn distribution_matches_reference_on_large_vocab() {
        // Flat logits make the top-p nucleus far larger than the first sort window.
        for (seed, t, top_k, top_p, min_p) in [
            (1u64, 1.0f32, 0usize, 0.9f32, 0.0f32),
            (2, 2.0, 0, 0.99, 0.0),
            (3, 0.7, 500, 0.9, 0.0),
            (4, 1.0, 0, 0.9, 0.2),
            (5, 1.3, 0, 1.0, 0.05),
            (6, 1.0, 40, 1.0, 0.0),
            (7, 1.0, 0, 1.0, 0.0),
            (8, 0.3, 0, 0.9, 0.0),
            (9, 0.3, 0, 0.5, 0.3),
        ] {
            let logits = random_logits(5000, seed);
            let sp = SamplingParams {
                top_k,
                top_p,
                min_p,
                ..params(t)
            };
            let d = Sampler::new(sp, &[]).distribution(&logits);
            let expected = reference(&logits, t as f64, top_k, top_p as f64, min_p as f64);
            let nonzero = expected.iter().filter(|&&p| p > 0.0).count();
            assert_eq!(d.len(), nonzero, "case seed {seed}");
            for w in d.windows(2) {
                assert!(by_value_desc(&w[0], &w[1]) == Ordering::Less);
            }
            let sum: f64 = d.iter().map(|&(_, p)| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-4);
            for &(tok, p) in &d {
                let e = expected[tok as usize];
                assert!(e > 0.0);
                assert!((p as f64 - e).abs() < 1e-5 + 1e-3 * e, "{p} vs {e}");
            }
        }
    }

    #[test]
    fn sampled_tokens_stay_in_distribution_support() {
        for (vocab, sp) in [
            (
                151_936,
                SamplingParams {
                    top_k: 50,
                    top_p: 0.9,
                    min_p: 0.01,
                    ..params(0.8)
                },
            ),
            (
                30_000,
                SamplingParams {
                    top_p: 0.5,
                    ..params(0.25)
                },
            ),
        ] {
            let logits = random_logits(vocab, 11);
            let mut s = Sampler::new(sp, &[5, 6, 7]);
            let support: HashSet<u32> = s.distribution(&logits).iter().map(|d| d.0).collect();
            assert!(!support.is_empty() && support.len() <= 1000);
            // No penalties are set, so the history recorded by `sample` leaves the support fixed.
            for _ in 0..50 {
                assert!(support.contains(&s.sample(&logits).token));
            }
        }
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let sp = SamplingParams {
            top_k: 3,
            top_p: 0.5,
            min_p: 0.5,
            top_logprobs: 4,
            ..params(1.0)
        };
        let mut s = Sampler::new(sp, &[0, 1]);
        let out = s.sample(&[]);
        assert_eq!(out.token, 0);
        assert!(s.distribution(&[]).is_empty());
        let out = s.sample(&[f32::NAN, f32::NEG_INFINITY, f32::NAN]);
        assert_eq!(out.token, 0);
        assert_eq!(out.logprob, f32::NEG_INFINITY);
        assert!(out.top.is_empty());
        // +∞ wins outright rather than producing NaN weights.
        let out = s.sample(&[0.0, f32::INFINITY, f32::NAN, 1.0]);
        assert_eq!(out.token, 1);
        assert!(out.logprob.is_finite());
        let d = s.distribution(&[0.0, f32::INFINITY, 3.0]);
        assert_eq!(d[0], (1, 1.0));
        // Extreme parameters.
        let sp = SamplingParams {
            top_p: 0.0,
            min_p: 5.0,
            repetition_penalty: 0.0,
            ..params(1e-4)
        };
        let mut s = Sampler::new(sp, &[1]);
        assert_eq!(s.sample(&[1.0, 2.0, 3e38, -3e38]).token, 2);
    }
}
