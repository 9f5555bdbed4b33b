//! Causal attention of one sequence's query rows over its KV slot, on the CPU, written out by
//! hand rather than composed from candle ops.
//!
//! Why our own: a token's logits must not depend on what else shares its step (batch
//! invariance: the same answer under any load, cached or not, verified or decoded). With
//! candle's ops, a prefill chunk attends in one masked matmul whose sums run in another order
//! than a single decoded row's, so a prompt's KV — and everything after it — depended on how the
//! scheduler chunked it. Here every query row, whatever chunk it came in, runs the same code over
//! the same keys in the same order: dot products with eight fixed lanes, a sequential softmax,
//! and a weighted sum of values in position order. It also replaces a dozen small tensor ops
//! (each allocating) per decoded row per layer with one pass.

use candle_core::{Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

fn msg(m: &str) -> crate::error::ModelError {
    candle_core::Error::Msg(m.to_owned()).into()
}

/// Multiply-adds (per Q·K and per P·V) from which a call spreads over threads.
const PARALLEL_FROM: usize = 1 << 20;

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `[n, heads, head_dim]` (contiguous) for positions `start..start + n`; `k`, `v`: the
/// slot's views `[kv_heads, >= start + n, head_dim]`. Returns `[n, heads * head_dim]`: row i
/// attends over positions `0..=start + i` only.
pub(crate) fn causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    shape: Heads,
    scale: f32,
) -> Result<Tensor> {
    let Heads {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let n = q.dim(0)?;
    let q = q.contiguous()?;
    let (q_guard, q_layout) = q.storage_and_layout();
    let (k_guard, k_layout) = k.storage_and_layout();
    let (v_guard, v_layout) = v.storage_and_layout();
    let (qs, ks, vs) = match (&*q_guard, &*k_guard, &*v_guard) {
        (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => (
            q.as_slice::<f32>()?,
            k.as_slice::<f32>()?,
            v.as_slice::<f32>()?,
        ),
        _ => return Err(msg("the hand-written attention runs on CPU tensors only")),
    };
    let qs = &qs[q_layout.start_offset()..];
    let kv = Kv::new(ks, k_layout, hd)?;
    let vv = Kv::new(vs, v_layout, hd)?;
    let group = heads / kv_heads;
    let mut out = vec![0f32; n * heads * hd];
    let row = |scores: &mut Vec<f32>, (task, o): (usize, &mut [f32])| {
        let (i, h) = (task / heads, task % heads);
        let g = h / group;
        let qrow = &qs[(i * heads + h) * hd..][..hd];
        let len = start + i + 1;
        scores.clear();
        scores.extend((0..len).map(|j| dot(qrow, kv.row(g, j)) * scale));
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, &e) in scores.iter().enumerate() {
            let p = e * inv;
            for (o, &x) in o.iter_mut().zip(vv.row(g, j)) {
                *o += p * x;
            }
        }
    };
    // Each output row (one query row, one head) is written by exactly one task, in a fixed
    // order, so threads change the speed and never the bits. Small calls (a decoded token)
    // stay on this thread: waking a second pool's threads between candle's matmuls costs more
    // than it saves on 2 cores.
    let work = n * heads * (start + n) * hd;
    if work < PARALLEL_FROM {
        let mut scores = Vec::new();
        out.chunks_mut(hd)
            .enumerate()
            .for_each(|t| row(&mut scores, t));
    } else {
        out.par_chunks_mut(hd)
            .enumerate()
            .with_min_len(4)
            .for_each_init(Vec::new, |scores, t| row(scores, t));
    }
    drop((q_guard, k_guard, v_guard));
    Ok(Tensor::from_vec(out, (n, heads * hd), &Device::Cpu)?)
}

/// Row access into a `[kv_heads, positions, head_dim]` view with a contiguous last dimension.
struct Kv<'a> {
    data: &'a [f32],
    head_stride: usize,
    pos_stride: usize,
    hd: usize,
}

impl<'a> Kv<'a> {
    fn new(data: &'a [f32], layout: &Layout, hd: usize) -> Result<Self> {
        let stride = layout.stride();
        if stride.len() != 3 || stride[2] != 1 {
            return Err(msg(
                "attention expects KV views with a contiguous head dimension",
            ));
        }
        Ok(Self {
            data: &data[layout.start_offset()..],
            head_stride: stride[0],
            pos_stride: stride[1],
            hd,
        })
    }

    #[inline]
    fn row(&self, head: usize, pos: usize) -> &'a [f32] {
        &self.data[head * self.head_stride + pos * self.pos_stride..][..self.hd]
    }
}

/// Dot product in a fixed order: eight lanes (vectorized by the compiler), then a fixed tree.
/// Plain multiply-add, not `mul_add`, so the result is the same with and without FMA units.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
