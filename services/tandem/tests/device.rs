//! `--device` from the outside: a binary without CUDA refuses a GPU at once with a message that
//! says how to get one, and `bench device` (what scripts/gpu-check runs on a GPU) works end to
//! end on the CPU: random-weight model written by `make-model`, logits against a reference
//! device, speed, verification cost, TP=1 through the group code and TP=2 over TCP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// A tiny random-weight model written by `tandem make-model` (bf16, as real checkpoints).
fn make_tiny(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("tiny");
    let out = tandem()
        .args(["make-model", "--shape", "tiny", "--dtype", "bf16", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

#[test]
fn a_gpu_on_a_build_without_cuda_fails_at_once_and_says_why() {
    if cfg!(feature = "cuda") {
        return; // the GPU binary's errors need a driver to tell apart (scripts/gpu-check)
    }
    let dir = tempfile::tempdir().unwrap();
    let model = make_tiny(dir.path());
    for args in [
        vec!["worker", "--listen", "127.0.0.1:0", "--device", "cuda"],
        vec!["draft", "--listen", "127.0.0.1:0", "--device", "cuda:1"],
        vec!["up", "--no-draft", "--device", "cuda"],
    ] {
        let started = Instant::now();
        let out = tandem()
            .args(&args)
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("built without CUDA") && err.contains("scripts/build-cuda"),
            "{args:?}: {err}"
        );
        // Bounds only a hang: it fails before loading anything.
        assert!(started.elapsed() < Duration::from_secs(60), "{args:?}");
    }
    let out = tandem()
        .args(["worker", "--device", "tpu", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn bench_device_runs_every_check_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_tiny(dir.path());
    let results = dir.path().join("results.jsonl");
    let out = tandem()
        .args(["bench", "device", "--device", "cpu", "--reference", "cpu"])
        .args(["--quantize", "q8_0", "--batch", "1,4", "--new-tokens", "8"])
        .args(["--prompt-tokens", "32", "--tensor-parallel", "--model"])
        .arg(&model)
        .arg("--draft")
        .arg(&model)
        .arg("--out")
        .arg(&results)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = std::fs::read_to_string(&results).unwrap();
    let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    // The same device and weights: the same logits.
    assert_eq!(r["logits"]["top1_agreement"], 1.0, "{r}");
    assert_eq!(r["logits"]["max_abs_diff"], 0.0, "{r}");
    for b in ["1", "4"] {
        assert!(r["decode_tokens_per_s"][b].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["speculation"]["predicted_speedup"].as_f64().unwrap() > 0.0);
    let tp = &r["tensor_parallel"];
    assert_eq!(tp["tp1_max_abs_diff"], 0.0, "{r}");
    // TP=2 sums partial products in another order, and the next layer's int8 activations
    // (Q8_0) can round the other way: close, not equal.
    assert!(tp["tp2_tcp_max_abs_diff"].as_f64().unwrap() < 0.5, "{r}");
    assert_eq!(tp["tp2_tcp_top1"], 1.0, "{r}");
}
