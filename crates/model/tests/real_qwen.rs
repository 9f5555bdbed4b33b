//! Real weights: Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K/Q6_K, fetched by scripts/fetch-models).
//! Skipped with a message when the file is absent, unless TANDEM_REQUIRE_REAL_MODELS=1.
#![allow(clippy::unwrap_used)]

use tandem_model::{ChatMessage, LoadOptions, Model};

mod common;
use common::greedy;

/// The quantized model (as served), or None (skipped) when it is not in the model cache.
fn qwen(max_context: usize) -> Option<Model> {
    let path = tandem_testkit::real_model("qwen2.5-coder-1.5b-instruct.gguf", "qwen-1.5b")?;
    let opts = LoadOptions {
        max_context: Some(max_context),
        ..Default::default()
    };
    Some(Model::load(&path, &opts).unwrap())
}

#[test]
fn qwen_coder_writes_python() {
    let Some(model) = qwen(1024) else {
        return;
    };
    let prompt = model
        .text
        .apply_chat_template(&[ChatMessage {
            role: "user".into(),
            content: "Write a Python function that returns the square of a number. Only code."
                .into(),
        }])
        .unwrap();
    let ids = model.text.encode(&prompt, false).unwrap();
    let out = greedy(&model, &ids, 40);
    let text = model.text.decode(&out).unwrap();
    eprintln!("{text}");
    assert!(text.contains("def ") && text.contains("return"), "{text}");
}

/// Verification scores drafted tokens in one batched forward; plain decoding scores them one at
/// a time. On these quantized weights the two must give the same bits, or speculative greedy
/// picks other tokens than plain greedy (before the row-exact attention and the single-row
/// padding of Q6_K they differed by up to 0.5 logits).
#[test]
fn qwen_scores_a_token_batched_with_the_bits_it_gets_alone() {
    let Some(model) = qwen(512) else {
        return;
    };
    let ids = model
        .text
        .encode(
            "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):",
            false,
        )
        .unwrap();
    let (alone, batched) = common::logits_alone_and_batched(&model, &ids, 6);
    common::assert_same_bits(&alone, &batched);
}
