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
