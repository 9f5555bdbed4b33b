//! The real draft model, Qwen2.5-Coder-0.5B-Instruct (GGUF, fetched by `scripts/fetch-models
//! qwen-0.5b`): greedy drafts for a code prompt equal its own greedy continuation, and the time
//! per drafted position for 1 and 8 sequences is printed (not asserted). Skipped with a message
//! when the file is absent, unless TANDEM_REQUIRE_REAL_MODELS=1.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use tandem_draft::{CoreConfig, DraftCore};
use tandem_model::{ChatMessage, LoadOptions, Model};
use tandem_proto::draft::v1::{DraftSampling, ProposeRequest, SequenceDraftRequest};

mod common;
use common::greedy;

fn seq(id: u64, rollback_to: usize, append: Vec<u32>, max_tokens: u32) -> SequenceDraftRequest {
    SequenceDraftRequest {
        sequence_id: id,
        rollback_to: rollback_to as u32,
        append,
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn qwen_0_5b_drafts_its_own_greedy_continuation() {
    let Some(path) = tandem_testkit::real_model("qwen2.5-coder-0.5b-instruct.gguf", "qwen-0.5b")
    else {
        return;
    };
    let model = Model::load(
        &path,
        &LoadOptions {
            max_context: Some(2048),
            ..Default::default()
        },
    )
    .unwrap();
    let encode = |task: &str| {
        let text = model
            .text
            .apply_chat_template(&[ChatMessage {
                role: "user".into(),
                content: task.into(),
            }])
            .unwrap();
        model.text.encode(&text, false).unwrap()
    };
    let prompt =
        encode("Write a Python function that checks whether a number is prime. Only code.");
    let want = greedy(&model, &prompt, 16);
    // The bare model's decode step, for comparison (same machine, same moment).
    let started = Instant::now();
    greedy(&model, &prompt, 1);
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    greedy(&model, &prompt, 9);
    let bare_step = (started.elapsed().as_secs_f64() - prefill) / 8.0;
    let tasks = [
        "Write a Rust function that reverses a string.",
        "Write a SQL query that counts users per country.",
        "Write a JavaScript debounce function.",
        "Write a Go HTTP handler that returns JSON.",
        "Write a C function that sums an array.",
        "Write a Python class for a stack.",
        "Write a bash loop over files in a folder.",
    ];
    let others: Vec<Vec<u32>> = tasks.iter().map(|t| encode(t)).collect();
    let text = model.text.clone();

    let mut core = DraftCore::new(model, CoreConfig::default());
    core.warm_up().unwrap();
    let d = core
        .propose(&ProposeRequest {
            sequences: vec![seq(1, 0, prompt.clone(), 16)],
        })
        .unwrap()
        .sequences
        .remove(0);
    eprintln!("drafted: {:?}", text.decode(&d.tokens).unwrap());
    assert_eq!(d.tokens, want);
    assert_eq!(d.held as usize, prompt.len() + 15);

    // Sampled drafts over the real 152k vocabulary: q is the top 32, sums to 1, holds the token.
    let mut r = seq(100, 0, prompt.clone(), 6);
    r.sampling = Some(DraftSampling {
        temperature: 0.7,
        seed: 1,
        ..Default::default()
    });
    let sd = core
        .propose(&ProposeRequest { sequences: vec![r] })
        .unwrap()
        .sequences
        .remove(0);
    eprintln!("sampled: {:?}", text.decode(&sd.tokens).unwrap());
    assert_eq!(sd.tokens.len(), 6);
    for (t, q) in sd.tokens.iter().zip(&sd.q) {
        assert!(q.ids.contains(t) && q.ids.len() <= 32);
        assert!((q.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    core.release(&[100]);

    // Time per drafted position, one sequence: accept all, append one token, draft 8.
    let mut held = d.held as usize;
    let mut last = *d.tokens.last().unwrap();
    let mut one_s = 0.0;
    let rounds = 3;
    for _ in 0..rounds {
        let started = Instant::now();
        let d = core
            .propose(&ProposeRequest {
                sequences: vec![seq(1, held, vec![last], 8)],
            })
            .unwrap()
            .sequences
            .remove(0);
        one_s += started.elapsed().as_secs_f64();
        held = d.held as usize;
        last = *d.tokens.last().unwrap();
    }
    let per_pos_1 = one_s / f64::from(rounds * 8);

    // Eight sequences: load the others' prompts, then draft 8 for all eight at once.
    let mut reqs: Vec<SequenceDraftRequest> = others
        .iter()
        .enumerate()
        .map(|(i, p)| seq(i as u64 + 2, 0, p.clone(), 1))
        .collect();
    reqs.push(seq(1, held, vec![last], 1));
    let r = core.propose(&ProposeRequest { sequences: reqs }).unwrap();
    let mut state: Vec<(u64, usize, u32)> = r
        .sequences
        .iter()
        .map(|s| (s.sequence_id, s.held as usize, s.tokens[0]))
        .collect();
    let mut eight_s = 0.0;
    for _ in 0..rounds {
        let reqs = state
            .iter()
            .map(|&(id, held, last)| seq(id, held, vec![last], 8))
            .collect();
        let started = Instant::now();
        let r = core.propose(&ProposeRequest { sequences: reqs }).unwrap();
        eight_s += started.elapsed().as_secs_f64();
        assert_eq!(core.last_call().forwards, 8);
        state = r
            .sequences
            .iter()
            .map(|s| (s.sequence_id, s.held as usize, *s.tokens.last().unwrap()))
            .collect();
    }
    let per_pos_8 = eight_s / f64::from(rounds * 8);
    eprintln!(
        "qwen2.5-coder-0.5b draft, per drafted position: 1 sequence {:.1} ms, 8 sequences {:.1} ms \
         ({:.1} ms per sequence-token); the bare model's decode step: {:.1} ms",
        per_pos_1 * 1e3,
        per_pos_8 * 1e3,
        per_pos_8 * 1e3 / 8.0,
        bare_step * 1e3
    );
}
