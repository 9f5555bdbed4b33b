//! Helpers shared by the model crate's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use tandem_model::{Model, SeqInput};

/// Index of the largest logit (ties: the first).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy continuation of `prompt` with the bare model (no engine), stopping at an
/// end-of-sequence token or after `max_new` tokens.
pub fn greedy(model: &Model, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let t = &model.transformer;
    let mut kv = t.new_cache();
    let slot = kv.allocate();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..max_new {
        let logits = t
            .forward(
                &mut kv,
                &[SeqInput {
                    slot,
                    tokens: &next,
                    all_logits: false,
                }],
            )
            .unwrap()
            .to_vecs()
            .unwrap();
        let tok = argmax(&logits[0][0]);
        if model.text.eos_token_ids.contains(&tok) {
            break;
        }
        out.push(tok);
        next = vec![tok];
    }
    out
}

/// The logits of the last `n` tokens of `ids` computed both ways a verifier and a decoder do:
/// one token per forward, and all `n` in one forward (beside another sequence's decode step in
/// the same batch, as in a real engine step). Returns (one at a time, batched).
pub fn logits_alone_and_batched(
    model: &Model,
    ids: &[u32],
    n: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = &model.transformer;
    let (prefix, tail) = ids.split_at(ids.len() - n);
    let mut kv = t.new_cache();
    let (alone, batched, other) = (kv.allocate(), kv.allocate(), kv.allocate());
    for slot in [alone, batched, other] {
        t.forward(
            &mut kv,
            &[SeqInput {
                slot,
                tokens: prefix,
                all_logits: false,
            }],
        )
        .unwrap();
    }
    let mut one_by_one = Vec::new();
    for tok in tail {
        let mut rows = t
            .forward(
                &mut kv,
                &[SeqInput {
                    slot: alone,
                    tokens: std::slice::from_ref(tok),
                    all_logits: false,
                }],
            )
            .unwrap()
            .to_vecs()
            .unwrap();
        one_by_one.push(rows.remove(0).remove(0));
    }
    let mut rows = t
        .forward(
            &mut kv,
            &[
                SeqInput {
                    slot: other,
                    tokens: &tail[..1],
                    all_logits: false,
                },
                SeqInput {
                    slot: batched,
                    tokens: tail,
                    all_logits: true,
                },
            ],
        )
        .unwrap()
        .to_vecs()
        .unwrap();
    (one_by_one, rows.remove(1))
}

/// Asserts two sets of logit rows are bit-identical, naming the first row and index that differ.
pub fn assert_same_bits(a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len());
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(i) = x
            .iter()
            .zip(y)
            .position(|(p, q)| p.to_bits() != q.to_bits())
        {
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            panic!(
                "row {r} differs first at logit {i} ({} vs {}); largest difference {d}",
                x[i], y[i]
            );
        }
    }
}
