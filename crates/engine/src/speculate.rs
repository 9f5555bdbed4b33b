//! How much to draft: per-request speculation settings, each sequence's running acceptance rate,
//! and the cost model that picks the draft lengths of a step from measured costs.
//!
//! Why a cost model and not a fixed k: on 2 CPU cores verifying k+1 tokens costs well over one
//! step and a draft model's token costs a good share of a target step, so llama.cpp's fixed-k
//! speculation runs at 0.54-0.71x of plain decoding despite 82-91% acceptance (DESIGN.md). The
//! scheduler measures the forward time per number of tokens and each drafter's time per drafted
//! position, and drafts only as much as is expected to raise tokens per second: nothing at all
//! when no length pays.

use crate::draft::Draft;
use crate::sampling::{Sampled, Sampler};

/// Most tokens drafted for one sequence in one step.
pub const MAX_DRAFT_TOKENS: usize = 16;

/// Which drafter a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpecMode {
    /// The engine's default (`EngineConfig::default_speculation`).
    #[default]
    Default,
    Off,
    /// The paired draft model (plain decoding when the engine has none).
    DraftModel,
    /// Prompt lookup (model-free).
    Ngram,
}

/// A request's speculation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Speculation {
    pub mode: SpecMode,
    /// Most drafted tokens per step; 0 = the engine's default.
    pub max_draft_tokens: usize,
    /// Candidate drafts per step; 0 = the engine's default.
    pub candidates: usize,
}

/// Most candidate drafts per sequence per step.
pub const MAX_DRAFT_CANDIDATES: usize = 8;

/// Running acceptance rate of one sequence's drafts, per drafted token: the chance that a
/// drafted token is accepted given the ones before it were. Estimated as accepted / (accepted +
/// rejections) (each verify ends with at most one rejection), over decayed counts so it follows
/// the text as it changes, starting from a prior worth about two drafts.
#[derive(Debug, Clone, Copy)]
pub struct Acceptance {
    accepted: f64,
    rejected: f64,
}

impl Acceptance {
    const DECAY: f64 = 0.85;

    pub fn new(prior: f64) -> Self {
        let prior = prior.clamp(0.05, 0.95);
        Self {
            accepted: 2.0 * prior,
            rejected: 2.0 * (1.0 - prior),
        }
    }

    pub fn rate(&self) -> f64 {
        (self.accepted / (self.accepted + self.rejected)).clamp(0.0, 0.99)
    }

    /// `proposed` tokens were verified and the first `accepted` of them accepted.
    pub fn record(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        self.accepted = self.accepted * Self::DECAY + accepted as f64;
        self.rejected = self.rejected * Self::DECAY + f64::from(u8::from(accepted < proposed));
    }
}

/// Expected tokens one verify yields with `k` drafted tokens at acceptance rate `alpha`: the
/// accepted prefix plus the target's own token, (1 − α^(k+1)) / (1 − α).
pub fn expected_tokens(alpha: f64, k: usize) -> f64 {
    (0..=k).map(|i| alpha.powi(i as i32)).sum()
}

/// Measured cost (seconds) as a function of a count, from exponentially weighted averages per
/// count; counts not seen yet are estimated by a least-squares line through the seen ones (or a
/// prior slope when only one is known).
#[derive(Debug, Clone)]
pub struct CostTable {
    ewma: Vec<Option<f64>>,
    /// Relative cost of each extra unit when only one point is known: t(n) = t(n0)(1 + s(n−n0)).
    prior_slope: f64,
}

impl CostTable {
    const WEIGHT: f64 = 0.2;

    pub fn new(max_count: usize, prior_slope: f64) -> Self {
        Self {
            ewma: vec![None; max_count + 1],
            prior_slope,
        }
    }

    pub fn record(&mut self, count: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let Some(e) = self.ewma.get_mut(count) else {
            return;
        };
        *e = Some(match *e {
            Some(v) => v + Self::WEIGHT * (seconds - v),
            None => seconds,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.ewma.iter().all(Option::is_none)
    }

    /// Estimated cost for `count`; `None` until something was measured.
    pub fn estimate(&self, count: usize) -> Option<f64> {
        if let Some(Some(v)) = self.ewma.get(count) {
            return Some(*v);
        }
        let known: Vec<(f64, f64)> = self
            .ewma
            .iter()
            .enumerate()
            .filter_map(|(n, v)| v.map(|v| (n as f64, v)))
            .collect();
        let x = count as f64;
        match known.len() {
            0 => None,
            1 => {
                let (n0, t0) = known[0];
                Some((t0 * (1.0 + self.prior_slope * (x - n0))).max(0.0))
            }
            _ => {
                let m = known.len() as f64;
                let mx = known.iter().map(|p| p.0).sum::<f64>() / m;
                let my = known.iter().map(|p| p.1).sum::<f64>() / m;
                let sxx: f64 = known.iter().map(|p| (p.0 - mx).powi(2)).sum();
                let sxy: f64 = known.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
                // Costs never fall with more work; a noisy negative slope is read as flat.
                let slope = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
                Some((my + slope * (x - mx)).max(0.0))
            }
        }
    }
}

/// One sequence's part in choosing a step's draft lengths.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub alpha: f64,
    pub max_k: usize,
    /// Which drafter (index into the drafter cost tables).
    pub drafter: usize,
}

/// Measured costs of the verifier's forward (by tokens in it) and of each drafter (by drafted
/// positions in a call: a draft model runs one forward per position for all sequences at once).
#[derive(Debug, Clone)]
pub struct CostModel {
    pub forward: CostTable,
    pub drafters: Vec<CostTable>,
}

/// The cost model's current estimates (seconds), for benchmarks and logs: the verifier's
/// forward with 1..=9 tokens and each drafter's call for 1..=8 positions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CostSummary {
    pub forward: Vec<Option<f64>>,
    pub drafters: Vec<Vec<Option<f64>>>,
}

impl CostModel {
    pub fn summary(&self) -> CostSummary {
        CostSummary {
            forward: (1..=9).map(|n| self.forward.estimate(n)).collect(),
            drafters: self
                .drafters
                .iter()
                .map(|t| (1..=8).map(|k| t.estimate(k)).collect())
                .collect(),
        }
    }
}

/// What the cost model chose for a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub ks: Vec<usize>,
    /// Expected tokens per second with these lengths over without any drafting (1.0 when
    /// nothing is drafted).
    pub predicted_speedup: f64,
}

impl CostModel {
    /// `max_tokens`: the largest forward to keep statistics for. `drafter_slopes`: per drafter,
    /// the prior cost of one drafted position relative to one token of the verifier's forward.
    pub fn new(max_tokens: usize, drafter_slopes: &[f64]) -> Self {
        Self {
            // Before more than one size is measured: an extra token costs 0.2 of a step
            // (Qwen 1.5B here: 4 tokens cost 1.5 steps).
            forward: CostTable::new(max_tokens, 0.2),
            drafters: drafter_slopes
                .iter()
                .map(|&s| CostTable::new(MAX_DRAFT_TOKENS, s))
                .collect(),
        }
    }

    fn draft_cost(&self, drafter: usize, positions: usize) -> f64 {
        if positions == 0 {
            return 0.0;
        }
        let Some(t) = self.drafters.get(drafter) else {
            return 0.0;
        };
        t.estimate(positions)
            .or_else(|| {
                // Nothing measured for this drafter yet: its prior relative to one forward.
                let step = self.forward.estimate(1)?;
                Some(step * t.prior_slope * positions as f64)
            })
            .unwrap_or(0.0)
    }

    /// Expected tokens per second of a step with draft lengths `ks` (see `plan`).
    pub fn rate(
        &self,
        base_tokens: usize,
        decoding: usize,
        cands: &[Candidate],
        ks: &[usize],
    ) -> f64 {
        let extra: usize = ks.iter().sum();
        let tokens = decoding as f64
            + cands
                .iter()
                .zip(ks)
                .map(|(c, &k)| expected_tokens(c.alpha, k) - 1.0)
                .sum::<f64>();
        let mut cost = self
            .forward
            .estimate(base_tokens + extra)
            .unwrap_or(f64::INFINITY);
        for d in 0..self.drafters.len() {
            let positions = cands
                .iter()
                .zip(ks)
                .filter(|(c, _)| c.drafter == d)
                .map(|(_, &k)| k)
                .max()
                .unwrap_or(0);
            cost += self.draft_cost(d, positions);
        }
        if cost > 0.0 {
            tokens / cost
        } else {
            f64::INFINITY
        }
    }

    /// Predicted speedup of draft lengths `ks` over plain decoding (1.0 when unknown).
    pub fn predict(
        &self,
        base_tokens: usize,
        decoding: usize,
        cands: &[Candidate],
        ks: &[usize],
    ) -> f64 {
        let plain = self.rate(base_tokens, decoding, cands, &vec![0; ks.len()]);
        let r = self.rate(base_tokens, decoding, cands, ks);
        if plain > 0.0 && plain.is_finite() && r.is_finite() {
            r / plain
        } else {
            1.0
        }
    }

    /// Draft lengths for one step: `base_tokens` is what the forward carries without drafts
    /// (one per decoding sequence plus prompt chunks), `decoding` how many sequences decode.
    /// Greedy: keep adding one drafted token to the sequence whose next token is likeliest to be
    /// accepted while that raises the step's expected tokens per second.
    pub fn plan(&self, base_tokens: usize, decoding: usize, cands: &[Candidate]) -> Plan {
        let mut ks = vec![0; cands.len()];
        let Some(_) = self.forward.estimate(base_tokens.max(1)) else {
            // Nothing measured yet: decode plainly until there is.
            return Plan {
                ks,
                predicted_speedup: 1.0,
            };
        };
        let rate = |ks: &[usize]| self.rate(base_tokens, decoding, cands, ks);
        let plain = rate(&ks);
        let mut best = plain;
        loop {
            // The sequence whose next drafted token has the best chance of acceptance.
            let next = cands
                .iter()
                .enumerate()
                .filter(|(i, c)| ks[*i] < c.max_k)
                .max_by(|a, b| {
                    let pa = a.1.alpha.powi(ks[a.0] as i32 + 1);
                    let pb = b.1.alpha.powi(ks[b.0] as i32 + 1);
                    pa.total_cmp(&pb)
                })
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            ks[i] += 1;
            let r = rate(&ks);
            if r > best {
                best = r;
            } else {
                ks[i] -= 1;
                // Larger drafts of the same sequence can still pay where one more does not
                // (a fixed per-call draft cost), so look a few tokens ahead before giving up.
                let mut ahead = ks.clone();
                let mut improved = false;
                for _ in 0..3 {
                    if ahead[i] >= cands[i].max_k {
                        break;
                    }
                    ahead[i] += 1;
                    let r = rate(&ahead);
                    if r > best {
                        best = r;
                        ks = ahead.clone();
                        improved = true;
                        break;
                    }
                }
                if !improved {
                    break;
                }
            }
        }
        Plan {
            predicted_speedup: if plain > 0.0 && plain.is_finite() {
                best / plain
            } else {
                1.0
            },
            ks,
        }
    }
}

/// The outcome of verifying one draft: the tokens to emit (the accepted drafted ones first,
/// then the target's own) and how many drafted tokens were accepted.
#[derive(Debug, Clone)]
pub struct Verified {
    pub tokens: Vec<Sampled>,
    pub accepted: usize,
}

/// Verifies a draft against the target's logits, losslessly (DESIGN.md, Speculative decoding,
/// exactly). `rows[j]` is the target's logits after the context and the first j drafted tokens
/// (so there are `draft.tokens.len() + 1` of them).
/// - greedy: accept while the drafted token is the target's argmax; the first disagreement is
///   replaced by the target's own token, and a fully accepted draft gets the target's next one.
///   Token for token plain greedy's output.
/// - sampling: accept drafted x with probability min(1, p(x)/q(x)); on rejection draw from
///   normalize(max(0, p − q)) and stop; a fully accepted draft gets a token drawn from p. The
///   tokens are distributed exactly as sampling from p alone (Leviathan et al., Chen et al.).
///
/// p is the sampler's full distribution (temperature, filters, penalties with the history so
/// far, which grows with each emitted token).
pub fn verify(sampler: &mut Sampler, draft: &Draft, rows: &[Vec<f32>]) -> Verified {
    verify_candidates(sampler, std::slice::from_ref(draft), &[rows]).1
}

/// Verifies several candidate drafts of one sequence (multi-candidate drafting) and returns the
/// candidate whose tokens were kept, with the outcome. `rows[c][j]` is the target's logits after
/// the context and candidate c's first j tokens. Position by position, over the candidates that
/// agree with everything accepted so far:
/// the target's token (its argmax, or its draw, which depends only on the seed, the position and
/// the logits) is accepted if any of them drafted it; otherwise it replaces them and
/// verification stops. The output is plain decoding's, token for token, greedy or sampled; how
/// often drafts are accepted when sampling depends on the drafter racing with the same noise
/// (Gumbel coupling; the draft service does). This replaces speculative rejection sampling
/// (accept min(1, p/q), resample the residual), which is exact only in distribution and made a
/// seeded request's tokens depend on how many tokens were drafted.
///
/// Candidates that agree up to a position have the same context there, so their rows at that
/// position are the same (bit for bit: each is scored in its own KV slot exactly as decoding
/// would) and the first one's row stands for all.
pub fn verify_candidates(
    sampler: &mut Sampler,
    drafts: &[Draft],
    rows: &[&[Vec<f32>]],
) -> (usize, Verified) {
    let longest = drafts.iter().map(|d| d.tokens.len()).max().unwrap_or(0);
    let mut out = Verified {
        tokens: Vec::with_capacity(longest + 1),
        accepted: 0,
    };
    let mut alive: Vec<usize> = (0..drafts.len().min(rows.len())).collect();
    let Some(&first) = alive.first() else {
        return (0, out);
    };
    let mut winner = first;
    for j in 0.. {
        let Some(row) = rows[winner].get(j) else {
            break;
        };
        // The target's token here is fixed before any draft is seen: greedy's argmax, or the
        // sampled draw, a function of (seed, position, logits) (sampling.rs). Accepting the
        // candidates that drafted it gives plain decoding's output token for token; past every
        // draft, none did, and it is the target's own next token.
        let s = sampler.sample(row);
        let t = s.token;
        out.tokens.push(s);
        alive.retain(|&c| drafts[c].tokens.get(j) == Some(&t));
        match alive.first() {
            Some(&c) => {
                winner = c;
                out.accepted += 1;
            }
            None => break,
        }
    }
    (winner, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(step: f64, per_token: f64, draft_per_pos: f64) -> CostModel {
        let mut m = CostModel::new(64, &[0.0]);
        for n in 1..=8 {
            m.forward.record(n, step + per_token * (n - 1) as f64);
        }
        for k in 1..=8 {
            m.drafters[0].record(k, draft_per_pos * k as f64);
        }
        m
    }

    fn one(alpha: f64) -> [Candidate; 1] {
        [Candidate {
            alpha,
            max_k: 8,
            drafter: 0,
        }]
    }

    #[test]
    fn expected_tokens_is_the_geometric_sum() {
        assert!((expected_tokens(0.5, 0) - 1.0).abs() < 1e-12);
        assert!((expected_tokens(0.5, 2) - 1.75).abs() < 1e-12);
        assert!((expected_tokens(0.0, 5) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn drafts_nothing_when_verifying_costs_as_much_as_decoding() {
        // Each verified token costs a whole step (llama.cpp on 2 cores): no k pays.
        let plan = model(0.1, 0.1, 0.0).plan(1, 1, &one(0.9));
        assert_eq!(plan.ks, vec![0]);
        assert!((plan.predicted_speedup - 1.0).abs() < 1e-9);
    }

    #[test]
    fn drafts_nothing_when_the_draft_model_is_too_slow() {
        // Cheap verification but each drafted token costs 0.9 of a step.
        let plan = model(0.1, 0.01, 0.09).plan(1, 1, &one(0.6));
        assert_eq!(plan.ks, vec![0]);
    }

    #[test]
    fn drafts_more_when_acceptance_is_high_and_drafting_is_cheap() {
        let m = model(0.1, 0.01, 0.0);
        let low = m.plan(1, 1, &one(0.3)).ks[0];
        let high = m.plan(1, 1, &one(0.9));
        assert!(high.ks[0] > low, "{} vs {low}", high.ks[0]);
        assert!(high.ks[0] >= 4);
        // The prediction matches the formula for the chosen k.
        let k = high.ks[0];
        let want = expected_tokens(0.9, k) / (0.1 + 0.01 * k as f64) * 0.1;
        assert!((high.predicted_speedup - want).abs() < 1e-9);
    }

    #[test]
    fn nothing_measured_means_plain_decoding() {
        let m = CostModel::new(64, &[0.3]);
        assert_eq!(m.plan(1, 1, &one(0.9)).ks, vec![0]);
    }

    #[test]
    fn favours_the_sequences_that_accept_more() {
        let m = model(0.1, 0.02, 0.0);
        let cands = [
            Candidate {
                alpha: 0.2,
                max_k: 8,
                drafter: 0,
            },
            Candidate {
                alpha: 0.9,
                max_k: 8,
                drafter: 0,
            },
        ];
        let plan = m.plan(2, 2, &cands);
        assert!(plan.ks[1] > plan.ks[0], "{:?}", plan.ks);
    }

    #[test]
    fn cost_table_interpolates_and_extrapolates() {
        let mut t = CostTable::new(16, 0.2);
        assert_eq!(t.estimate(3), None);
        t.record(1, 1.0);
        assert!((t.estimate(3).unwrap_or_default() - 1.4).abs() < 1e-9);
        t.record(5, 2.0);
        assert!((t.estimate(3).unwrap_or_default() - 1.5).abs() < 1e-9);
        assert!((t.estimate(9).unwrap_or_default() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn acceptance_follows_the_drafts() {
        let mut a = Acceptance::new(0.5);
        for _ in 0..30 {
            a.record(4, 4);
        }
        assert!(a.rate() > 0.9);
        for _ in 0..30 {
            a.record(4, 0);
        }
        assert!(a.rate() < 0.1);
    }

    use crate::sampling::SamplingParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn softmax(l: &[f32]) -> Vec<f64> {
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = l.iter().map(|&x| f64::from(x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect()
    }

    fn draw(rng: &mut StdRng, q: &[(u32, f32)]) -> u32 {
        let mut u: f32 = rng.random();
        for &(t, w) in q {
            u -= w;
            if u < 0.0 {
                return t;
            }
        }
        q[q.len() - 1].0
    }

    /// Pearson's statistic of observed counts against expected probabilities.
    fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&o, &pe)| {
                let e = pe * n as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// Speculative sampling is exact: whatever the draft (the target itself racing with the same
    /// noise, a bad one that proposes what the target almost never picks, an unrelated one),
    /// the first and second emitted tokens follow the target's distributions at those positions
    /// (chi-square, 5 degrees of freedom, critical value 20.5 at p = 0.001, fixed seeds), and
    /// are plain sampling's tokens for the same seed.
    #[test]
    fn speculative_sampling_matches_the_target_distribution() {
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0, 2.0, 0.5, -1.0, 0.0, 1.5],
            vec![0.0, -0.5, 2.5, 1.0, 0.2, -2.0],
            vec![0.3, 0.3, 0.3, 2.0, -1.0, 0.0],
        ];
        let p: Vec<Vec<f64>> = rows.iter().map(|r| softmax(r)).collect();
        let as_q = |v: &[f64]| -> Vec<(u32, f32)> {
            v.iter()
                .enumerate()
                .map(|(i, &x)| (i as u32, x as f32))
                .collect()
        };
        type SparseQ = Vec<(u32, f32)>;
        let drafts: Vec<(&str, Vec<SparseQ>)> = vec![
            ("perfect", vec![as_q(&p[0]), as_q(&p[1])]),
            // Token 3 (p = 0.03) at position 0 and token 5 (p = 0.008) at position 1.
            ("bad", vec![vec![(3, 1.0)], vec![(5, 1.0)]]),
            (
                "unrelated",
                vec![vec![(0, 0.5), (4, 0.3), (2, 0.2)], as_q(&[1.0 / 6.0; 6])],
            ),
        ];
        const N: u64 = 20_000;
        for (name, q) in drafts {
            let mut first = [0u64; 6];
            let mut second = [0u64; 6];
            let (mut drafted, mut accepted) = (0u64, 0u64);
            let mut rng = StdRng::seed_from_u64(7);
            for trial in 0..N {
                let params = SamplingParams {
                    temperature: 1.0,
                    seed: Some(trial * 31 + 1),
                    ..Default::default()
                };
                let mut plain = Sampler::new(params.clone(), &[]);
                let plain: Vec<u32> = rows.iter().map(|r| plain.sample(r).token).collect();
                let mut sampler = Sampler::new(params, &[]);
                let seed = sampler.seed();
                let tokens: Vec<u32> = q
                    .iter()
                    .enumerate()
                    .map(|(j, qj)| match name {
                        // Gumbel coupling: the draft races its q with the target's noise.
                        "perfect" => crate::sampling::race(qj.iter().copied(), seed, j as u64),
                        _ => draw(&mut rng, qj),
                    })
                    .collect();
                let draft = Draft {
                    tokens,
                    ..Default::default()
                };
                let v = verify(&mut sampler, &draft, &rows);
                let got: Vec<u32> = v.tokens.iter().map(|t| t.token).collect();
                assert_eq!(
                    got[..],
                    plain[..got.len()],
                    "{name}: not plain sampling's tokens"
                );
                drafted += 2;
                accepted += v.accepted as u64;
                first[v.tokens[0].token as usize] += 1;
                if let Some(t) = v.tokens.get(1) {
                    second[t.token as usize] += 1;
                }
            }
            let c1 = chi_square(&first, &p[0]);
            let c2 = chi_square(&second, &p[1]);
            let rate = accepted as f64 / drafted as f64;
            eprintln!("{name}: chi2 {c1:.1} / {c2:.1}, acceptance {rate:.3}");
            assert!(c1 < 20.5 && c2 < 20.5, "{name}: chi2 {c1} / {c2}");
            match name {
                "perfect" => assert!(rate > 0.99, "{name}: {rate}"),
                "bad" => assert!(rate < 0.05, "{name}: {rate}"),
                _ => assert!(rate > 0.05 && rate < 0.95, "{name}: {rate}"),
            }
        }
    }

    /// Multi-candidate verification stays exact: candidates that are deterministic and distinct
    /// (n-gram style, q = 1 on the token; some sharing a first token), and candidates drawn
    /// independently from the same q. The first and second emitted tokens follow the target's
    /// distributions (chi-square as above); more candidates accept more.
    #[test]
    fn multi_candidate_sampling_matches_the_target_distribution() {
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0, 2.0, 0.5, -1.0, 0.0, 1.5],
            vec![0.0, -0.5, 2.5, 1.0, 0.2, -2.0],
            vec![0.3, 0.3, 0.3, 2.0, -1.0, 0.0],
        ];
        let p: Vec<Vec<f64>> = rows.iter().map(|r| softmax(r)).collect();
        let point = |tokens: &[u32]| Draft {
            tokens: tokens.to_vec(),
            ..Default::default()
        };
        let q_unrelated: Vec<Vec<(u32, f32)>> = vec![
            vec![(0, 0.5), (4, 0.3), (2, 0.2)],
            (0..6).map(|t| (t, 1.0 / 6.0)).collect(),
        ];
        const N: u64 = 20_000;
        let mut one_rate = 0.0;
        for case in ["one deterministic", "deterministic", "shared prefix", "iid"] {
            let mut first = [0u64; 6];
            let mut second = [0u64; 6];
            let mut accepted = 0u64;
            let mut rng = StdRng::seed_from_u64(11);
            for trial in 0..N {
                let params = SamplingParams {
                    temperature: 1.0,
                    seed: Some(trial * 17 + 3),
                    ..Default::default()
                };
                let mut sampler = Sampler::new(params, &[]);
                let drafts: Vec<Draft> = match case {
                    "one deterministic" => vec![point(&[5, 2])],
                    "deterministic" => vec![point(&[5, 2]), point(&[1, 3]), point(&[0, 2])],
                    "shared prefix" => vec![point(&[1, 4]), point(&[1, 2]), point(&[5, 0])],
                    _ => (0..3)
                        .map(|_| Draft {
                            tokens: q_unrelated.iter().map(|q| draw(&mut rng, q)).collect(),
                            ..Default::default()
                        })
                        .collect(),
                };
                let per: Vec<&[Vec<f32>]> = drafts.iter().map(|_| &rows[..]).collect();
                let (winner, v) = verify_candidates(&mut sampler, &drafts, &per);
                assert!(winner < drafts.len());
                for (j, t) in v.tokens.iter().take(v.accepted).enumerate() {
                    assert_eq!(drafts[winner].tokens[j], t.token, "{case}");
                }
                accepted += v.accepted as u64;
                first[v.tokens[0].token as usize] += 1;
                if let Some(t) = v.tokens.get(1) {
                    second[t.token as usize] += 1;
                }
            }
            let c1 = chi_square(&first, &p[0]);
            let c2 = chi_square(&second, &p[1]);
            let rate = accepted as f64 / (2 * N) as f64;
            eprintln!("{case}: chi2 {c1:.1} / {c2:.1}, accepted per drafted position {rate:.3}");
            assert!(c1 < 20.5 && c2 < 20.5, "{case}: chi2 {c1} / {c2}");
            match case {
                "one deterministic" => one_rate = rate,
                "deterministic" => assert!(rate > one_rate + 0.1, "{case}: {rate} vs {one_rate}"),
                _ => {}
            }
        }
    }

    /// Greedy multi-candidate verification follows whichever candidate has the target's token
    /// at each position: plain greedy's tokens.
    #[test]
    fn greedy_multi_candidate_follows_the_agreeing_candidate() {
        // Position 0 argmax 1, position 1 argmax 0, position 2 argmax 2.
        let rows = [
            vec![0.0, 3.0, 1.0],
            vec![2.0, 0.0, 1.0],
            vec![0.0, 0.0, 5.0],
        ];
        let d = |t: &[u32]| Draft {
            tokens: t.to_vec(),
            ..Default::default()
        };
        let drafts = vec![d(&[2, 0]), d(&[1, 2]), d(&[1, 0])];
        let rows: Vec<Vec<f32>> = rows.to_vec();
        let per: Vec<&[Vec<f32>]> = drafts.iter().map(|_| &rows[..]).collect();
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        let (winner, v) = verify_candidates(&mut s, &drafts, &per);
        assert_eq!(winner, 2);
        assert_eq!(v.accepted, 2);
        let toks: Vec<u32> = v.tokens.iter().map(|t| t.token).collect();
        assert_eq!(toks, vec![1, 0, 2]);
    }

    /// Greedy verification emits exactly the target's argmax tokens, accepting the agreeing
    /// prefix.
    #[test]
    fn greedy_verify_accepts_the_agreeing_prefix() {
        let rows = vec![
            vec![0.0, 3.0, 1.0],
            vec![2.0, 0.0, 1.0],
            vec![0.0, 0.0, 5.0],
        ];
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        let v = verify(
            &mut s,
            &Draft {
                tokens: vec![1, 2],
                ..Default::default()
            },
            &rows,
        );
        let got: Vec<u32> = v.tokens.iter().map(|t| t.token).collect();
        assert_eq!((got, v.accepted), (vec![1, 0], 1));
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        let v = verify(
            &mut s,
            &Draft {
                tokens: vec![1, 0],
                ..Default::default()
            },
            &rows,
        );
        let got: Vec<u32> = v.tokens.iter().map(|t| t.token).collect();
        assert_eq!((got, v.accepted), (vec![1, 0, 2], 2));
    }
}
