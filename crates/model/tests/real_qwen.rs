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

/// A prompt's logits, and those of the tokens decoded after it, must not depend on how the
/// scheduler chunked the prompt or what shared its forwards (batch invariance: the same answer
/// under any load). Whole in one 100+-row forward (once the masked batched attention) vs in
/// uneven chunks, one of them beside another sequence's prefill (so that forward has more than
/// 32 rows), then greedy decoding beside the other sequence.
#[test]
fn qwen_prompt_gives_the_same_bits_whole_chunked_and_batched() {
    let Some(model) = qwen(1024) else {
        return;
    };
    let t = &model.transformer;
    let enc = |s: &str| model.text.encode(s, false).unwrap();
    let prompt = enc(
        "use std::collections::HashMap;\n\n/// Counts how often each word occurs in `text`, \
         ignoring case and punctuation.\npub fn word_counts(text: &str) -> HashMap<String, usize> \
         {\n    let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n        \
         let w: String = word.chars().filter(|c| c.is_alphanumeric()).collect();\n        if w.is_empty() \
         {\n            continue;\n        }\n",
    );
    let other = enc("SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id GROUP BY name ORDER BY 2 DESC LIMIT 10;");
    assert!(prompt.len() > 64, "{} tokens", prompt.len());
    fn input(slot: tandem_model::kv::SlotId, tokens: &[u32]) -> tandem_model::SeqInput<'_> {
        tandem_model::SeqInput {
            slot,
            tokens,
            all_logits: false,
        }
    }
    let last = |rows: Vec<Vec<Vec<f32>>>, i: usize| rows[i].last().unwrap().clone();

    // Alone, whole.
    let mut kv = t.new_cache();
    let a = kv.allocate();
    let mut alone = vec![last(
        t.forward(&mut kv, &[input(a, &prompt)])
            .unwrap()
            .to_vecs()
            .unwrap(),
        0,
    )];
    for _ in 0..4 {
        let tok = common::argmax(alone.last().unwrap());
        alone.push(last(
            t.forward(&mut kv, &[input(a, &[tok])])
                .unwrap()
                .to_vecs()
                .unwrap(),
            0,
        ));
    }

    // Chunked 7 / 41 / rest, the middle chunk beside the other sequence's whole prompt.
    let mut kv = t.new_cache();
    let (b, o) = (kv.allocate(), kv.allocate());
    let (c1, rest) = prompt.split_at(7);
    let (c2, c3) = rest.split_at(41);
    t.forward(&mut kv, &[input(b, c1)]).unwrap();
    t.forward(&mut kv, &[input(o, &other), input(b, c2)])
        .unwrap();
    let out = t
        .forward(&mut kv, &[input(b, c3), input(o, &[13])])
        .unwrap()
        .to_vecs()
        .unwrap();
    let mut chunked = vec![last(out, 0)];
    for _ in 0..4 {
        let tok = common::argmax(chunked.last().unwrap());
        let out = t
            .forward(&mut kv, &[input(o, &[17]), input(b, &[tok])])
            .unwrap()
            .to_vecs()
            .unwrap();
        chunked.push(last(out, 1));
    }
    common::assert_same_bits(&alone, &chunked);
}
