//! The one linear-layer type every projection of the model goes through. Keeping dense and
//! quantized weights (and, with tensor parallelism, the column/row split and its all-reduce)
//! behind this type is what lets the model file stay the same for every format and group size.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::error::Result;

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// f32 weight laid out `[out_features, in_features]` as Hugging Face stores it.
    Dense(Tensor),
    /// A GGUF block-quantized weight, multiplied with candle's quantized kernels.
    Quantized(Arc<QTensor>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    /// Built once at load for quantized weights (candle packs them lazily behind it).
    matmul: Option<QMatMul>,
    bias: Option<Tensor>,
    out_features: usize,
}

impl Linear {
    pub fn new(weight: LinearWeight, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, matmul) = match &weight {
            LinearWeight::Dense(w) => (w.dims2()?.0, None),
            LinearWeight::Quantized(q) => {
                (q.shape().dims2()?.0, Some(QMatMul::from_arc(q.clone())?))
            }
        };
        Ok(Self {
            weight,
            matmul,
            bias,
            out_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }

    /// `x`: `[tokens, in_features]` → `[tokens, out_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.matmul, &self.weight) {
            (Some(q), _) => q.forward(x)?,
            (None, LinearWeight::Dense(w)) => x.matmul(&w.t()?)?,
            (None, LinearWeight::Quantized(q)) => x.matmul(&q.dequantize(x.device())?.t()?)?,
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
    /// `ids`: `[tokens]` u32 → `[tokens, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(w) => w.embedding(ids)?,
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }

    /// The same weight used as the output projection (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Dense(w) => Linear::new(LinearWeight::Dense(w.clone()), None),
            Embedding::Quantized(q) => Linear::new(LinearWeight::Quantized(q.clone()), None),
        }
    }
}
