//! The one linear-layer type every projection of the model goes through. Keeping dense and
//! quantized weights (and, with tensor parallelism, the column/row split and its all-reduce)
//! behind this type is what lets the model file stay the same for every format and group size.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use tandem_collective::all_reduce_tensor;

use crate::error::Result;
use crate::parallel::Shard;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// f32 weight laid out `[out_features, in_features]` as Hugging Face stores it.
    Dense(Tensor),
    /// A GGUF block-quantized weight, multiplied with candle's quantized kernels.
    Quantized(Arc<QTensor>),
}

/// How a quantized linear multiplies a batch of many rows.
///
/// candle's quantized matmul computes each output as an independent block dot product, so a
/// 256-row prefill costs 256 single-row passes over the weights. A dense f32 GEMM reuses each
/// weight across rows: measured on SmolLM2 (1 thread), dequantize-then-GEMM runs a 256-token
/// prefill 3.8x faster, and with a kept f32 copy 16-sequence decode runs 1.9x faster. Single
/// rows (decode) stay on the quantized kernel, which reads 4x fewer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMatmul {
    /// From this many rows on, dequantize the weight and use a dense GEMM.
    pub dense_from_rows: usize,
    /// Keep the dequantized f32 weights in memory (4 bytes per parameter more) instead of
    /// dequantizing on each such batch; then dense from `KEPT_DENSE_FROM_ROWS` rows.
    pub keep_dense_copy: bool,
}

/// candle repacks Q4_K and Q6_K weights into tiles for a batched kernel that does reuse weights
/// across rows, when the inner dimension is a multiple of 256 (AVX2 and up). There that kernel
/// beats dequantize-then-GEMM: Qwen2.5-Coder-1.5B prefill 54.6 vs 35.5 tok/s, same run.
fn has_fast_batched_kernel(q: &QTensor) -> bool {
    let k = q.shape().dims().last().copied().unwrap_or(0);
    matches!(q.dtype(), GgmlDType::Q4K | GgmlDType::Q6K) && k > 0 && k.is_multiple_of(256)
}

/// With a kept copy the dense path pays no dequantization, so it wins from fewer rows.
const KEPT_DENSE_FROM_ROWS: usize = 8;

impl Default for BatchMatmul {
    fn default() -> Self {
        Self {
            dense_from_rows: 32,
            keep_dense_copy: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// Built once at load for quantized weights (candle packs them lazily behind it).
    matmul: Option<QMatMul>,
    /// The f32 copy of a quantized weight, when `BatchMatmul::keep_dense_copy`.
    dense_copy: Option<Tensor>,
    dense_from_rows: usize,
    bias: Option<Tensor>,
    out_features: usize,
    /// Row-parallel: this rank holds a slice of the input columns, so its output is a partial
    /// sum that the group adds up before the bias.
    reduce: Option<Shard>,
}

impl Linear {
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Result<Self> {
        Self::with_policy(weight, bias, BatchMatmul::default())
    }

    pub fn with_policy(
        weight: LinearWeight,
        bias: Option<Tensor>,
        policy: BatchMatmul,
    ) -> Result<Self> {
        let (out_features, matmul, dense_copy) = match &weight {
            LinearWeight::Dense(w) => (w.dims2()?.0, None, None),
            LinearWeight::Quantized(q) => (
                q.shape().dims2()?.0,
                Some(QMatMul::from_arc(q.clone())?),
                policy
                    .keep_dense_copy
                    .then(|| q.dequantize(&q.device()))
                    .transpose()?,
            ),
        };
        let dense_from_rows = match &weight {
            _ if dense_copy.is_some() => KEPT_DENSE_FROM_ROWS.min(policy.dense_from_rows),
            LinearWeight::Quantized(q) if has_fast_batched_kernel(q) => usize::MAX,
            _ => policy.dense_from_rows,
        };
        Ok(Self {
            weight,
            matmul,
            dense_copy,
            dense_from_rows,
            bias,
            out_features,
            reduce: None,
        })
    }

    /// Makes this a row-parallel layer: its output is all-reduced (summed) over `shard`'s group
    /// before the bias is added, so the bias counts once.
    pub fn all_reduced_over(mut self, shard: Shard) -> Self {
        self.reduce = Some(shard);
        self
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }

    /// Bytes this layer holds: the weight as stored (raw blocks when quantized), a kept dense
    /// copy, and the bias.
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let w = match &self.weight {
            LinearWeight::Dense(t) => dense(t),
            LinearWeight::Quantized(q) => q.storage_size_in_bytes(),
        };
        w + self.dense_copy.as_ref().map_or(0, dense) + self.bias.as_ref().map_or(0, dense)
    }

    /// `x`: `[tokens, in_features]` → `[tokens, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = match (&self.weight, &self.matmul, &self.dense_copy) {
            (LinearWeight::Dense(w), _, _) => x.matmul(&w.t()?)?,
            (LinearWeight::Quantized(_), _, Some(w)) if rows >= self.dense_from_rows => {
                x.matmul(&w.t()?)?
            }
            (LinearWeight::Quantized(q), None, _) => x.matmul(&q.dequantize(x.device())?.t()?)?,
            (LinearWeight::Quantized(q), Some(_), None) if rows >= self.dense_from_rows => {
                x.matmul(&q.dequantize(x.device())?.t()?)?
            }
            (LinearWeight::Quantized(_), Some(m), _) => m.forward(x)?,
        };
        let y = match &self.reduce {
            Some(s) => all_reduce_tensor(s.comm.as_ref(), &y)?,
            None => y,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Token embeddings: dense rows, or quantized rows dequantized on lookup (so a 150k-token
/// vocabulary is not expanded to f32 in memory).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// Bytes of the table as stored.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// `ids`: `[tokens]` u32 → `[tokens, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(w) => w.embedding(ids)?,
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }

    /// The same weight used as the output projection (tied embeddings).
    pub fn as_linear(&self, policy: BatchMatmul) -> Result<Linear> {
        match self {
            Embedding::Dense(w) => Linear::new(LinearWeight::Dense(w.clone()), None),
            Embedding::Quantized(q) => {
                Linear::with_policy(LinearWeight::Quantized(q.clone()), None, policy)
            }
        }
    }
}
