//! `DraftCore` on the testkit's tiny models: drafts against the model's own forward loop, KV
//! rollback, unknown/eviction/release, batching, sampled drafts (q, seeds, chi-square), the
//! confidence stop, the context limit and validation.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_draft::{CoreConfig, DraftCore, DraftError};
use tandem_model::{LoadOptions, Model};
use tandem_proto::draft::v1::{DraftSampling, ProposeRequest, SequenceDraft, SequenceDraftRequest};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};
use tonic::Code;

mod common;
use common::greedy;

struct Fixture {
    core: DraftCore,
    /// The same model, loaded again, for reference forwards.
    model: Model,
    _tiny: TinyModel,
}

fn fixture(cfg: TinyConfig, core_cfg: CoreConfig) -> Fixture {
    let tiny = tiny_model(&cfg).unwrap();
    let load = || Model::load(&tiny.dir, &LoadOptions::default()).unwrap();
    Fixture {
        core: DraftCore::new(load(), core_cfg),
        model: load(),
        _tiny: tiny,
    }
}

fn both_archs() -> [TinyConfig; 2] {
    [TinyConfig::llama(), TinyConfig::qwen2()]
}

fn prompt(i: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|j| (i * 31 + j * 7 + 1) % 300)
        .collect()
}

fn seq(id: u64, rollback_to: usize, append: &[u32], max_tokens: u32) -> SequenceDraftRequest {
    SequenceDraftRequest {
        sequence_id: id,
        rollback_to: rollback_to as u32,
        append: append.to_vec(),
        max_tokens,
        sampling: None,
        min_confidence: 0.0,
        candidates: 0,
    }
}

fn sampled(
    mut s: SequenceDraftRequest,
    temperature: f32,
    seed: u64,
    max_q: u32,
) -> SequenceDraftRequest {
    s.sampling = Some(DraftSampling {
        temperature,
        top_k: 0,
        top_p: 0.0,
        seed,
        max_q_tokens: max_q,
    });
    s
}

fn call(core: &mut DraftCore, seqs: Vec<SequenceDraftRequest>) -> Vec<SequenceDraft> {
    core.propose(&ProposeRequest { sequences: seqs })
        .unwrap()
        .sequences
}

fn one(core: &mut DraftCore, s: SequenceDraftRequest) -> SequenceDraft {
    call(core, vec![s]).remove(0)
}

#[test]
fn greedy_drafts_equal_the_models_own_greedy_continuation() {
    for cfg in both_archs() {
        let mut f = fixture(cfg, CoreConfig::default());
        let p = prompt(3, 12);
        let d = one(&mut f.core, seq(1, 0, &p, 16));
        assert!(!d.unknown);
        assert_eq!(d.tokens, greedy(&f.model, &p, 16));
        assert_eq!(d.q.len(), 16);
        for (t, q) in d.tokens.iter().zip(&d.q) {
            assert_eq!(
                (q.ids.as_slice(), q.probs.as_slice()),
                (&[*t][..], &[1.0f32][..])
            );
        }
        // Context plus every draft but the last.
        assert_eq!(d.held, 12 + 15);
        assert_eq!(f.core.held(1), Some(27));
        assert_eq!(f.core.last_call().forwards, 16);
        assert_eq!(f.core.last_call().tokens_drafted, 16);
    }
}

/// Multi-candidate greedy drafts: the main draft is the greedy continuation; each alternative
/// starts with another of the most likely first tokens and continues greedily from it. The
/// alternatives' scratch KV is gone after the call: what the draft holds is the main draft's.
#[test]
fn greedy_candidates_branch_on_the_next_most_likely_first_tokens() {
    for cfg in both_archs() {
        let mut f = fixture(cfg, CoreConfig::default());
        let p = prompt(5, 10);
        let mut r = seq(1, 0, &p, 6);
        r.candidates = 3;
        let d = one(&mut f.core, r);
        assert_eq!(d.tokens, greedy(&f.model, &p, 6));
        assert_eq!(d.alternatives.len(), 2);
        let mut firsts = vec![d.tokens[0]];
        for a in &d.alternatives {
            assert_eq!(a.tokens.len(), 6);
            assert_eq!(a.q.len(), 6);
            // From its own first token on, the greedy continuation.
            let ctx = [&p[..], &a.tokens[..1]].concat();
            assert_eq!(a.tokens[1..], greedy(&f.model, &ctx, 5)[..]);
            firsts.push(a.tokens[0]);
        }
        // Distinct first tokens, in order of the draft's probability.
        firsts.dedup();
        assert_eq!(firsts.len(), 3);
        assert_eq!(d.held, 10 + 5);
        assert_eq!(f.core.kv_tokens(), 10 + 5);
        // The next call continues the main draft as usual.
        let d2 = one(&mut f.core, seq(1, 15, &[d.tokens[5]], 2));
        let ctx = [&p[..], &d.tokens[..]].concat();
        assert_eq!(d2.tokens, greedy(&f.model, &ctx, 2));
        // Sampled candidates: independent draws, each with the q it was drawn from.
        let mut r = sampled(seq(2, 0, &p, 4), 1.0, 7, 0);
        r.candidates = 4;
        let d = one(&mut f.core, r);
        assert_eq!(d.alternatives.len(), 3);
        for a in &d.alternatives {
            assert_eq!(a.tokens.len(), a.q.len());
            for (t, q) in a.tokens.iter().zip(&a.q) {
                assert!(q.ids.contains(t));
            }
        }
    }
}

#[test]
fn after_rollback_and_append_drafts_equal_a_fresh_sequence() {
    for cfg in both_archs() {
        let mut f = fixture(cfg, CoreConfig::default());
        let p = prompt(5, 20);
        let d = one(&mut f.core, seq(1, 0, &p, 8));
        assert_eq!(d.held, 27);

        // Partial acceptance: 3 drafts kept, then the verifier's own (different) token.
        let own = (d.tokens[3] + 1) % 300;
        let d2 = one(&mut f.core, seq(1, 23, &[own], 8));
        let mut ctx: Vec<u32> = p.iter().chain(&d.tokens[..3]).copied().collect();
        ctx.push(own);
        assert_eq!(d2.tokens, greedy(&f.model, &ctx, 8));
        assert_eq!(d2.held as usize, ctx.len() + 7);
        let fresh = one(&mut f.core, seq(2, 0, &ctx, 8));
        assert_eq!(d2.tokens, fresh.tokens);

        // Full acceptance: rollback to exactly what is held, append the last draft + own token.
        let held = d2.held as usize;
        let own = (d2.tokens[7] + 5) % 300;
        let d3 = one(&mut f.core, seq(1, held, &[d2.tokens[7], own], 4));
        ctx.extend_from_slice(&d2.tokens);
        ctx.push(own);
        assert_eq!(d3.tokens, greedy(&f.model, &ctx, 4));
        assert_eq!(d3.held as usize, ctx.len() + 3);

        // Nothing appended: the draft re-runs its last held token to get logits.
        let d4 = one(&mut f.core, seq(1, ctx.len(), &[], 4));
        assert_eq!(d4.tokens, d3.tokens);
        assert_eq!(d4.held, d3.held);
        // Rolling back into the context itself works the same.
        let d5 = one(&mut f.core, seq(1, 10, &[], 3));
        assert_eq!(d5.tokens, greedy(&f.model, &p[..10], 3));
        assert_eq!(d5.held, 12);
    }
}

#[test]
fn unknown_sequences() {
    let mut f = fixture(
        TinyConfig::llama(),
        CoreConfig {
            max_sequences: 2,
            ..Default::default()
        },
    );
    let p = prompt(1, 8);
    // Never seen, rollback_to > 0.
    let d = one(&mut f.core, seq(7, 3, &[1], 4));
    assert!(d.unknown && d.tokens.is_empty());
    assert_eq!(f.core.held(7), None);

    let d = one(&mut f.core, seq(1, 0, &p, 4));
    assert_eq!(d.held, 11);
    // rollback_to past what is held: unknown, and nothing is done to the sequence.
    let d = one(&mut f.core, seq(1, 12, &[5], 4));
    assert!(d.unknown && d.tokens.is_empty());
    assert_eq!(d.held, 11);
    assert_eq!(f.core.held(1), Some(11));
    assert_eq!(f.core.last_call().unknown, 1);

    // Release: unknown afterwards; releasing again is harmless.
    assert_eq!(f.core.release(&[1, 99]), 1);
    assert!(one(&mut f.core, seq(1, 8, &[], 4)).unknown);
    assert_eq!(f.core.release(&[1]), 0);
    assert_eq!(f.core.kv_tokens(), 0);

    // Least recently used eviction at max_sequences = 2.
    one(&mut f.core, seq(10, 0, &p, 2));
    one(&mut f.core, seq(11, 0, &p, 2));
    one(&mut f.core, seq(10, 9, &[], 2)); // 10 used again: 11 is now the oldest
    let before = f.core.evictions();
    one(&mut f.core, seq(12, 0, &p, 2));
    assert_eq!(f.core.evictions(), before + 1);
    assert_eq!(f.core.sequences(), 2);
    assert!(one(&mut f.core, seq(11, 9, &[], 2)).unknown);
    assert!(!one(&mut f.core, seq(10, 9, &[], 2)).unknown);
    assert!(!one(&mut f.core, seq(12, 9, &[], 2)).unknown);

    // Idle eviction after idle_ttl (60 s by default).
    let later = Instant::now() + Duration::from_secs(61);
    let d = f
        .core
        .propose_at(
            &ProposeRequest {
                sequences: vec![seq(10, 9, &[], 2)],
            },
            later,
        )
        .unwrap();
    assert!(d.sequences[0].unknown);
    assert_eq!(f.core.last_call().evicted, 2);
    assert_eq!(f.core.sequences(), 0);
}

#[test]
fn six_sequences_in_one_call_draft_what_each_drafts_alone() {
    for cfg in both_archs() {
        let mut batched = fixture(cfg.clone(), CoreConfig::default());
        let mut alone = fixture(cfg, CoreConfig::default());
        // 300 tokens of one append go over the 256-token forward budget: chunked.
        let lens = [3usize, 17, 40, 5, 300, 1];
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(i as u32, n))
            .collect();
        let max = [8u32, 8, 3, 8, 8, 5];
        let reqs: Vec<_> = prompts
            .iter()
            .zip(max)
            .enumerate()
            .map(|(i, (p, m))| seq(i as u64, 0, p, m))
            .collect();
        let got = call(&mut batched.core, reqs.clone());
        // 366 appended tokens: two forwards, then one per further position (up to 8).
        assert_eq!(batched.core.last_call().forwards, 2 + 7);
        for (r, g) in reqs.into_iter().zip(&got) {
            let a = one(&mut alone.core, r);
            assert_eq!(g.tokens, a.tokens, "sequence {}", g.sequence_id);
            assert_eq!(g.held, a.held);
        }
        // A second round: each accepts one draft and appends its own token.
        let reqs: Vec<_> = got
            .iter()
            .enumerate()
            .map(|(i, g)| seq(i as u64, lens[i] + 1, &[(g.tokens[1] + 1) % 300], 4))
            .collect();
        let got = call(&mut batched.core, reqs.clone());
        for (r, g) in reqs.into_iter().zip(&got) {
            assert_eq!(g.tokens, one(&mut alone.core, r).tokens);
        }
    }
}

#[test]
fn sampled_drafts_carry_q_and_repeat_with_the_seed() {
    let mut f = fixture(TinyConfig::qwen2(), CoreConfig::default());
    let p = prompt(2, 10);
    let reqs = vec![
        sampled(seq(1, 0, &p, 6), 0.9, 42, 0),
        sampled(seq(2, 0, &p, 6), 0.9, 42, 0),
    ];
    let d = call(&mut f.core, reqs);
    assert_eq!(d[0].tokens, d[1].tokens);
    assert_eq!(d[0].q, d[1].q);
    for s in &d {
        assert_eq!(s.tokens.len(), 6);
        for (t, q) in s.tokens.iter().zip(&s.q) {
            assert!(q.ids.contains(t), "{t} not in {:?}", q.ids);
            assert!(q.ids.len() <= 32 && q.ids.len() == q.probs.len());
            let sum: f32 = q.probs.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sum}");
            assert!(q.probs.windows(2).all(|w| w[0] >= w[1]));
        }
    }
    // The same seed from the same context again: the same draft.
    let again = one(&mut f.core, sampled(seq(1, 10, &[], 6), 0.9, 42, 0));
    // (Run alone instead of in a batch of two, the logits may differ in the last float bits.)
    assert_eq!(again.tokens, d[0].tokens);
    for (a, b) in again.q.iter().zip(&d[0].q) {
        assert_eq!(a.ids, b.ids);
        for (x, y) in a.probs.iter().zip(&b.probs) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
    // The first q is the model's softmax at temperature 0.9, top 32, renormalized.
    let logits = f.model.transformer.score(&p).unwrap().pop().unwrap();
    let want = truncated_softmax(&logits, 0.9, 32);
    for ((id, p), (wid, wp)) in again.q[0].ids.iter().zip(&again.q[0].probs).zip(&want) {
        assert_eq!(id, wid);
        assert!((f64::from(*p) - wp).abs() < 1e-4, "{p} vs {wp}");
    }
}

/// softmax(logits / t) in f64, the `keep` most likely renormalized, most likely first.
fn truncated_softmax(logits: &[f32], t: f64, keep: usize) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut v: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (f64::from(l - max) / t).exp()))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(keep);
    let z: f64 = v.iter().map(|x| x.1).sum();
    v.into_iter().map(|(i, x)| (i, x / z)).collect()
}

fn chi_square(counts: &[(u32, usize)], want: &[(u32, f64)], n: usize) -> f64 {
    want.iter()
        .map(|&(id, p)| {
            let o = counts.iter().find(|c| c.0 == id).map_or(0, |c| c.1) as f64;
            let e = p * n as f64;
            (o - e) * (o - e) / e
        })
        .sum()
}

#[test]
fn sampled_tokens_follow_the_truncated_temperature_softmax() {
    const SEQS: usize = 64;
    const ROUNDS: usize = 64;
    const KEEP: usize = 8;
    let mut f = fixture(
        TinyConfig::llama(),
        CoreConfig {
            max_sequences: SEQS,
            ..Default::default()
        },
    );
    let p = prompt(9, 10);
    // Load every sequence with the context, drafting nothing (max_tokens 0 only syncs the KV).
    let d = call(
        &mut f.core,
        (0..SEQS as u64).map(|i| seq(i, 0, &p, 0)).collect(),
    );
    assert!(d.iter().all(|s| s.tokens.is_empty() && s.held == 10));
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for round in 0..ROUNDS {
        let reqs = (0..SEQS as u64)
            .map(|i| {
                sampled(
                    seq(i, 10, &[], 1),
                    0.8,
                    (round * SEQS) as u64 + i,
                    KEEP as u32,
                )
            })
            .collect();
        for s in call(&mut f.core, reqs) {
            assert_eq!(s.held, 10);
            let t = s.tokens[0];
            match counts.iter_mut().find(|c| c.0 == t) {
                Some(c) => c.1 += 1,
                None => counts.push((t, 1)),
            }
        }
    }
    let n = SEQS * ROUNDS;
    let logits = f.model.transformer.score(&p).unwrap().pop().unwrap();
    let want = truncated_softmax(&logits, 0.8, KEEP);
    // Only the top KEEP tokens are ever drawn.
    assert!(
        counts.iter().all(|c| want.iter().any(|w| w.0 == c.0)),
        "{counts:?} vs {want:?}"
    );
    // 7 degrees of freedom; 24.32 is the 0.999 quantile.
    let chi2 = chi_square(&counts, &want, n);
    assert!(chi2 < 24.32, "chi-square {chi2}: {counts:?} vs {want:?}");
    // The test can tell distributions apart: the temperature-1 softmax is rejected.
    let wrong = truncated_softmax(&logits, 1.0, KEEP);
    let chi2_wrong = chi_square(&counts, &wrong, n);
    assert!(chi2_wrong > 24.32, "chi-square against T=1: {chi2_wrong}");
}

#[test]
fn min_confidence_stops_where_the_top_probability_falls_below_it() {
    let mut f = fixture(TinyConfig::llama(), CoreConfig::default());
    // A prompt whose greedy continuation has a position with a top probability below every
    // earlier one: a threshold between the two stops exactly there.
    let (p, cont, tops, stop) = (0..32)
        .find_map(|i| {
            let p = prompt(i, 10);
            let cont = greedy(&f.model, &p, 16);
            // Top probability (temperature 1) before each greedy position.
            let ctx: Vec<u32> = p.iter().chain(&cont).copied().collect();
            let scores = f.model.transformer.score(&ctx).unwrap();
            let tops: Vec<f32> = scores[p.len() - 1..p.len() - 1 + 16]
                .iter()
                .map(|row| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    1.0 / row.iter().map(|l| (l - max).exp()).sum::<f32>()
                })
                .collect();
            let stop = (2..16).find(|&j| tops[..j].iter().all(|&t| tops[j] < t - 0.01))?;
            Some((p, cont, tops, stop))
        })
        .unwrap();
    let earlier = tops[..stop].iter().copied().fold(f32::INFINITY, f32::min);
    let threshold = (tops[stop] + earlier) / 2.0;
    let mut r = seq(1, 0, &p, 16);
    r.min_confidence = threshold;
    let d = one(&mut f.core, r);
    assert_eq!(d.tokens, cont[..stop]);
    // Every draft was run through the model to judge the next position.
    assert_eq!(d.held as usize, p.len() + stop);
    // A threshold of 1 drafts nothing.
    let mut r = seq(2, 0, &p, 16);
    r.min_confidence = 1.0;
    let d = one(&mut f.core, r);
    assert!(d.tokens.is_empty());
    assert_eq!(d.held, 10);
}

#[test]
fn drafts_stop_at_the_context_limit() {
    let mut f = fixture(
        TinyConfig {
            max_position_embeddings: 64,
            ..TinyConfig::qwen2()
        },
        CoreConfig::default(),
    );
    let d = one(&mut f.core, seq(1, 0, &prompt(1, 61), 8));
    assert_eq!(d.tokens.len(), 3);
    assert_eq!(d.held, 63);
    let d = one(&mut f.core, seq(2, 0, &prompt(1, 64), 8));
    assert!(d.tokens.is_empty());
    assert_eq!(d.held, 64);
}

#[test]
fn validation_errors_name_the_field_and_change_nothing() {
    let mut f = fixture(
        TinyConfig::llama(),
        CoreConfig {
            max_sequences: 3,
            ..Default::default()
        },
    );
    let p = prompt(1, 5);
    one(&mut f.core, seq(1, 0, &p, 2));
    let held = f.core.held(1);
    let bad = |s: SequenceDraftRequest| vec![seq(1, 0, &p, 2), s];
    let mut temp = sampled(seq(2, 0, &p, 2), -1.0, 0, 0);
    let mut top_p = sampled(seq(2, 0, &p, 2), 1.0, 0, 0);
    top_p.sampling.as_mut().unwrap().top_p = 1.5;
    let mut max_q = sampled(seq(2, 0, &p, 2), 1.0, 0, 0);
    max_q.sampling.as_mut().unwrap().max_q_tokens = 5000;
    let mut conf = seq(2, 0, &p, 2);
    conf.min_confidence = f32::NAN;
    temp.min_confidence = 0.5;
    let cases: Vec<(Vec<SequenceDraftRequest>, &str)> = vec![
        (
            (0..4).map(|i| seq(i, 0, &p, 1)).collect(),
            "sequences: 4 in one call; this draft takes at most 3",
        ),
        (
            bad(seq(2, 0, &p, 17)),
            "sequences[1].max_tokens is 17; this draft drafts at most 16",
        ),
        (
            bad(seq(2, 0, &[1, 2, 304], 2)),
            "sequences[1].append[2] is token id 304",
        ),
        (
            bad(seq(2, 510, &p, 2)),
            "rollback_to 510 + 5 appended tokens = 515 tokens; the draft's context is 512",
        ),
        (
            bad(seq(1, 0, &p, 2)),
            "sequences[1].sequence_id 1 repeats sequences[0]",
        ),
        (bad(temp), "sequences[1].sampling.temperature is -1"),
        (bad(top_p), "sequences[1].sampling.top_p is 1.5"),
        (bad(max_q), "sequences[1].sampling.max_q_tokens is 5000"),
        (bad(conf), "sequences[1].min_confidence is NaN"),
    ];
    for (seqs, want) in cases {
        let e = f
            .core
            .propose(&ProposeRequest { sequences: seqs })
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.to_string().contains(want), "{e} lacks '{want}'");
        assert!(!matches!(e, DraftError::Forward(_)));
        assert_eq!(f.core.held(1), held);
        assert_eq!(f.core.sequences(), 1);
    }
}

#[test]
fn concurrent_calls_merge_into_one_batch_in_order() {
    let mut merged = fixture(TinyConfig::llama(), CoreConfig::default());
    let mut apart = fixture(TinyConfig::llama(), CoreConfig::default());
    let a = ProposeRequest {
        sequences: vec![seq(1, 0, &prompt(1, 7), 4), seq(2, 0, &prompt(2, 9), 4)],
    };
    let b = ProposeRequest {
        sequences: vec![seq(3, 0, &prompt(3, 5), 4)],
    };
    let invalid = ProposeRequest {
        sequences: vec![seq(4, 0, &prompt(4, 5), 40)],
    };
    // Sequence 1 again: must run after `a`, in a batch of its own.
    let a2 = ProposeRequest {
        sequences: vec![seq(1, 8, &[9], 2)],
    };
    let got = merged
        .core
        .propose_many(&[&a, &b, &invalid, &a2], Instant::now());
    // a + b share 4 forwards, a2 takes 2.
    assert_eq!(merged.core.last_call().forwards, 4 + 2);
    assert_eq!(merged.core.last_call().sequences, 4);
    let e = got[2].as_ref().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for (req, got) in [&a, &b, &a2].into_iter().zip([&got[0], &got[1], &got[3]]) {
        let want = apart.core.propose(req).unwrap();
        assert_eq!(got.as_ref().unwrap(), &want);
    }
}

#[test]
fn the_kv_budget_evicts_least_recently_used_then_refuses() {
    let mut f = fixture(
        TinyConfig::llama(),
        CoreConfig {
            max_kv_tokens: Some(100),
            ..Default::default()
        },
    );
    let p = prompt(1, 30);
    for id in 1..=3 {
        assert_eq!(one(&mut f.core, seq(id, 0, &p, 4)).held, 33);
    }
    assert_eq!(f.core.kv_tokens(), 99);
    // Up to 33 more positions: the least recently used sequence (1) makes room.
    let d = one(&mut f.core, seq(4, 0, &p, 4));
    assert_eq!(d.tokens.len(), 4);
    assert_eq!(f.core.last_call().evicted, 1);
    assert_eq!(f.core.held(1), None);
    assert!(f.core.kv_tokens() <= 100);
    // A sequence's own rollback frees what it held: all drafts rejected, sequence 4 goes on
    // within the budget (30 + 1 + 3 held next to 66) without evicting anyone.
    let d = one(&mut f.core, seq(4, 30, &[(d.tokens[0] + 1) % 300], 4));
    assert_eq!(d.held, 34);
    assert_eq!(f.core.last_call().evicted, 0);
    assert_eq!(f.core.kv_tokens(), 100);
    // More than the whole budget in one call: RESOURCE_EXHAUSTED, naming the budget.
    let e = f
        .core
        .propose(&ProposeRequest {
            sequences: vec![seq(9, 0, &prompt(2, 98), 4)],
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("KV budget is 100"), "{e}");
    // Nobody was evicted for a call that could never fit.
    assert_eq!(f.core.sequences(), 3);
}
