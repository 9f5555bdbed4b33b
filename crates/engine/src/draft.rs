//! Drafters for speculative decoding: what proposes tokens for the verifier to check. One trait,
//! several kinds (DESIGN.md): the remote draft model (a client in the worker, since the engine
//! holds no network code) and the model-free n-gram drafter here. The verifier loop is in the
//! scheduler; how many tokens to draft is the cost model's choice (`speculate`).

use std::collections::HashMap;

/// One sequence's request for a draft.
#[derive(Debug, Clone, Copy)]
pub struct DraftRequest<'a> {
    pub seq: u64,
    /// Everything the verifier has accepted so far (prompt and output).
    pub context: &'a [u32],
    /// Most tokens to propose.
    pub max_tokens: usize,
    /// Candidate drafts wanted (multi-candidate drafting); a drafter may return fewer. 1: one.
    pub candidates: usize,
    /// How the verifier samples: a model drafter draws from its own distribution under the same
    /// settings (closer to the target's, so more gets accepted). Greedy when temperature is 0.
    pub sampling: DraftSampling,
}

/// The sampling settings a drafter should draw with, and the sequence's seed: a drafter that
/// races its own probabilities with the noise of (seed, position) (`sampling::race`) proposes
/// the verifier's own draw wherever the two models agree closely enough.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DraftSampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

/// Proposed tokens. Verification is an exact match against the target's own token (greedy, or
/// the (seed, position) race when sampling), so no draft probabilities travel with them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// Further candidates for the same step (multi-candidate drafting), each verified in its
    /// own KV slot; the verifier keeps whichever it accepts most of (`verify_candidates`).
    pub alternatives: Vec<Draft>,
}

pub trait Drafter: Send {
    /// One draft per request, in order. A drafter that cannot draft (no match, service down,
    /// past its deadline) returns empty drafts: the verifier then decodes plainly.
    fn propose(&mut self, reqs: &[DraftRequest<'_>]) -> Vec<Draft>;
    /// How many of the last proposal's tokens the verifier accepted (drafters adapt to it).
    fn feedback(&mut self, seq: u64, proposed: usize, accepted: usize);
    /// The sequence ended: drop its state.
    fn release(&mut self, seq: u64);
    /// False while the drafter can't draft (a draft service down or backing off after
    /// failures): the scheduler then doesn't ask, and decodes those sequences plainly.
    fn available(&self) -> bool {
        true
    }
    /// True while the drafter works in the background (a draft service prefilling a context):
    /// on shared cores that slows the verifier's forwards, which then measure nothing useful.
    fn busy(&self) -> bool {
        false
    }
    /// Whether the last `propose` call's time measures drafting. A draft service that had to
    /// catch up on many tokens first (the sequence went without drafts for a while) spent most
    /// of the call prefilling; counting that as drafting cost would keep the cost model from
    /// ever drafting again.
    fn last_call_measures_drafting(&self) -> bool {
        true
    }
}

/// Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n
/// first) and propose what followed it. Free to run, and strong when the output copies from the
/// input (editing, renaming, translating comments in code). The draft length adapts per sequence
/// to its acceptance, as in ADED: grow after fully accepted drafts, shrink after rejections.
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    pub min_n: usize,
    pub max_n: usize,
    pub max_k: usize,
    state: HashMap<u64, SeqState>,
}

#[derive(Debug, Clone, Copy)]
struct SeqState {
    k: usize,
}

impl NgramDrafter {
    pub fn new(min_n: usize, max_n: usize, max_k: usize) -> Self {
        Self {
            min_n: min_n.max(1),
            max_n: max_n.max(min_n.max(1)),
            max_k: max_k.max(1),
            state: HashMap::new(),
        }
    }

    /// Current draft length for `seq`.
    pub fn draft_len(&self, seq: u64) -> usize {
        self.state.get(&seq).map_or(self.max_k.min(4), |s| s.k)
    }

    /// Up to `want` distinct continuations of length ≤ k: longest n-gram first, latest match
    /// first (recent text predicts best). A match must end before the tail itself so there is
    /// something after it to propose.
    fn lookup(&self, ctx: &[u32], k: usize, want: usize) -> Vec<Vec<u32>> {
        let mut found: Vec<Vec<u32>> = Vec::new();
        for n in (self.min_n..=self.max_n).rev() {
            if ctx.len() <= n {
                continue;
            }
            let tail = &ctx[ctx.len() - n..];
            for start in (0..ctx.len() - n).rev() {
                if &ctx[start..start + n] == tail {
                    let from = start + n;
                    let to = (from + k).min(ctx.len());
                    if from < to && !found.iter().any(|f| f[..] == ctx[from..to]) {
                        found.push(ctx[from..to].to_vec());
                        if found.len() >= want {
                            return found;
                        }
                    }
                }
            }
        }
        found
    }
}

impl Default for NgramDrafter {
    fn default() -> Self {
        Self::new(2, 4, 8)
    }
}

impl Drafter for NgramDrafter {
    fn propose(&mut self, reqs: &[DraftRequest<'_>]) -> Vec<Draft> {
        reqs.iter()
            .map(|r| {
                let k = self.draft_len(r.seq).min(r.max_tokens);
                let found = if k == 0 {
                    Vec::new()
                } else {
                    self.lookup(r.context, k, r.candidates.max(1))
                };
                let point = |tokens: Vec<u32>| Draft {
                    tokens,
                    alternatives: Vec::new(),
                };
                let mut found = found.into_iter().map(point);
                let mut first = found.next().unwrap_or_default();
                first.alternatives = found.collect();
                first
            })
            .collect()
    }

    fn feedback(&mut self, seq: u64, proposed: usize, accepted: usize) {
        let max_k = self.max_k;
        let s = self
            .state
            .entry(seq)
            .or_insert(SeqState { k: max_k.min(4) });
        if proposed == 0 {
            return;
        }
        s.k = if accepted == proposed {
            (s.k + 2).min(max_k)
        } else {
            // Next time propose a little more than what was accepted, at least one.
            (accepted + 1).clamp(1, max_k)
        };
    }

    fn release(&mut self, seq: u64) {
        self.state.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(d: &mut NgramDrafter, ctx: &[u32], max: usize) -> Vec<u32> {
        d.propose(&[DraftRequest {
            seq: 1,
            context: ctx,
            max_tokens: max,
            candidates: 1,
            sampling: DraftSampling::default(),
        }])
        .remove(0)
        .tokens
    }

    #[test]
    fn proposes_what_followed_the_latest_match() {
        let mut d = NgramDrafter::new(2, 3, 8);
        // "... 7 8 9 1 2 ... 7 8" → the latest "7 8" was followed by "9 1 2".
        let ctx = [5, 7, 8, 3, 3, 7, 8, 9, 1, 2, 6, 7, 8];
        assert_eq!(propose(&mut d, &ctx, 3), vec![9, 1, 2]);
        // Longer n-grams win: the tail "6 7 8" never occurred before, "7 8" did.
        let got = d.propose(&[DraftRequest {
            seq: 1,
            context: &ctx,
            max_tokens: 2,
            candidates: 1,
            sampling: DraftSampling::default(),
        }]);
        assert_eq!(got[0].tokens, vec![9, 1], "at most max_tokens");
    }

    #[test]
    fn proposes_several_distinct_continuations_when_asked() {
        let mut d = NgramDrafter::new(1, 2, 8);
        // "7 8" was followed by "9 1", then "4 4", then "9 1" again (a duplicate), and "8" alone
        // by "3".
        let ctx = [7, 8, 9, 1, 0, 7, 8, 4, 4, 0, 7, 8, 9, 1, 8, 3, 0, 7, 8];
        let got = d.propose(&[DraftRequest {
            seq: 1,
            context: &ctx,
            max_tokens: 2,
            candidates: 4,
            sampling: DraftSampling::default(),
        }]);
        let mut all = vec![got[0].tokens.clone()];
        all.extend(got[0].alternatives.iter().map(|a| a.tokens.clone()));
        assert_eq!(all, vec![vec![9, 1], vec![4, 4], vec![3, 0]]);
        assert!(got[0].alternatives.iter().all(|a| !a.tokens.is_empty()));
    }

    #[test]
    fn nothing_to_propose_without_a_match() {
        let mut d = NgramDrafter::default();
        assert!(propose(&mut d, &[1, 2, 3, 4, 5], 4).is_empty());
        assert!(propose(&mut d, &[], 4).is_empty());
        assert!(propose(&mut d, &[1, 1], 0).is_empty());
    }

    #[test]
    fn draft_length_adapts_to_acceptance() {
        let mut d = NgramDrafter::new(1, 2, 8);
        let start = d.draft_len(7);
        d.feedback(7, start, start);
        assert_eq!(d.draft_len(7), start + 2);
        d.feedback(7, 6, 1);
        assert_eq!(d.draft_len(7), 2);
        d.feedback(7, 2, 0);
        assert_eq!(d.draft_len(7), 1);
        for _ in 0..10 {
            let k = d.draft_len(7);
            d.feedback(7, k, k);
        }
        assert_eq!(d.draft_len(7), 8);
        d.release(7);
        assert_eq!(d.draft_len(7), 4);
    }
}
