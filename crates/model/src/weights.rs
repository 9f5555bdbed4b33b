//! Where weights come from: a Hugging Face folder (safetensors, single or sharded) or a GGUF file.
//! The model asks for tensors by their Hugging Face names; the GGUF source maps them to llama.cpp
//! names and undoes llama.cpp's q/k row permutation, so one model file serves both formats.
//! With tensor parallelism each linear is cut to this rank's slice here, as it is read, so a rank
//! only ever keeps its own share of the block weights.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::Architecture;
use crate::error::{ModelError, Result};
use crate::linear::{BatchMatmul, Embedding, Linear, LinearWeight};
use crate::parallel::Split;

/// How to run a GGUF file's block-quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// Keep them quantized and multiply with candle's quantized kernels (the fast path on CPU).
    /// Q4_1/Q5_0/Q5_1 tensors are re-quantized to Q8_0 at load: candle only has SIMD kernels for
    /// Q4_0, Q8_0 and the K-quants, and Q8_0 holds those 4/5-bit values almost exactly.
    #[default]
    Quantized,
    /// Dequantize everything to f32 at load.
    Dequantized,
}

pub(crate) enum WeightSource {
    Hf(HfWeights),
    Gguf(GgufWeights),
}

impl WeightSource {
    pub fn path(&self) -> &Path {
        match self {
            WeightSource::Hf(h) => &h.dir,
            WeightSource::Gguf(g) => &g.path,
        }
    }

    /// Where the finished weights go. Files are read, cut to this rank's slice and re-quantized
    /// on the host; each weight is then copied to the device once.
    pub fn device(&self) -> &Device {
        match self {
            WeightSource::Hf(h) => &h.device,
            WeightSource::Gguf(g) => &g.device,
        }
    }

    pub fn set_device(&mut self, device: Device) {
        match self {
            WeightSource::Hf(h) => h.device = device,
            WeightSource::Gguf(g) => g.device = device,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            WeightSource::Hf(h) => h.tensors.contains_key(name),
            WeightSource::Gguf(g) => g
                .gguf_name(name)
                .is_some_and(|n| g.content.tensor_infos.contains_key(&n)),
        }
    }

    /// A dense f32 tensor (norm weights, biases).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self {
            WeightSource::Hf(h) => h.take(name)?,
            WeightSource::Gguf(g) => g.qtensor(name)?.dequantize(&Device::Cpu)?,
        };
        check_shape(self.path(), name, &t, shape)?;
        Ok(t.to_device(self.device())?)
    }

    pub fn batch_matmul(&self) -> BatchMatmul {
        match self {
            WeightSource::Hf(_) => BatchMatmul::default(),
            WeightSource::Gguf(g) => g.batch_matmul,
        }
    }

    /// The linear `name` (`[out, inp]` in the file), or this rank's slice of it under `split`.
    pub fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
        split: &Split,
    ) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let weight = match self {
            WeightSource::Hf(h) => {
                let w = h.take_linear(&wname)?;
                check_shape(&h.dir, &wname, &w, &[out, inp])?;
                let w = match split {
                    Split::Full => w,
                    Split::Column { .. } => keep_part(&w, 0, split.part(out, &wname)?)?,
                    Split::Row(_) => keep_part(&w, 1, split.part(inp, &wname)?)?,
                };
                match h.quantize {
                    Some(dt) if w.dim(1)?.is_multiple_of(dt.block_size()) => {
                        LinearWeight::Quantized(Arc::new(quantize_rows(&w, dt)?))
                    }
                    _ => LinearWeight::Dense(w),
                }
            }
            WeightSource::Gguf(g) => g.linear_weight(&wname, out, inp, split)?,
        };
        let bias = if bias {
            let bname = format!("{name}.bias");
            let b = self.tensor(&bname, &[out])?;
            // A column slice owns its output rows and their bias; a row-parallel layer adds the
            // whole bias once, after the all-reduce.
            Some(match split {
                Split::Column { .. } => keep_part(&b, 0, split.part(out, &bname)?)?,
                Split::Full | Split::Row(_) => b,
            })
        } else {
            None
        };
        let weight = place(weight, self.device())?;
        let linear = Linear::with_policy(weight, bias, self.batch_matmul())?;
        Ok(match split {
            Split::Row(shard) => linear.all_reduced_over(shard.clone()),
            Split::Full | Split::Column { .. } => linear,
        })
    }

    /// The embedding table, or only rows `rows = (start, len)` of it (vocabulary-parallel).
    pub fn embedding(
        &mut self,
        name: &str,
        vocab: usize,
        hidden: usize,
        rows: Option<(usize, usize)>,
    ) -> Result<Embedding> {
        match self {
            WeightSource::Hf(h) => {
                // Like a linear: bf16 stays bf16 on a GPU (tied, it is also the LM head, the
                // largest matmul of a small model); lookups are cast to f32.
                let w = h.take_linear(&format!("{name}.weight"))?;
                check_shape(&h.dir, name, &w, &[vocab, hidden])?;
                Ok(Embedding::Dense(
                    keep_part(&w, 0, rows)?.to_device(&h.device)?,
                ))
            }
            WeightSource::Gguf(g) => {
                let q = g.qtensor(&format!("{name}.weight"))?;
                if q.shape().dims() != [vocab, hidden] {
                    return Err(ModelError::WrongShape {
                        path: g.path.clone(),
                        tensor: "token_embd.weight".into(),
                        got: q.shape().dims().to_vec(),
                        want: vec![vocab, hidden],
                    });
                }
                // Rows are quantized independently: a row range is a byte range.
                let q = match rows {
                    None => q,
                    Some((start, len)) => {
                        let raw = q.data()?;
                        let row_bytes = raw.len() / vocab.max(1);
                        g.build(
                            "token_embd.weight",
                            q.dtype(),
                            &raw[start * row_bytes..(start + len) * row_bytes],
                            vec![len, hidden],
                        )?
                    }
                };
                // Through the same conversion as the linears: with tied embeddings this weight
                // is also the LM head, the largest matmul of a small model.
                match place(g.to_linear_weight(q)?, &g.device)? {
                    LinearWeight::Dense(w) => Ok(Embedding::Dense(w)),
                    LinearWeight::Quantized(q) => Ok(Embedding::Quantized(q)),
                }
            }
        }
    }
}

/// A weight built on the host, on `device`. Quantized weights keep their blocks: candle's CUDA
/// kernels multiply Q4_0..Q8_0 and the K-quants directly.
fn place(w: LinearWeight, device: &Device) -> Result<LinearWeight> {
    if device.is_cpu() {
        return Ok(w);
    }
    Ok(match w {
        LinearWeight::Dense(t) => LinearWeight::Dense(t.to_device(device)?),
        LinearWeight::Quantized(q) => {
            let bytes = q.data()?;
            LinearWeight::Quantized(Arc::new(qtensor_from_ggml(
                q.dtype(),
                &bytes,
                q.shape().dims().to_vec(),
                device,
            )?))
        }
    })
}

/// `QTensor::quantize` of a `[rows, cols]` weight on every core. candle quantizes on one thread
/// (K-quants search scales per block: a 1.5B model took minutes); rows are quantized
/// independently, so chunks of rows quantized apart and concatenated are the same bytes.
fn quantize_rows(w: &Tensor, dt: GgmlDType) -> Result<QTensor> {
    let w = w.to_dtype(DType::F32)?;
    let (rows, cols) = w.dims2()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rows.div_ceil(threads.max(1)).max(1);
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(chunk)
            .map(|start| {
                let part = w.narrow(0, start, chunk.min(rows - start));
                s.spawn(move || -> Result<Vec<u8>> {
                    // A row range is a contiguous view with an offset, which `quantize` would read from the
                    // start of the storage: copy it out.
                    let q = QTensor::quantize(&part?.force_contiguous()?, dt)?;
                    Ok(q.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ModelError::Config("a quantization thread panicked".into()))
                })
            })
            .collect()
    });
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(&p?);
    }
    Ok(qtensor_from_ggml(
        dt,
        &bytes,
        vec![rows, cols],
        &Device::Cpu,
    )?)
}

/// `t` narrowed to `part` along `dim`, copied into its own storage so the full tensor can be freed
/// (`contiguous()` alone would keep a row slice as a view of the whole buffer).
fn keep_part(t: &Tensor, dim: usize, part: Option<(usize, usize)>) -> Result<Tensor> {
    Ok(match part {
        Some((start, len)) => t.narrow(dim, start, len)?.force_contiguous()?,
        None => t.clone(),
    })
}

fn check_shape(path: &Path, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(ModelError::WrongShape {
            path: path.to_owned(),
            tensor: name.to_owned(),
            got: t.dims().to_vec(),
            want: want.to_vec(),
        });
    }
    Ok(())
}

pub(crate) struct HfWeights {
    pub dir: PathBuf,
    tensors: HashMap<String, (PathBuf, Tensor)>,
    device: Device,
    /// Block-quantize the linears at load (`LoadOptions::quantize_hf`).
    pub quantize: Option<GgmlDType>,
}

impl HfWeights {
    /// Loads `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: index.clone(),
                    source,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::MissingKey {
                    path: index.clone(),
                    key: "weight_map".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|source| ModelError::Io {
                path: file.clone(),
                source,
            })?;
            let loaded =
                candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                    ModelError::Truncated {
                        path: file.clone(),
                        reason: e.to_string(),
                    }
                })?;
            for (name, t) in loaded {
                tensors.insert(name, (file.clone(), t));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            tensors,
            device: Device::Cpu,
            quantize: None,
        })
    }

    /// Removes the tensor from the source: each is read once, and dropping it as soon as the model
    /// has kept what it needs (with tensor parallelism, one slice) bounds a rank's memory.
    fn take(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.take_raw(name)?.to_dtype(DType::F32)?)
    }

    /// A linear weight: on a GPU a bf16/f16 checkpoint stays in its dtype (half the memory, and
    /// cuBLAS's tensor-core GEMMs; the layer casts its input, see `Linear::forward`). On the CPU
    /// everything runs in f32.
    fn take_linear(&mut self, name: &str) -> Result<Tensor> {
        let t = self.take_raw(name)?;
        Ok(match t.dtype() {
            DType::BF16 | DType::F16 if !self.device.is_cpu() => t,
            _ => t.to_dtype(DType::F32)?,
        })
    }

    fn take_raw(&mut self, name: &str) -> Result<Tensor> {
        let (_, t) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.to_owned(),
            })?;
        Ok(t)
    }
}

pub(crate) struct GgufWeights {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
    file_len: u64,
    arch: Architecture,
    num_heads: usize,
    num_kv_heads: usize,
    mode: QuantMode,
    batch_matmul: BatchMatmul,
    device: Device,
}

impl GgufWeights {
    pub fn open(path: &Path, mode: QuantMode, batch_matmul: BatchMatmul) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_owned(),
                source,
            })?
            .len();
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Truncated {
            path: path.to_owned(),
            reason: format!("reading the GGUF header: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            content,
            file,
            file_len,
            // Set by `set_layout` once the metadata is parsed.
            arch: Architecture::Llama,
            num_heads: 1,
            num_kv_heads: 1,
            mode,
            batch_matmul,
            device: Device::Cpu,
        })
    }

    pub fn set_layout(&mut self, arch: Architecture, num_heads: usize, num_kv_heads: usize) {
        self.arch = arch;
        self.num_heads = num_heads;
        self.num_kv_heads = num_kv_heads;
    }

    /// Hugging Face tensor name → llama.cpp GGUF tensor name.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let (base, suffix) = hf.rsplit_once('.')?;
        let mapped = match base {
            "model.embed_tokens" => "token_embd".to_owned(),
            "model.norm" => "output_norm".to_owned(),
            "lm_head" => "output".to_owned(),
            "rope_freqs" => "rope_freqs".to_owned(),
            _ => {
                let rest = base.strip_prefix("model.layers.")?;
                let (layer, part) = rest.split_once('.')?;
                let part = match part {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    _ => return None,
                };
                format!("blk.{layer}.{part}")
            }
        };
        Some(format!("{mapped}.{suffix}"))
    }

    /// Reads one tensor and builds it as a `QTensor`.
    fn qtensor(&mut self, hf_name: &str) -> Result<QTensor> {
        let raw = self.read_raw(hf_name)?;
        self.build(&raw.name, raw.dtype, &raw.bytes, raw.dims)
    }

    fn build(
        &self,
        name: &str,
        dtype: GgmlDType,
        bytes: &[u8],
        dims: Vec<usize>,
    ) -> Result<QTensor> {
        qtensor_from_ggml(dtype, bytes, dims, &Device::Cpu).map_err(|e| {
            ModelError::UnsupportedQuantization {
                path: self.path.clone(),
                tensor: name.to_owned(),
                dtype: format!("{dtype:?} ({e})"),
            }
        })
    }

    /// A linear weight `[out, inp]`, or this rank's slice of it.
    ///
    /// Rows of a GGUF tensor are quantized independently, in blocks along the input dimension.
    /// A column slice is therefore a run of whole rows of raw blocks (taken after the q/k
    /// un-permutation, which moves rows only within a head, and slices hold whole heads). A row
    /// slice cuts every row: when it falls on block boundaries it is the same blocks of each
    /// row; otherwise the weight is dequantized, cut in f32, and re-quantized to Q8_0 when the
    /// slice allows (kept dense if not).
    fn linear_weight(
        &mut self,
        hf_name: &str,
        out: usize,
        inp: usize,
        split: &Split,
    ) -> Result<LinearWeight> {
        let raw = self.read_raw(hf_name)?;
        if raw.dims != [out, inp] {
            return Err(ModelError::WrongShape {
                path: self.path.clone(),
                tensor: raw.name,
                got: raw.dims,
                want: vec![out, inp],
            });
        }
        let row_bytes = raw.bytes.len() / out.max(1);
        let (dims, bytes) = match split {
            Split::Full => (raw.dims, raw.bytes),
            Split::Column { .. } => match split.part(out, &raw.name)? {
                Some((start, len)) => (
                    vec![len, inp],
                    raw.bytes[start * row_bytes..(start + len) * row_bytes].to_vec(),
                ),
                None => (raw.dims, raw.bytes),
            },
            Split::Row(_) => match split.part(inp, &raw.name)? {
                None => (raw.dims, raw.bytes),
                Some((start, len))
                    if row_bytes > 0 && len.is_multiple_of(raw.dtype.block_size()) =>
                {
                    let per_block = raw.dtype.type_size();
                    let from = start / raw.dtype.block_size() * per_block;
                    let n = len / raw.dtype.block_size() * per_block;
                    let mut bytes = Vec::with_capacity(out * n);
                    for row in raw.bytes.chunks_exact(row_bytes) {
                        bytes.extend_from_slice(&row[from..from + n]);
                    }
                    (vec![out, len], bytes)
                }
                Some((start, len)) => {
                    let q = self.build(&raw.name, raw.dtype, &raw.bytes, raw.dims)?;
                    let dense = q
                        .dequantize(&Device::Cpu)?
                        .narrow(1, start, len)?
                        .force_contiguous()?;
                    let q8 = GgmlDType::Q8_0.block_size();
                    return Ok(match self.mode {
                        QuantMode::Quantized if len.is_multiple_of(q8) => LinearWeight::Quantized(
                            Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?),
                        ),
                        _ => LinearWeight::Dense(dense),
                    });
                }
            },
        };
        let q = self.build(&raw.name, raw.dtype, &bytes, dims)?;
        self.to_linear_weight(q)
    }

    /// Reads one tensor's raw blocks, un-permuting llama q/k rows to the Hugging Face layout.
    fn read_raw(&mut self, hf_name: &str) -> Result<RawTensor> {
        let name = self
            .gguf_name(hf_name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: hf_name.to_owned(),
            })?;
        let info =
            self.content
                .tensor_infos
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    tensor: name.clone(),
                })?;
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let elems: usize = dims.iter().product();
        let block = dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(ModelError::WrongShape {
                path: self.path.clone(),
                tensor: name,
                got: dims,
                want: vec![],
            });
        }
        let size = elems / block * dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        if start + size as u64 > self.file_len {
            return Err(ModelError::Truncated {
                path: self.path.clone(),
                reason: format!(
                    "tensor '{name}' needs bytes {start}..{} but the file has {}",
                    start + size as u64,
                    self.file_len
                ),
            });
        }
        let mut raw = vec![0u8; size];
        let io = |source| ModelError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(start)).map_err(io)?;
        self.file
            .read_exact(&mut raw)
            .map_err(|source| ModelError::Io {
                path: self.path.clone(),
                source,
            })?;
        if self.arch == Architecture::Llama && dims.len() == 2 {
            let heads = if hf_name.ends_with("q_proj.weight") || hf_name.ends_with("q_proj.bias") {
                Some(self.num_heads)
            } else if hf_name.ends_with("k_proj.weight") || hf_name.ends_with("k_proj.bias") {
                Some(self.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                raw = unpermute_rows(&raw, dims[0], heads);
            }
        }
        Ok(RawTensor {
            name,
            dtype,
            dims,
            bytes: raw,
        })
    }

    fn to_linear_weight(&self, q: QTensor) -> Result<LinearWeight> {
        Ok(match (self.mode, q.dtype()) {
            (QuantMode::Dequantized, _)
            | (_, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                LinearWeight::Dense(q.dequantize(&Device::Cpu)?)
            }
            (QuantMode::Quantized, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1) => {
                let dense = q.dequantize(&Device::Cpu)?;
                LinearWeight::Quantized(Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?))
            }
            (QuantMode::Quantized, _) => LinearWeight::Quantized(Arc::new(q)),
        })
    }
}

/// One GGUF tensor as stored: `dims` in Hugging Face order (`[out, in]` for linears), `bytes` the
/// row-major blocks.
struct RawTensor {
    name: String,
    dtype: GgmlDType,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

/// llama.cpp's converter reorders each head's rows from HF's "rotate half" RoPE layout
/// (pairs i, i + d/2) to interleaved pairs (2i, 2i + 1). Rows are quantized independently, so
/// undoing it is a permutation of whole rows of raw blocks: HF row (h, j, i) = GGUF row (h, i, j).
fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = raw.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gg = h * head_dim + i * 2 + j;
                out[hf * row_bytes..(hf + 1) * row_bytes]
                    .copy_from_slice(&raw[gg * row_bytes..(gg + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Quantizing row chunks on several threads gives candle's single-threaded bytes.
    #[test]
    fn parallel_quantization_gives_the_same_blocks() {
        use super::{quantize_rows, GgmlDType, QTensor};
        let (rows, cols) = (67, 512);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 97) as f32))
            .collect();
        let w =
            candle_core::Tensor::from_vec(data, (rows, cols), &candle_core::Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q6K] {
            let one = QTensor::quantize(&w, dt).unwrap();
            let many = quantize_rows(&w, dt).unwrap();
            assert_eq!(one.data().unwrap(), many.data().unwrap(), "{dt:?}");
            assert_eq!(many.shape().dims(), [rows, cols]);
        }
    }

    use candle_core::quantized::gguf_file;
    use tandem_collective::{CollectiveError, Communicator};

    use super::*;
    use crate::parallel::Shard;

    /// Only rank and size matter to the loader; it never communicates.
    struct FakeRank {
        rank: usize,
        size: usize,
    }

    impl Communicator for FakeRank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> std::result::Result<(), CollectiveError> {
            Err(CollectiveError::InvalidArgument("fake".into()))
        }
        fn broadcast(&self, _: usize, _: &mut Vec<u8>) -> std::result::Result<(), CollectiveError> {
            Err(CollectiveError::InvalidArgument("fake".into()))
        }
        fn barrier(&self) -> std::result::Result<(), CollectiveError> {
            Err(CollectiveError::InvalidArgument("fake".into()))
        }
    }

    const Q: &str = "model.layers.0.self_attn.q_proj.weight";
    const O: &str = "model.layers.0.self_attn.o_proj.weight";

    /// A GGUF holding one weight `[out, inp]` of `dtype` as both attn_q and attn_output.
    fn gguf(
        dtype: GgmlDType,
        out: usize,
        inp: usize,
        mode: QuantMode,
    ) -> (tempfile::TempDir, GgufWeights) {
        let n = out * inp;
        let data: Vec<f32> = (0..n)
            .map(|i| {
                ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % inp) as f32 / inp as f32)
            })
            .collect();
        let w = Tensor::from_vec(data, (out, inp), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.gguf");
        let mut f = File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &[],
            &[
                ("blk.0.attn_q.weight", &q),
                ("blk.0.attn_output.weight", &q),
            ],
        )
        .unwrap();
        drop(f);
        let mut g = GgufWeights::open(&path, mode, BatchMatmul::default()).unwrap();
        // head_dim 16: the q/k un-permutation reorders rows within each head.
        g.set_layout(Architecture::Llama, out / 16, out / 16);
        (dir, g)
    }

    fn dense(w: &LinearWeight) -> Tensor {
        match w {
            LinearWeight::Dense(t) => t.clone(),
            LinearWeight::Quantized(q) => q.dequantize(&Device::Cpu).unwrap(),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Every rank's slice, dequantized, equals the same part of the whole (TP=1) weight: exactly
    /// when the slice falls on block boundaries, within Q8_0 error when it had to be re-quantized.
    #[test]
    fn gguf_slices_match_the_whole_weight() {
        let (out, size) = (64, 2);
        for mode in [QuantMode::Quantized, QuantMode::Dequantized] {
            for dtype in [
                GgmlDType::F32,
                GgmlDType::Q8_0,
                GgmlDType::Q4_1,
                GgmlDType::Q4K,
            ] {
                for inp in [256, 512] {
                    let (_dir, mut g) = gguf(dtype, out, inp, mode);
                    let whole_q = dense(&g.linear_weight(Q, out, inp, &Split::Full).unwrap());
                    let whole_o = dense(&g.linear_weight(O, out, inp, &Split::Full).unwrap());
                    for rank in 0..size {
                        let what = format!("{mode:?} {dtype:?} in {inp} rank {rank}");
                        let col = Split::Column { rank, size };
                        let w = g.linear_weight(Q, out, inp, &col).unwrap();
                        let part = whole_q.narrow(0, rank * out / size, out / size).unwrap();
                        assert_eq!(max_diff(&dense(&w), &part), 0.0, "column {what}");

                        let shard = Shard::new(Arc::new(FakeRank { rank, size }));
                        let w = g.linear_weight(O, out, inp, &Split::Row(shard)).unwrap();
                        let len = inp / size;
                        let part = whole_o.narrow(1, rank * len, len).unwrap();
                        let diff = max_diff(&dense(&w), &part);
                        let aligned = len % dtype.block_size() == 0;
                        if aligned || mode == QuantMode::Dequantized {
                            assert_eq!(diff, 0.0, "row {what}");
                        } else {
                            // Q4_K cut mid-block: dequantized, cut, re-quantized to Q8_0.
                            assert!(diff < 0.02, "row {what}: {diff}");
                        }
                        if mode == QuantMode::Quantized && dtype != GgmlDType::F32 {
                            assert!(matches!(w, LinearWeight::Quantized(_)), "row {what}");
                        }
                    }
                }
            }
        }
    }
}
