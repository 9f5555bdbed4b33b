//! Llama and Qwen2 models on candle, as Tandem runs them: loaded from a Hugging Face folder or a
//! GGUF file, with per-sequence KV slots and one batched forward over sequences at different
//! positions (prefill and decode mixed).

mod attention;
pub mod config;
pub mod device;
pub mod error;
pub mod kv;
pub mod linear;
mod parallel;
pub mod tokenizer;
pub mod transformer;
mod weights;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use device::DeviceKind;
pub use error::{ModelError, Result};
pub use kv::{KvCache, SlotId};
pub use linear::BatchMatmul;
pub use parallel::Shard;
pub use tokenizer::{ChatMessage, TextModel};
pub use transformer::{BatchLogits, SeqInput, Transformer};
pub use weights::QuantMode;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// GGUF only: run block-quantized (default) or dequantize to f32.
    pub quant: QuantMode,
    /// Cap the context below the model's `max_position_embeddings` (saves RoPE tables and bounds
    /// KV per sequence). `None`: the model's own limit.
    pub max_context: Option<usize>,
    /// GGUF only: how quantized weights multiply large batches (prefill, many sequences).
    pub batch_matmul: BatchMatmul,
    /// Tensor parallelism: this process is one rank of a group and loads only its shard of each
    /// block's weights. `None`: the whole model (TP=1).
    pub shard: Option<Shard>,
    /// Where the weights, the KV cache and the forward live (`cpu`, `cuda:N`).
    pub device: DeviceKind,
    /// Hugging Face folders only: block-quantize the block linears and an untied LM head at
    /// load (e.g. `Q4K`), so an f16/bf16 checkpoint runs on the quantized kernels. Linears whose
    /// input width is not a multiple of the block stay dense.
    pub quantize_hf: Option<candle_core::quantized::GgmlDType>,
}

/// A model ready to serve: the network and its text side.
pub struct Model {
    pub path: PathBuf,
    pub transformer: Transformer,
    pub text: TextModel,
}

impl Model {
    /// Loads a Hugging Face folder (config.json + safetensors + tokenizer.json) or a `.gguf` file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            if !cfg_path.exists() {
                return Err(ModelError::NotAModel {
                    path: path.to_owned(),
                });
            }
            let cfg = ModelConfig::from_hf_json(&cfg_path)?;
            check_shard(&cfg, opts)?;
            let text = TextModel::from_hf_dir(path, &cfg.eos_token_ids)?;
            let device = opts.device.open()?;
            let mut hf = weights::HfWeights::open(path)?;
            hf.quantize = opts.quantize_hf;
            let mut w = weights::WeightSource::Hf(hf);
            w.set_device(device);
            let ctx = context(&cfg, opts);
            let transformer = Transformer::load(&mut w, cfg, ctx, opts.shard.as_ref())?;
            Ok(Self {
                path: path.to_owned(),
                transformer,
                text,
            })
        } else if path.extension().is_some_and(|e| e == "gguf") || path.is_file() {
            let device = opts.device.open()?;
            let mut g = weights::GgufWeights::open(path, opts.quant, opts.batch_matmul)?;
            let cfg = config_from_gguf(path, &g.content)?;
            check_shard(&cfg, opts)?;
            g.set_layout(cfg.architecture, cfg.num_heads, cfg.num_kv_heads);
            let mut text = TextModel::from_gguf(path, &g.content)?;
            text.eos_token_ids.extend(&cfg.eos_token_ids);
            text.eos_token_ids.sort_unstable();
            text.eos_token_ids.dedup();
            let mut w = weights::WeightSource::Gguf(g);
            w.set_device(device);
            let mut cfg = cfg;
            if w.contains("rope_freqs.weight") {
                let f = w.tensor("rope_freqs.weight", &[cfg.head_dim / 2])?;
                cfg.rope_scaling =
                    RopeScaling::Factors(f.to_vec1::<f32>()?.into_iter().map(f64::from).collect());
            }
            let ctx = context(&cfg, opts);
            let transformer = Transformer::load(&mut w, cfg, ctx, opts.shard.as_ref())?;
            Ok(Self {
                path: path.to_owned(),
                transformer,
                text,
            })
        } else {
            Err(ModelError::NotAModel {
                path: path.to_owned(),
            })
        }
    }
}

/// Fails before any weight is read when the model doesn't split over the group.
fn check_shard(cfg: &ModelConfig, opts: &LoadOptions) -> Result<()> {
    match &opts.shard {
        Some(s) => parallel::validate(cfg, s),
        None => Ok(()),
    }
}

fn context(cfg: &ModelConfig, opts: &LoadOptions) -> usize {
    match opts.max_context {
        Some(c) => c.min(cfg.max_position_embeddings),
        None => cfg.max_position_embeddings,
    }
}

/// The architecture from GGUF metadata (`general.architecture` and `<arch>.*` keys).
fn config_from_gguf(path: &Path, c: &gguf_file::Content) -> Result<ModelConfig> {
    let md = &c.metadata;
    let missing = |key: &str| ModelError::MissingKey {
        path: path.to_owned(),
        key: key.to_owned(),
    };
    let bad = |key: &str, e: candle_core::Error| ModelError::BadKey {
        path: path.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let arch_name = md
        .get("general.architecture")
        .ok_or_else(|| missing("general.architecture"))?
        .to_string()
        .map_err(|e| bad("general.architecture", e))?
        .clone();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(ModelError::UnknownArchitecture {
                path: path.to_owned(),
                arch: other.to_owned(),
            })
        }
    };
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch_name}.{k}");
        let v = md.get(&key).ok_or_else(|| missing(&key))?;
        v.to_u32()
            .map(|v| v as usize)
            .or_else(|_| v.to_u64().map(|v| v as usize))
            .map_err(|e| bad(&key, e))
    };
    let f = |k: &str, default: f64| -> f64 {
        md.get(&format!("{arch_name}.{k}"))
            .and_then(|v| v.to_f32().map(f64::from).ok())
            .unwrap_or(default)
    };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => md
            .get("tokenizer.ggml.tokens")
            .and_then(|t| t.to_vec().ok())
            .map(|t| t.len())
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?,
    };
    let has_output = c.tensor_infos.contains_key("output.weight");
    let eos = md
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    let cfg = ModelConfig {
        architecture,
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: u("attention.head_count_kv").unwrap_or(heads),
        head_dim: u("rope.dimension_count").unwrap_or(hidden / heads.max(1)),
        vocab_size: vocab,
        max_position_embeddings: u("context_length").unwrap_or(2048),
        rope_theta: f("rope.freq_base", 10_000.0),
        rope_scaling: RopeScaling::None,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings: !has_output,
        qkv_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok()),
        eos_token_ids: eos.into_iter().collect(),
    };
    cfg.validate()
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    Ok(cfg)
}
