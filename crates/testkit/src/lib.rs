//! Tiny transformer models made deterministically from a seed and written as real Hugging Face
//! folders (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`), for fast tests of the model loader and the engine.
//!
//! ```no_run
//! let m = tandem_testkit::tiny_model(&tandem_testkit::TinyConfig::llama())?;
//! assert!(m.dir.join("model.safetensors").exists());
//! # anyhow::Ok(())
//! ```
//!
//! The same config (seed included) always gives byte-identical files. Each tensor draws from its
//! own RNG, seeded from the config seed and the tensor's name, so e.g. adding a layer leaves the
//! other tensors unchanged.
//!
//! Weights are scaled so that the model is not flat: the next-token distribution has an entropy
//! well below uniform (about 2.2-2.8 nats against `ln(304)` = 5.7, mean top-1 probability 0.35-0.5)
//! yet spread over several tokens, so sampling tests see real differences between temperatures,
//! top-k and top-p.

pub mod pki;
mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

pub use tokenizer::{
    tokenizer_json, CHAT_TEMPLATE, ENDOFTEXT, ENDOFTEXT_ID, IM_END, IM_END_ID, IM_START,
    IM_START_ID, VOCAB_SIZE,
};

/// The BOS token id written to `config.json` (`<|endoftext|>`).
pub const BOS_TOKEN_ID: u32 = ENDOFTEXT_ID;
/// The EOS token id written to `config.json` (`<|im_end|>`). `generation_config.json` lists
/// `[IM_END_ID, ENDOFTEXT_ID]`.
pub const EOS_TOKEN_ID: u32 = IM_END_ID;

/// Std of untied token embeddings.
const EMBED_STD: f64 = 1.0;
/// Std of an untied `lm_head` times `sqrt(hidden_size)`: the std of the logits (the final norm
/// makes the hidden state's RMS about 1).
const LM_HEAD_GAIN: f64 = 3.0;
/// Std of q/k/v biases (Qwen2).
const BIAS_STD: f64 = 0.3;
/// Std of the noise on RMSNorm weights around 1.0.
const NORM_NOISE_STD: f64 = 0.02;

/// The model family to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `LlamaForCausalLM`: no biases.
    Llama,
    /// `Qwen2ForCausalLM`: biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    /// The `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// The single entry of `architectures` in `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Whether q/k/v projections carry biases.
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }
}

/// Shape and seed of a tiny model. The vocab is always the bundled tokenizer's ([`VOCAB_SIZE`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Write Llama 3.1 `rope_scaling` (factor 8, original context 64).
    pub llama3_rope_scaling: bool,
    pub seed: u64,
    /// Rows of the embedding table and LM head: [`VOCAB_SIZE`] (the bundled tokenizer's), or
    /// more for a real model's shape (ids past the tokenizer's are never encoded, only sampled).
    pub vocab_size: usize,
}

impl TinyConfig {
    /// Llama 3 style: hidden 64, 2 layers, 4 heads / 2 KV heads, tied embeddings, llama3 RoPE
    /// scaling, theta 500000.
    pub fn llama() -> Self {
        TinyConfig {
            arch: Arch::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 512,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            llama3_rope_scaling: true,
            seed: 0,
            vocab_size: VOCAB_SIZE,
        }
    }

    /// Qwen2 style: hidden 64, 2 layers, 4 heads / 2 KV heads, q/k/v biases, separate `lm_head`,
    /// no RoPE scaling, theta 1e6.
    pub fn qwen2() -> Self {
        TinyConfig {
            arch: Arch::Qwen2,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 512,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            llama3_rope_scaling: false,
            seed: 1,
            vocab_size: VOCAB_SIZE,
        }
    }

    /// Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, FFN 8960, vocabulary
    /// 151936, tied embeddings) with random weights: 1.54 B parameters, for measuring speed on
    /// real sizes where the weights cannot be shipped (scripts/gpu-check).
    pub fn qwen2_5_1_5b() -> Self {
        TinyConfig {
            hidden_size: 1536,
            intermediate_size: 8960,
            num_layers: 28,
            num_heads: 12,
            num_kv_heads: 2,
            max_position_embeddings: 32768,
            tie_word_embeddings: true,
            vocab_size: 151_936,
            ..Self::qwen2()
        }
    }

    /// Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, FFN 4864, vocabulary
    /// 151936, tied embeddings): the draft of the pair.
    pub fn qwen2_5_0_5b() -> Self {
        TinyConfig {
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            max_position_embeddings: 32768,
            tie_word_embeddings: true,
            vocab_size: 151_936,
            ..Self::qwen2()
        }
    }

    /// The same config with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Checks the shape is a valid transformer.
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
            || self.num_kv_heads == 0
        {
            bail!("tiny config has a zero dimension: {self:?}");
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size,
                self.num_heads
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.vocab_size < VOCAB_SIZE {
            bail!(
                "vocab_size {} is below the bundled tokenizer's {VOCAB_SIZE} ids",
                self.vocab_size
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("head_dim {} must be even for RoPE", self.head_dim());
        }
        Ok(())
    }

    /// Every tensor of `model.safetensors`: Hugging Face name and shape (`[out, in]` for
    /// linears), in a fixed order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim();
        let i = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (name, rows) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)] {
                out.push((format!("{p}.self_attn.{name}.weight"), vec![rows, h]));
                if self.arch.qkv_bias() && name != "o_proj" {
                    out.push((format!("{p}.self_attn.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// `config.json` text, as Hugging Face writes it.
    pub fn config_json(&self) -> String {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "torch_dtype": "float32",
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": true,
            "transformers_version": "4.46.0",
            "rope_scaling": null,
        });
        let extra = match self.arch {
            Arch::Llama => json!({
                "attention_bias": false,
                "mlp_bias": false,
                "head_dim": self.head_dim(),
                "pretraining_tp": 1,
            }),
            Arch::Qwen2 => json!({
                "use_sliding_window": false,
                "sliding_window": self.max_position_embeddings,
                "max_window_layers": self.num_layers,
            }),
        };
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
            if self.llama3_rope_scaling {
                c.insert(
                    "rope_scaling".into(),
                    json!({
                        "rope_type": "llama3",
                        "factor": 8.0,
                        "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64,
                    }),
                );
            }
        }
        tokenizer::pretty(&c)
    }

    /// The std of a random tensor, or `None` for an RMSNorm weight (1.0 plus small noise).
    fn init_std(&self, name: &str, shape: &[usize]) -> Option<f64> {
        if name.ends_with("norm.weight") {
            None
        } else if name == "model.embed_tokens.weight" {
            // Tied, the embeddings are also the output head: scale them as one.
            Some(if self.tie_word_embeddings {
                LM_HEAD_GAIN / (self.hidden_size as f64).sqrt()
            } else {
                EMBED_STD
            })
        } else if name == "lm_head.weight" {
            Some(LM_HEAD_GAIN / (self.hidden_size as f64).sqrt())
        } else if name.ends_with(".bias") {
            Some(BIAS_STD)
        } else {
            // A linear [out, in]: keep activations at unit scale.
            let fan_in = shape.get(1).copied().unwrap_or(1).max(1);
            Some(1.0 / (fan_in as f64).sqrt())
        }
    }

    /// All weights, as F32 CPU tensors keyed by Hugging Face name.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.weights_as(DType::F32)
    }

    /// All weights in `dtype` (F32, BF16 or F16). Tensors are drawn on all cores, each from its
    /// own RNG, so the result does not depend on the thread count; a real-size shape (1.5 B
    /// parameters) takes seconds, not minutes.
    pub fn weights_as(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.validate()?;
        let shapes = self.tensor_shapes();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parts: Vec<Result<Vec<(String, Tensor)>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(shapes.len()).max(1))
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((name, shape)) = shapes.get(i) else {
                                return Ok(mine);
                            };
                            let t = self
                                .draw(name, shape)
                                .and_then(|t| Ok(t.to_dtype(dtype)?))
                                .with_context(|| format!("building tensor {name}"))?;
                            mine.push((name.clone(), t));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("weight thread panicked")))
                })
                .collect()
        });
        let mut out = HashMap::new();
        for part in parts {
            out.extend(part?);
        }
        Ok(out)
    }

    fn draw(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = StdRng::seed_from_u64(tensor_seed(self.seed, name));
        let data: Vec<f32> = match self.init_std(name, shape) {
            Some(std) => (0..n).map(|_| (normal(&mut rng) * std) as f32).collect(),
            None => (0..n)
                .map(|_| (1.0 + normal(&mut rng) * NORM_NOISE_STD) as f32)
                .collect(),
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// `generation_config.json` text.
fn generation_config_json() -> String {
    tokenizer::pretty(&json!({
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "transformers_version": "4.46.0",
    }))
}

/// A tiny model folder. When made by [`tiny_model`], the folder is a temp dir removed on drop.
#[derive(Debug)]
pub struct TinyModel {
    /// The Hugging Face model folder.
    pub dir: PathBuf,
    /// `vocab_size` in `config.json` (the config's; [`VOCAB_SIZE`] unless it asks for more).
    pub vocab_size: usize,
    /// The config it was made from.
    pub config: TinyConfig,
    _tmp: Option<tempfile::TempDir>,
}

impl TinyModel {
    /// `dir/config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// `dir/model.safetensors`.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// `dir/tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

/// Writes the model folder for `cfg` into `dir` (created if missing; existing files of the same
/// names are overwritten).
pub fn write_tiny_model(cfg: &TinyConfig, dir: &Path) -> Result<()> {
    write_model(cfg, dir, DType::F32)
}

/// [`write_tiny_model`] with the weights stored in `dtype` (BF16 as real checkpoints are).
pub fn write_model(cfg: &TinyConfig, dir: &Path, dtype: DType) -> Result<()> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, text: String| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("config.json", cfg.config_json())?;
    write("generation_config.json", generation_config_json())?;
    write("tokenizer.json", tokenizer_json())?;
    write(
        "tokenizer_config.json",
        tokenizer::tokenizer_config_json(cfg.max_position_embeddings),
    )?;
    let weights = cfg.weights_as(dtype)?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&weights, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the model folder for `cfg` into a fresh temp dir, kept alive by the returned value.
pub fn tiny_model(cfg: &TinyConfig) -> Result<TinyModel> {
    let tmp = tempfile::Builder::new()
        .prefix("tandem-tiny-")
        .tempdir()
        .context("creating temp dir")?;
    write_tiny_model(cfg, tmp.path())?;
    Ok(TinyModel {
        dir: tmp.path().to_path_buf(),
        vocab_size: cfg.vocab_size,
        config: cfg.clone(),
        _tmp: Some(tmp),
    })
}

/// Like [`tiny_model`] but in `dir`, which is left in place.
pub fn tiny_model_in(cfg: &TinyConfig, dir: &Path) -> Result<TinyModel> {
    write_tiny_model(cfg, dir)?;
    Ok(TinyModel {
        dir: dir.to_path_buf(),
        vocab_size: cfg.vocab_size,
        config: cfg.clone(),
        _tmp: None,
    })
}

/// Seed of one tensor's RNG: the model seed mixed with a stable hash (FNV-1a) of its name.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(seed ^ splitmix64(h))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// Real weights fetched by `scripts/fetch-models` into `$TANDEM_MODEL_CACHE` (default
/// `~/.cache/tandem/models`). `None`, with a note on stderr, when the file is absent, so a
/// developer without it can run the rest; with TANDEM_REQUIRE_REAL_MODELS set (as CI does) a
/// missing file fails the test instead of skipping it.
pub fn real_model(file: &str, fetch_key: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("TANDEM_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/tandem/models"))
        })?;
    let p = dir.join(file);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("TANDEM_REQUIRE_REAL_MODELS").is_none(),
        "{} missing: run scripts/fetch-models {fetch_key}",
        p.display()
    );
    eprintln!(
        "skipping: {} missing (scripts/fetch-models {fetch_key})",
        p.display()
    );
    None
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF), the real model the test suite runs.
pub fn real_smollm2() -> Option<std::path::PathBuf> {
    real_model("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}
