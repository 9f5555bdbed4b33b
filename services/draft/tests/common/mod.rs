//! Reference helpers shared by the draft's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use tandem_model::{Model, SeqInput};

/// Index of the largest logit; ties go to the lowest id (as the draft's own greedy pick).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// The model's own greedy continuation: a plain forward loop, no EOS stop.
pub fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let t = &model.transformer;
    let mut kv = t.new_cache();
    let slot = kv.allocate();
    let mut out = Vec::new();
    let mut next = prompt.to_vec();
    for _ in 0..n {
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
        out.push(tok);
        next = vec![tok];
    }
    out
}
