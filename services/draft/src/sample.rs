//! How a drafted token is picked from one row of logits, and the distribution q it is drawn
//! from (sent back sparsely, for diagnostics: verification is an exact match).
//!
//! Sampling: temperature, then top-k, then top-p (nucleus, over the top-k renormalized), then
//! only the `max_q` most likely tokens are kept; the survivors renormalized are q, and the token
//! is q's winner of the race with the verifier's noise at that position. Greedy: the argmax,
//! with q = {argmax: 1}.
//!
//! Written for a 150k vocabulary: one exp pass and one bounded-heap scan per row, no full sort.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Temperatures below this are greedy (the engine's sampler uses the same epsilon).
pub(crate) const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Sampling settings of one sequence, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sampling {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// Off unless in (0, 1).
    pub top_p: f32,
    pub seed: u64,
    /// Tokens kept in q (≥ 1).
    pub max_q: usize,
}

/// One drafted position: the token and the sparse q it came from (most likely first).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Choice {
    pub token: u32,
    pub q: Vec<(u32, f32)>,
}

/// NaN counts as −∞; +∞ is clamped so that max subtraction never computes ∞ − ∞.
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l.min(f32::MAX)
    }
}

/// The largest logit's index (ties: the lowest id); 0 for an empty or all-NaN row.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let l = sanitize(l);
        if l > best_v {
            best = i;
            best_v = l;
        }
    }
    best as u32
}

/// Unnormalized weights exp((l - max) / t) and their sum (the largest weight is 1, so the top
/// probability is 1 / sum).
fn weights(logits: &[f32], temperature: f32, out: &mut Vec<f32>) -> f64 {
    let max = logits
        .iter()
        .map(|&l| sanitize(l))
        .fold(f32::NEG_INFINITY, f32::max);
    out.clear();
    if max == f32::NEG_INFINITY {
        return 0.0;
    }
    let inv_t = 1.0 / temperature;
    out.extend(logits.iter().map(|&l| ((sanitize(l) - max) * inv_t).exp()));
    out.iter().map(|&w| f64::from(w)).sum()
}

/// The top probability of softmax(logits / temperature): what the confidence stop compares
/// with `min_confidence`.
pub(crate) fn top_probability(logits: &[f32], temperature: f32) -> f32 {
    let mut w = Vec::new();
    let z = weights(logits, temperature, &mut w);
    if z > 0.0 {
        (1.0 / z) as f32
    } else {
        0.0
    }
}

/// Orders candidates: higher weight first, then lower id.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cand(f32, u32);

impl Eq for Cand {}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        // "Greater" = more likely: higher weight, then the lower id.
        self.0
            .total_cmp(&other.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `n` heaviest nonzero weights as `(id, weight)`, heaviest first (ties: lower id first).
fn top_n(w: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    // A min-heap (through Reverse) of the best n so far: most entries lose to its minimum at once.
    let mut heap: BinaryHeap<std::cmp::Reverse<Cand>> = BinaryHeap::with_capacity(n + 1);
    for (i, &x) in w.iter().enumerate() {
        if x <= 0.0 {
            continue;
        }
        let c = Cand(x, i as u32);
        if heap.len() < n {
            heap.push(std::cmp::Reverse(c));
        } else if heap.peek().is_some_and(|m| c > m.0) {
            heap.pop();
            heap.push(std::cmp::Reverse(c));
        }
    }
    let mut v: Vec<Cand> = heap.into_iter().map(|r| r.0).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.into_iter().map(|c| (c.1, c.0)).collect()
}

/// The distribution q for these logits: temperature → top-k → top-p → the `max_q` most likely,
/// renormalized. `(id, prob)`, most likely first, summing to 1; empty only for a row with no
/// finite logit.
pub(crate) fn distribution(logits: &[f32], s: &Sampling) -> Vec<(u32, f32)> {
    let mut w = Vec::with_capacity(logits.len());
    let z = weights(logits, s.temperature, &mut w);
    if z <= 0.0 {
        return Vec::new();
    }
    let v = w.len();
    let k = if s.top_k == 0 { v } else { s.top_k.min(v) };
    let keep = s.max_q.min(k);
    // The nucleus is measured on the top-k renormalized, so top-k's total mass is needed.
    let (mut cands, zk) = if k >= v {
        (top_n(&w, keep), z)
    } else {
        let c = top_n(&w, k);
        let zk: f64 = c.iter().map(|&(_, x)| f64::from(x)).sum();
        (c, zk)
    };
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let mut cum = 0.0f64;
        let target = f64::from(s.top_p);
        if let Some(cut) = cands.iter().position(|&(_, x)| {
            cum += f64::from(x) / zk;
            cum >= target
        }) {
            cands.truncate(cut + 1);
        }
    }
    cands.truncate(keep);
    let total: f64 = cands.iter().map(|&(_, x)| f64::from(x)).sum();
    cands
        .into_iter()
        .map(|(id, x)| (id, (f64::from(x) / total) as f32))
        .collect()
}

/// The `n` most likely tokens, most likely first (ties: lower id first).
pub(crate) fn top_tokens(logits: &[f32], n: usize) -> Vec<u32> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (top.len() == n && top.last().is_some_and(|&(_, m)| l <= m)) {
            continue;
        }
        let at = top.partition_point(|&(_, m)| m >= l);
        top.insert(at, (i as u32, l));
        top.truncate(n);
    }
    top.into_iter().map(|(t, _)| t).collect()
}

/// Picks the token for one drafted position (`position` in the whole sequence). Sampled drafts
/// race q with the noise of (`noise_seed`, position), the verifier's own draw when the seed is
/// the verifier's: the draft proposes the target's token wherever the two agree (Gumbel
/// coupling), and verification is an exact match.
pub(crate) fn choose(
    logits: &[f32],
    sampling: Option<&Sampling>,
    noise_seed: u64,
    position: u64,
) -> Choice {
    match sampling {
        None => {
            let token = argmax(logits);
            Choice {
                token,
                q: vec![(token, 1.0)],
            }
        }
        Some(s) => {
            let q = distribution(logits, s);
            if q.is_empty() {
                let token = argmax(logits);
                return Choice {
                    token,
                    q: vec![(token, 1.0)],
                };
            }
            let token = tandem_engine::sampling::race(q.iter().copied(), noise_seed, position);
            Choice { token, q }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(temperature: f32, top_k: usize, top_p: f32, max_q: usize) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 0,
            max_q,
        }
    }

    /// The reference: full softmax in f64, sorted, filtered step by step.
    fn reference(logits: &[f32], p: &Sampling) -> Vec<(u32, f64)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut v: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                (
                    i as u32,
                    (f64::from(l - max) / f64::from(p.temperature)).exp(),
                )
            })
            .collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            v.truncate(p.top_k);
        }
        let z: f64 = v.iter().map(|x| x.1).sum();
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut cut = v.len();
            for (i, x) in v.iter().enumerate() {
                cum += x.1 / z;
                if cum >= f64::from(p.top_p) {
                    cut = i + 1;
                    break;
                }
            }
            v.truncate(cut);
        }
        v.truncate(p.max_q);
        let z: f64 = v.iter().map(|x| x.1).sum();
        v.into_iter().map(|(i, x)| (i, x / z)).collect()
    }

    #[test]
    fn distribution_matches_the_reference() {
        let logits: Vec<f32> = (0..500)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        for p in [
            s(1.0, 0, 1.0, 32),
            s(0.7, 0, 1.0, 8),
            s(1.3, 50, 1.0, 32),
            s(1.0, 20, 0.5, 32),
            s(0.5, 0, 0.9, 1000),
            s(2.0, 3, 0.0, 32),
        ] {
            let got = distribution(&logits, &p);
            let want = reference(&logits, &p);
            assert_eq!(got.len(), want.len(), "{p:?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{p:?}");
                assert!((f64::from(g.1) - w.1).abs() < 1e-5, "{p:?} {g:?} {w:?}");
            }
            let sum: f32 = got.iter().map(|x| x.1).sum();
            assert!((sum - 1.0).abs() < 1e-5, "{p:?} {sum}");
        }
    }

    #[test]
    fn nan_and_masked_rows() {
        let logits = [f32::NAN, 1.0, f32::NEG_INFINITY, 3.0, f32::INFINITY];
        assert_eq!(argmax(&logits), 4);
        let q = distribution(&logits, &s(1.0, 0, 1.0, 32));
        assert_eq!(q[0].0, 4);
        assert!(q.iter().all(|&(id, _)| id != 0 && id != 2));
        assert!(distribution(&[f32::NAN; 4], &s(1.0, 0, 1.0, 32)).is_empty());
        let c = choose(&[f32::NAN; 4], Some(&s(1.0, 0, 1.0, 4)), 1, 0);
        assert_eq!(c.q, vec![(c.token, 1.0)]);
    }

    #[test]
    fn draws_only_from_q_and_top_probability() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let p = s(1.0, 0, 1.0, 2);
        for position in 0..200 {
            let c = choose(&logits, Some(&p), 7, position);
            assert!(c.token == 1 || c.token == 2, "{c:?}");
        }
        let z: f32 = logits.iter().map(|l| (l - 2.0).exp()).sum();
        assert!((top_probability(&logits, 1.0) - 1.0 / z).abs() < 1e-6);
    }
}
