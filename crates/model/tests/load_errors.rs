//! Loading failures name the file and the tensor or key at fault.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use tandem_model::{LoadOptions, Model, ModelError};
use tandem_testkit::{tiny_model, TinyConfig};

fn load(p: &Path) -> ModelError {
    match Model::load(p, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unknown_architecture_names_the_file() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    edit_config(&tiny.dir, |v| {
        v["model_type"] = "gpt_neox".into();
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let e = load(&tiny.dir).to_string();
    assert!(e.contains("config.json") && e.contains("gpt_neox"), "{e}");
}

#[test]
fn wrong_shape_names_the_tensor() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    edit_config(&tiny.dir, |v| v["intermediate_size"] = 96.into());
    let e = load(&tiny.dir).to_string();
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("96"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    edit_config(&tiny.dir, |v| v["num_hidden_layers"] = 3.into());
    let e = load(&tiny.dir).to_string();
    assert!(e.contains("model.layers.2."), "{e}");
}

#[test]
fn heads_that_do_not_divide_are_refused() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    edit_config(&tiny.dir, |v| v["num_key_value_heads"] = 3.into());
    let e = load(&tiny.dir).to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn not_a_model_and_truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(dir.path()).to_string();
    assert!(e.contains("no model found"), "{e}");

    // A GGUF cut short: header fine, tensor data missing.
    let Some(cache) = std::env::var_os("TANDEM_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tandem/models")))
    else {
        return;
    };
    let src = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.exists() {
        return;
    }
    let bytes = std::fs::read(&src).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&cut).to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = load(&junk).to_string();
    assert!(e.contains("junk.gguf"), "{e}");
}
