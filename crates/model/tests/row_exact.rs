//! A row's result must not depend on how many rows share its forward: speculative verification
//! (many rows of one sequence at once) and batching (rows of many sequences) would otherwise
//! decide differently from plain decoding (one row).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tandem_model::linear::{Linear, LinearWeight};
use tandem_model::{LoadOptions, Model};
use tandem_testkit::{tiny_model, TinyConfig};

mod common;

#[test]
fn quantized_linear_gives_a_row_the_same_bits_alone_and_in_any_batch() {
    let dev = Device::Cpu;
    // Shapes where candle has separate single-row and batched kernels (k a multiple of 256).
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let (n, k) = (64, 512);
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let lin = Linear::new(LinearWeight::Quantized(q), None).unwrap();
        let mut x: Vec<f32> = Tensor::randn(0f32, 1.0, (17, k), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Real activations have a few very large entries.
        x[5] = 300.0;
        let x = Tensor::from_vec(x, (17, k), &dev).unwrap();
        let all: Vec<Vec<f32>> = lin.forward(&x).unwrap().to_vec2().unwrap();
        for m in 1..17 {
            let some: Vec<Vec<f32>> = lin
                .forward(&x.narrow(0, 0, m).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap();
            for (r, row) in some.iter().enumerate() {
                let same = row
                    .iter()
                    .zip(&all[r])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{dtype:?}: row {r} of a {m}-row batch differs from 17 rows"
                );
            }
        }
    }
}

/// f32 weights go through candle's dense GEMM, whose single-row and batched kernels round
/// differently in the last bits; without int8 activations nothing amplifies that, so rows agree
/// to float precision (the real quantized model is held to identical bits, tests/real_qwen.rs).
/// Covers the row-by-row attention (up to 32 rows) and the masked one (more).
#[test]
fn tiny_models_score_a_token_batched_as_alone_within_float_precision() {
    for cfg in [TinyConfig::llama(), TinyConfig::qwen2()] {
        let tiny = tiny_model(&cfg).unwrap();
        let model = Model::load(&tiny.dir, &LoadOptions::default()).unwrap();
        let ids: Vec<u32> = (0..60).map(|i| (i * 37 + 11) % 300).collect();
        for n in [2, 5, 17, 40] {
            let (alone, batched) = common::logits_alone_and_batched(&model, &ids, n);
            for (a, b) in alone.iter().zip(&batched) {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "{n} rows: logits differ by {d}");
            }
        }
    }
}
