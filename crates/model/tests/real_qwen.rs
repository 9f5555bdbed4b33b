//! Real weights: Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K/Q6_K, fetched by scripts/fetch-models).
//! Skipped with a message when the file is absent, unless TANDEM_REQUIRE_REAL_MODELS=1.
#![allow(clippy::unwrap_used)]

use tandem_model::{ChatMessage, LoadOptions, Model};

mod common;
use common::greedy;

#[test]
fn qwen_coder_writes_python() {
    let Some(path) = tandem_testkit::real_model("qwen2.5-coder-1.5b-instruct.gguf", "qwen-1.5b")
    else {
        return;
    };
    let model = Model::load(
        &path,
        &LoadOptions {
            max_context: Some(1024),
            ..Default::default()
        },
    )
    .unwrap();
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
