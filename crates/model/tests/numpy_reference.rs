//! Logits of the tiny testkit models against tests/reference/transformer_ref.py, an independent
//! NumPy implementation written from the published Llama / Qwen2 equations.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use tandem_model::{LoadOptions, Model, SeqInput};
use tandem_testkit::{tiny_model, TinyConfig};

fn reference_logits(dir: &Path, seqs: &[Vec<u32>]) -> Vec<Vec<Vec<f64>>> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/transformer_ref.py");
    let ids: Vec<String> = seqs
        .iter()
        .map(|s| {
            s.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .arg("--ids")
        .arg(ids.join(";"))
        .output()
        .expect("python3 runs (numpy installed: pip install numpy)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(v["logits"].clone()).unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(x, y)| (f64::from(*x) - y).abs())
        })
        .fold(0.0, f64::max)
}

fn check(cfg: TinyConfig) {
    let tiny = tiny_model(&cfg).unwrap();
    let model = Model::load(&tiny.dir, &LoadOptions::default()).unwrap();
    let v = tiny.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = vec![
        (0..23).map(|i| (i * 37 + 5) % v).collect(),
        (0..9).map(|i| (i * 11 + 200) % v).collect(),
        vec![7],
    ];
    let want = reference_logits(&tiny.dir, &seqs);

    // 1. Each sequence alone, all positions in one prefill.
    for (s, w) in seqs.iter().zip(&want) {
        let got = model.transformer.score(s).unwrap();
        let d = max_abs_diff(&got, w);
        assert!(d < 1e-4, "{:?} prefill: max |diff| {d}", cfg.arch);
    }

    // 2. All three in one batch, fed in uneven chunks: prefill and decode mixed in each step.
    let t = &model.transformer;
    let mut kv = t.new_cache();
    let slots: Vec<_> = seqs.iter().map(|_| kv.allocate()).collect();
    let mut pos = vec![0usize; seqs.len()];
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    let chunk = [5usize, 1, 3];
    while pos.iter().zip(&seqs).any(|(p, s)| *p < s.len()) {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if pos[i] < s.len() {
                let end = (pos[i] + chunk[i]).min(s.len());
                batch.push(SeqInput {
                    slot: slots[i],
                    tokens: &s[pos[i]..end],
                    all_logits: true,
                });
                who.push(i);
                pos[i] = end;
            }
        }
        let out = t.forward(&mut kv, &batch).unwrap().to_vecs().unwrap();
        for (i, rows) in who.into_iter().zip(out) {
            got[i].extend(rows);
        }
    }
    for (i, w) in want.iter().enumerate() {
        let d = max_abs_diff(&got[i], w);
        assert!(d < 1e-4, "{:?} batched seq {i}: max |diff| {d}", cfg.arch);
    }
}

#[test]
fn llama_matches_numpy_reference() {
    check(TinyConfig::llama());
}

#[test]
fn qwen2_matches_numpy_reference() {
    check(TinyConfig::qwen2());
}

#[test]
fn llama_untied_without_scaling_matches_numpy_reference() {
    let mut cfg = TinyConfig::llama();
    cfg.tie_word_embeddings = false;
    cfg.llama3_rope_scaling = false;
    cfg.seed = 7;
    check(cfg);
}
