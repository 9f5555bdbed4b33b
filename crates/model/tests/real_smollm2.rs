//! Real weights: SmolLM2-135M-Instruct (GGUF Q4_1, fetched by scripts/fetch-models). Skipped with
//! a message when the file is absent, unless TANDEM_REQUIRE_REAL_MODELS=1 (as CI sets), where a
//! missing model fails the test.
#![allow(clippy::unwrap_used)]

use tandem_model::{BatchMatmul, ChatMessage, LoadOptions, Model, QuantMode};

mod common;
use common::{argmax, greedy};

#[test]
fn smollm2_answers_paris_quantized_and_dequantized() {
    let Some(path) = tandem_testkit::real_smollm2() else {
        return;
    };
    for quant in [QuantMode::Quantized, QuantMode::Dequantized] {
        let opts = LoadOptions {
            quant,
            max_context: Some(2048),
            ..Default::default()
        };
        let model = Model::load(&path, &opts).unwrap();
        let prompt = model
            .text
            .apply_chat_template(&[
                // Without a system turn the template inserts SmolLM's own, with which the 135M
                // model free-associates about Paris landmarks instead of answering.
                ChatMessage {
                    role: "system".into(),
                    content: "You are a helpful assistant.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "What is the capital of France?".into(),
                },
            ])
            .unwrap();
        let ids = model.text.encode(&prompt, false).unwrap();
        let out = greedy(&model, &ids, 24);
        let text = model.text.decode(&out).unwrap();
        eprintln!("{quant:?}: {text:?}");
        assert!(text.contains("Paris"), "{quant:?}: {text:?}");
    }
}

/// Teacher-forced on a fixed text: the quantized model's top-1 token equals the dequantized
/// (f32) model's on at least 95% of positions.
#[test]
fn smollm2_quantized_agrees_with_dequantized() {
    let Some(path) = tandem_testkit::real_smollm2() else {
        return;
    };
    let load = |quant| {
        Model::load(
            &path,
            &LoadOptions {
                quant,
                max_context: Some(1024),
                // Every row through candle's quantized kernel, not the dense batch path.
                batch_matmul: BatchMatmul {
                    dense_from_rows: usize::MAX,
                    keep_dense_copy: false,
                },
                shard: None,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let q = load(QuantMode::Quantized);
    let f = load(QuantMode::Dequantized);
    let text = "The history of the Roman Empire spans more than a thousand years. It began when \
        Augustus became the first emperor in 27 BC, after a century of civil wars had weakened \
        the Republic. At its height the empire stretched from Britain to Egypt, and its roads, \
        laws and language shaped Europe long after the western half fell in 476 AD. The eastern \
        half, with its capital at Constantinople, lasted until 1453. def fibonacci(n):\n    \
        if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n";
    let ids = q.text.encode(text, false).unwrap();
    assert!(ids.len() > 100);
    let lq = q.transformer.score(&ids).unwrap();
    let lf = f.transformer.score(&ids).unwrap();
    let same = lq
        .iter()
        .zip(&lf)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let frac = same as f64 / ids.len() as f64;
    eprintln!("top-1 agreement {same}/{} = {frac:.3}", ids.len());
    assert!(frac >= 0.95, "top-1 agreement {frac:.3} < 0.95");
}
