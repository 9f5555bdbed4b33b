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
    /// From this many rows on, dequantize the weight and use a dense GEMM (`usize::MAX`: never,
    /// the default; see `Default`).
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

/// Off by default: the dense GEMM computes in f32 what the quantized kernel computes on
/// int8-quantized activations, so a row's result would depend on how many rows shared its
/// forward, and a request's tokens on the load (batch invariance, tests/batch_invariance.rs in
/// the engine). It costs prefill speed where candle has no batched kernel for the weight's
/// type (SmolLM2's Q8_0, the re-quantized row slices of tensor-parallel K-quant weights):
/// measured in docs/benchmarks.md. `dense_from_rows: 32` turns it back on.
impl Default for BatchMatmul {
    fn default() -> Self {
        Self {
            dense_from_rows: usize::MAX,
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
    /// Run single rows as two (the second a zero row): see `single_row_kernel_differs`.
    pad_single_row: bool,
    /// Run batches in groups of `AMX_FREE_ROWS` rows: see `batch_kernel_switches`.
    split_batches: bool,
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
        let pad_single_row = match (&weight, &matmul) {
            (LinearWeight::Quantized(q), Some(m)) => {
                single_row_kernel_differs(m, q.shape().dims2()?.1, &q.device())?
            }
            _ => false,
        };
        let split_batches = match &weight {
            LinearWeight::Quantized(q) => batch_kernel_switches(q),
            LinearWeight::Dense(_) => false,
        };
        Ok(Self {
            weight,
            matmul,
            dense_copy,
            dense_from_rows,
            pad_single_row,
            split_batches,
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
            // bf16/f16 weights (HF checkpoints on a GPU): the product runs in the weight's
            // dtype and the activations between layers stay f32.
            (LinearWeight::Dense(w), _, _) if w.dtype() != x.dtype() => x
                .to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(x.dtype())?,
            (LinearWeight::Dense(w), _, _) => x.matmul(&w.t()?)?,
            (LinearWeight::Quantized(_), _, Some(w)) if rows >= self.dense_from_rows => {
                x.matmul(&w.t()?)?
            }
            (LinearWeight::Quantized(q), None, _) => x.matmul(&q.dequantize(x.device())?.t()?)?,
            (LinearWeight::Quantized(q), Some(_), None) if rows >= self.dense_from_rows => {
                x.matmul(&q.dequantize(x.device())?.t()?)?
            }
            (LinearWeight::Quantized(_), Some(m), _) if rows == 1 && self.pad_single_row => {
                let padded = Tensor::cat(&[x, &x.zeros_like()?], 0)?;
                m.forward(&padded)?.narrow(0, 0, 1)?
            }
            (LinearWeight::Quantized(_), Some(m), _)
                if self.split_batches && rows >= AMX_FROM_ROWS =>
            {
                let mut parts = Vec::with_capacity(rows.div_ceil(AMX_FREE_ROWS));
                for start in (0..rows).step_by(AMX_FREE_ROWS) {
                    let n = AMX_FREE_ROWS.min(rows - start);
                    parts.push(m.forward(&x.narrow(0, start, n)?)?);
                }
                Tensor::cat(&parts, 0)?
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

/// candle 0.11 multiplies Q4_K batches of `AMX_FROM_ROWS` rows or more with AMX tiles where
/// the CPU has AMX (Intel Sapphire Rapids and later), and smaller ones with its AVX-512/AVX2
/// tiles: two kernels that sum in other orders. A row's output would then depend on how many
/// rows shared its forward (a prompt prefilled beside others vs alone), and greedy output on the
/// load. Such batches go through in groups of `AMX_FREE_ROWS`, all on the one kernel. This gives
/// up AMX's prefill speed for batch invariance; not measured yet (no AMX machine so far).
fn batch_kernel_switches(q: &QTensor) -> bool {
    q.dtype() == GgmlDType::Q4K && q.device().is_cpu() && cpu_has_amx()
}

const AMX_FROM_ROWS: usize = 32;
/// A multiple of 4 (candle's tile height), below `AMX_FROM_ROWS`.
const AMX_FREE_ROWS: usize = 16;

/// AMX tiles and int8 (CPUID leaf 7, EDX bits 24 and 25), as candle probes it;
/// `is_x86_feature_detected!("amx-int8")` is not stable.
fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let info = std::arch::x86_64::__cpuid_count(7, 0);
        info.edx & (1 << 25) != 0 && info.edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether candle's quantized kernel gives a row other bits alone than in a batch. candle runs
/// some types through one kernel for a single row and another for several (on x86 with AVX2:
/// Q6_K, compact GEMV vs repacked tiles), which differ in the last bits. Those bits matter: the
/// next layer quantizes its input to int8, so a flipped rounding there grows to tenths of a
/// logit, and then verifying drafted tokens in one batch would disagree with decoding them one
/// at a time. Probed once per weight at load (two passes over it) rather than read from
/// candle's private kernel choice, which changes between versions.
fn single_row_kernel_differs(m: &QMatMul, k: usize, device: &candle_core::Device) -> Result<bool> {
    // A fixed, varied input (no RNG), with a large entry as real activations have.
    let row: Vec<f32> = (0..k)
        .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * if i == 3 { 400.0 } else { 2.0 })
        .collect();
    let one = Tensor::from_vec(row.clone(), (1, k), device)?;
    let two = Tensor::from_vec([row.clone(), row].concat(), (2, k), device)?;
    let a: Vec<f32> = m.forward(&one)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = m.forward(&two)?.narrow(0, 0, 1)?.flatten_all()?.to_vec1()?;
    Ok(a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()))
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
            Embedding::Dense(w) => w.embedding(ids)?.to_dtype(candle_core::DType::F32)?,
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
