//! Sampled token frequencies from a tiny model's real next-token logits match the softmax the
//! parameters define (chi-square at the 0.999 level), for temperature, top-k and top-p.
//! Expected probabilities are computed here, independently of the sampler's code.
#![allow(clippy::unwrap_used)]

use tandem_engine::{Sampler, SamplingParams};
use tandem_model::{LoadOptions, Model};
use tandem_testkit::{tiny_model, TinyConfig};

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// 0.999 quantile of chi-square with `k` degrees of freedom (Wilson-Hilferty; accurate to a
/// few percent for k >= 3, and conservative enough for a test that must not flake).
fn chi2_999(k: usize) -> f64 {
    let k = k as f64;
    let z = 3.090_2;
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

fn check(name: &str, logits: &[f32], params: SamplingParams, expected: Vec<f64>) {
    const N: usize = 20_000;
    let mut s = Sampler::new(params, &[]);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..N {
        counts[s.sample(logits).token as usize] += 1;
    }
    // Tokens with expected count < 5 are pooled into one bin, as the test requires.
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pooled_e, mut pooled_o) = (0.0, 0.0);
    for (p, &o) in expected.iter().zip(&counts) {
        let e = p * N as f64;
        if *p == 0.0 {
            assert_eq!(o, 0, "{name}: a token outside the allowed set was drawn");
        } else if e < 5.0 {
            pooled_e += e;
            pooled_o += o as f64;
        } else {
            stat += (o as f64 - e).powi(2) / e;
            bins += 1;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e.max(1e-9);
        bins += 1;
    }
    let crit = chi2_999(bins.saturating_sub(1).max(1));
    eprintln!("{name}: chi-square {stat:.1} over {bins} bins (critical {crit:.1})");
    assert!(stat < crit, "{name}: chi-square {stat:.1} >= {crit:.1}");
}

#[test]
fn tiny_model_samples_match_softmax() {
    let tiny = tiny_model(&TinyConfig::qwen2()).unwrap();
    let model = Model::load(&tiny.dir, &LoadOptions::default()).unwrap();
    let rows = model.transformer.score(&[10, 20, 30, 40]).unwrap();
    let logits = rows.last().unwrap().clone();
    let l64: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
    let mut order: Vec<usize> = (0..l64.len()).collect();
    order.sort_by(|&a, &b| l64[b].total_cmp(&l64[a]));

    // Temperature 0.8: softmax(l / 0.8).
    let t = 0.8;
    let scaled: Vec<f64> = l64.iter().map(|x| x / t).collect();
    check(
        "temperature",
        &logits,
        SamplingParams {
            temperature: t as f32,
            seed: Some(1),
            ..Default::default()
        },
        softmax(&scaled),
    );

    // Top-k 5 at temperature 1: the 5 best, renormalized.
    let p = softmax(&l64);
    let mut topk = vec![0.0; p.len()];
    let z: f64 = order[..5].iter().map(|&i| p[i]).sum();
    for &i in &order[..5] {
        topk[i] = p[i] / z;
    }
    check(
        "top_k",
        &logits,
        SamplingParams {
            temperature: 1.0,
            top_k: 5,
            seed: Some(2),
            ..Default::default()
        },
        topk,
    );

    // Top-p 0.9: the smallest prefix (by probability) reaching 0.9, renormalized.
    let mut topp = vec![0.0; p.len()];
    let mut cum = 0.0;
    let mut kept = Vec::new();
    for &i in &order {
        kept.push(i);
        cum += p[i];
        if cum >= 0.9 {
            break;
        }
    }
    for &i in &kept {
        topp[i] = p[i] / cum;
    }
    check(
        "top_p",
        &logits,
        SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(3),
            ..Default::default()
        },
        topp,
    );
}
