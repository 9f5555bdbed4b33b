//! The decoder-only transformer shared by Llama and Qwen2, read top to bottom:
//! `Rope`, `Attention`, `Mlp`, `Block`, `Transformer`.
//!
//! One forward runs a whole engine step: several sequences, each at its own position in its own KV
//! slot, prefill chunks and single decode tokens mixed. Everything position-independent (norms,
//! projections, MLP) runs once over all the step's tokens stacked `[tokens, hidden]`; only the
//! attention core loops over sequences, each against its own cache.
//!
//! With tensor parallelism (see `parallel`) the same code runs on every rank: the linears come
//! pre-split from the loader, attention sees only this rank's heads, and the row-parallel o/down
//! projections sum over the group inside `Linear::forward`.

use std::ops::Range;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::attention;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::kv::{KvCache, SlotId};
use crate::linear::{Embedding, Linear};
use crate::parallel::{Shard, Split, Tp};
use crate::weights::WeightSource;
use tandem_collective::all_reduce_tensor;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqInput<'a> {
    pub slot: SlotId,
    /// Tokens appended after the slot's cached positions.
    pub tokens: &'a [u32],
    /// Logits of every token (speculative verification, scoring) or just the last.
    pub all_logits: bool,
}

/// Logits of a step: `logits` `[rows, vocab]`, and for each input sequence its rows.
#[derive(Debug)]
pub struct BatchLogits {
    pub logits: Tensor,
    pub rows: Vec<Range<usize>>,
    /// The group whose collectives produced these logits: on a GPU they complete asynchronously,
    /// so whether they all succeeded is known only once the logits reach the host.
    pub(crate) shard: Option<Shard>,
}

impl BatchLogits {
    /// Each row as a `Vec<f32>`, grouped per sequence. Only these sampled rows leave the device.
    pub fn to_vecs(&self) -> Result<Vec<Vec<Vec<f32>>>> {
        let all = self.logits.to_vec2::<f32>()?;
        if let Some(s) = &self.shard {
            // An NCCL collective aborted by the watchdog (a peer died) lets the copy above
            // return with garbage; never hand that to the sampler.
            s.comm.check_healthy()?;
        }
        Ok(self.rows.iter().map(|r| all[r.clone()].to_vec()).collect())
    }
}

/// Rotary position embedding tables, `[max_positions, head_dim / 2]`, in the Hugging Face
/// "rotate half" convention (dimension i pairs with i + head_dim/2).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, max_positions: usize, device: &Device) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let mut pos_scale = 1.0;
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => pos_scale = 1.0 / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen < high_wavelen {
                        continue;
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
            RopeScaling::Factors(factors) => {
                for (f, s) in inv_freq.iter_mut().zip(factors) {
                    *f /= s;
                }
            }
        }
        let mut cos = Vec::with_capacity(max_positions * d / 2);
        let mut sin = Vec::with_capacity(max_positions * d / 2);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f64 * pos_scale * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, d / 2), device)?,
            sin: Tensor::from_vec(sin, (max_positions, d / 2), device)?,
        })
    }

    /// The step's rows of the tables, `[tokens, 1, head_dim / 2]`: gathered once per step and
    /// shared by every layer.
    fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?.unsqueeze(1)?,
            self.sin.index_select(positions, 0)?.unsqueeze(1)?,
        ))
    }
}

/// `x`: `[tokens, heads, head_dim]`; `cos`, `sin` from `Rope::gather`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    // Each token is its own "batch" entry so every token gets its own position.
    let x = x.reshape((t, h, 1, d))?;
    Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?.reshape((t, h, d))?)
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// This rank's heads (all of them at TP=1).
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &mut WeightSource, p: &str, cfg: &ModelConfig, tp: &Tp) -> Result<Self> {
        let (h, kvh, hd, hidden) = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.hidden_size,
        );
        let (col, row) = (tp.column(), tp.row());
        Ok(Self {
            q: w.linear(&format!("{p}.q_proj"), h * hd, hidden, cfg.qkv_bias, &col)?,
            k: w.linear(&format!("{p}.k_proj"), kvh * hd, hidden, cfg.qkv_bias, &col)?,
            v: w.linear(&format!("{p}.v_proj"), kvh * hd, hidden, cfg.qkv_bias, &col)?,
            o: w.linear(&format!("{p}.o_proj"), hidden, h * hd, false, &row)?,
            // Contiguous head ranges per rank keep each query head with its KV head: the group
            // of query heads sharing a KV head is adjacent and splits evenly.
            num_heads: h / tp.size(),
            num_kv_heads: kvh / tp.size(),
            head_dim: hd,
        })
    }

    fn forward(&self, x: &Tensor, step: &Step, kv: &mut KvCache, layer: usize) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = apply_rope(
            &self.q.forward(x)?.reshape((t, h, hd))?,
            &step.cos,
            &step.sin,
        )?;
        let k = apply_rope(
            &self.k.forward(x)?.reshape((t, kvh, hd))?,
            &step.cos,
            &step.sin,
        )?;
        let v = self.v.forward(x)?.reshape((t, kvh, hd))?;
        let group = h / kvh;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(step.seqs.len());
        for s in &step.seqs {
            let n = s.len;
            let k_new = k.narrow(0, s.offset, n)?.transpose(0, 1)?.contiguous()?;
            let v_new = v.narrow(0, s.offset, n)?.transpose(0, 1)?.contiguous()?;
            let (k_all, v_all) = kv.append(s.slot, layer, &k_new, &v_new)?;
            if x.device().is_cpu() {
                // Every row attends the same way whatever chunk it came in (attention.rs): a
                // prompt's KV and logits don't depend on how the scheduler chunked it or on
                // what shared the step.
                let shape = attention::Heads {
                    heads: h,
                    kv_heads: kvh,
                    head_dim: hd,
                };
                let q_rows = q.narrow(0, s.offset, n)?;
                outs.push(attention::causal(
                    &q_rows,
                    &k_all,
                    &v_all,
                    s.start,
                    shape,
                    scale as f32,
                )?);
                continue;
            }
            // Devices other than the CPU: candle's ops. [n, heads, hd] → [heads, n, hd]; query
            // heads sharing a KV head are adjacent, so [kv_heads, group * n, hd] lets one
            // matmul serve the whole group (GQA).
            let q = q.narrow(0, s.offset, n)?.transpose(0, 1)?.contiguous()?;
            let q = q.reshape((kvh, group * n, hd))?;
            let o = if n <= ROW_EXACT_MAX_ROWS {
                // Each query row attends exactly as a single decoded token would: over its own
                // keys only, with the same shapes. Batched with a causal mask the matmul and
                // softmax sum over longer rows in another order; on quantized weights those
                // 1e-6 differences flip roundings of the int8-quantized activations and grow to
                // 0.3-0.5 logits (Qwen2.5 1.5B), enough to make speculative verification pick
                // other tokens than plain decoding at ordinary margins.
                let mut rows = Vec::with_capacity(n);
                let q = q.reshape((kvh, group, n, hd))?;
                for i in 0..n {
                    let len = s.start + i + 1;
                    let q_i = q.narrow(2, i, 1)?.reshape((kvh, group, hd))?;
                    let k_i = k_all.narrow(1, 0, len)?;
                    let v_i = v_all.narrow(1, 0, len)?;
                    let scores = (q_i.matmul(&k_i.t()?)? * scale)?;
                    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                    // [kvh, group, hd] → [h, 1, hd]
                    rows.push(probs.matmul(&v_i.contiguous()?)?.reshape((h, 1, hd))?);
                }
                Tensor::cat(&rows, 1)?
            } else {
                let mut scores = (q.matmul(&k_all.t()?)? * scale)?;
                scores = scores.broadcast_add(&causal_mask(n, s.start, group, x.device())?)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                // [kvh, group*n, hd] → [h, n, hd]
                probs.matmul(&v_all.contiguous()?)?.reshape((h, n, hd))?
            };
            outs.push(o.transpose(0, 1)?.reshape((n, h * hd))?);
        }
        let o = Tensor::cat(&outs, 0)?;
        self.o.forward(&o)
    }
}

/// Off the CPU: chunks of up to this many rows (decoded tokens, a verification's 1 + up to 16 drafted
/// tokens, short prefill tails) attend row by row, bit-identical to decoding them one at a time.
/// Longer prefill chunks attend in one masked matmul, which is faster.
const ROW_EXACT_MAX_ROWS: usize = 32;

/// `[group * n, start + n]`: query i (at position start + i) sees keys 0..=start + i.
fn causal_mask(n: usize, start: usize, group: usize, device: &Device) -> Result<Tensor> {
    let len = start + n;
    let mut m = Vec::with_capacity(group * n * len);
    for _ in 0..group {
        for i in 0..n {
            m.extend((0..len).map(|j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            }));
        }
    }
    Ok(Tensor::from_vec(m, (group * n, len), device)?)
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(w: &mut WeightSource, p: &str, cfg: &ModelConfig, tp: &Tp) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (col, row) = (tp.column(), tp.row());
        Ok(Self {
            gate: w.linear(&format!("{p}.gate_proj"), inter, hidden, false, &col)?,
            up: w.linear(&format!("{p}.up_proj"), inter, hidden, false, &col)?,
            down: w.linear(&format!("{p}.down_proj"), hidden, inter, false, &row)?,
        })
    }

    fn linears(&self) -> [&Linear; 3] {
        [&self.gate, &self.up, &self.down]
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_attn_norm: Tensor,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut WeightSource, i: usize, cfg: &ModelConfig, tp: &Tp) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let hidden = cfg.hidden_size;
        Ok(Self {
            input_norm: w.tensor(&format!("{p}.input_layernorm.weight"), &[hidden])?,
            attn: Attention::load(w, &format!("{p}.self_attn"), cfg, tp)?,
            post_attn_norm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, tp)?,
        })
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let a = &self.attn;
        [&a.q, &a.k, &a.v, &a.o]
            .into_iter()
            .chain(self.mlp.linears())
    }
}

/// Where each sequence's tokens sit in the step's stacked `[tokens, hidden]` tensor.
struct StepSeq {
    slot: SlotId,
    offset: usize,
    len: usize,
    /// Cached positions before this step.
    start: usize,
}

struct Step {
    seqs: Vec<StepSeq>,
    cos: Tensor,
    sin: Tensor,
}

pub struct Transformer {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    /// The LM head is the embedding table (tied): counted once in `weight_bytes`.
    lm_head_tied: bool,
    rope: Rope,
    max_context: usize,
    device: Device,
    shard: Option<Shard>,
    /// `(start, len)` of this rank's vocabulary rows when the embedding and LM head are split.
    vocab_part: Option<(usize, usize, Shard)>,
    /// KV heads this rank attends with and caches.
    local_kv_heads: usize,
}

impl Transformer {
    /// `shard`: this rank's place in a tensor-parallel group (the config must split evenly over
    /// it; `Model::load` checks), or `None` for the whole model.
    pub(crate) fn load(
        w: &mut WeightSource,
        cfg: ModelConfig,
        max_context: usize,
        shard: Option<&Shard>,
    ) -> Result<Self> {
        let device = w.device().clone();
        let tp = Tp::new(shard);
        // Vocabulary-parallel when the vocabulary divides: each rank keeps its rows of the
        // embedding and LM head (a 150k-token table is 0.9 GB in f32, the biggest replicated
        // piece), at the cost of one all-reduce of the embeddings and one of the sampled rows'
        // logits per step.
        let vocab_part = tp.vocab_part(cfg.vocab_size);
        let rows = vocab_part.as_ref().map(|(start, len, _)| (*start, *len));
        let embed = w.embedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, rows)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(w, i, &cfg, &tp))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.tensor("model.norm.weight", &[cfg.hidden_size])?;
        let lm_head_tied = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let lm_head = if lm_head_tied {
            embed.as_linear(w.batch_matmul())?
        } else {
            w.linear(
                "lm_head",
                cfg.vocab_size,
                cfg.hidden_size,
                false,
                &if vocab_part.is_some() {
                    tp.column()
                } else {
                    Split::Full
                },
            )?
        };
        let rope = Rope::new(&cfg, max_context, &device)?;
        let local_kv_heads = cfg.num_kv_heads / tp.size();
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            lm_head_tied,
            rope,
            max_context,
            device,
            shard: shard.cloned(),
            vocab_part,
            local_kv_heads,
        })
    }

    /// Where this model's weights, KV cache and forward live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This rank's tensor-parallel group, if it is one.
    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref()
    }

    /// Bytes of the block linears (q/k/v/o/gate/up/down) this rank holds: what tensor
    /// parallelism divides by the group size.
    pub fn sharded_weight_bytes(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(Block::linears)
            .map(Linear::weight_bytes)
            .sum()
    }

    /// Bytes of all weights this rank holds: the sharded block linears plus the replicated
    /// embedding, LM head and norms.
    pub fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let norms: usize = self
            .blocks
            .iter()
            .map(|b| dense(&b.input_norm) + dense(&b.post_attn_norm))
            .sum();
        let head = if self.lm_head_tied {
            0
        } else {
            self.lm_head.weight_bytes()
        };
        self.sharded_weight_bytes() + self.embed.weight_bytes() + head + norms + dense(&self.norm)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The longest sequence (prompt + generated) this instance serves.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn is_quantized(&self) -> bool {
        self.lm_head.is_quantized() || self.blocks.iter().any(|b| b.mlp.up.is_quantized())
    }

    /// A KV cache shaped for this model (this rank's KV heads only, under tensor parallelism).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.cfg.num_layers,
            self.local_kv_heads,
            self.cfg.head_dim,
            self.max_context,
            self.device.clone(),
        )
    }

    /// Runs one step. On error no slot has advanced (a bad sequence can't corrupt the others'
    /// caches), though rows written past a slot's end may be overwritten later.
    pub fn forward(&self, kv: &mut KvCache, batch: &[SeqInput<'_>]) -> Result<BatchLogits> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        let mut select = Vec::new();
        for s in batch {
            let start = kv.len(s.slot)?;
            let n = s.tokens.len();
            if n == 0 {
                return Err(ModelError::Config(format!(
                    "slot {} got no tokens",
                    s.slot.0
                )));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    token: bad,
                    vocab: self.cfg.vocab_size,
                });
            }
            kv.reserve(s.slot, n)?;
            let offset = ids.len();
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + n).map(|p| p as u32));
            let first_row = select.len();
            if s.all_logits {
                select.extend((offset..offset + n).map(|i| i as u32));
            } else {
                select.push((offset + n - 1) as u32);
            }
            rows.push(first_row..select.len());
            seqs.push(StepSeq {
                slot: s.slot,
                offset,
                len: n,
                start,
            });
        }
        let t = ids.len();
        let (cos, sin) = self
            .rope
            .gather(&Tensor::from_vec(positions, t, &self.device)?)?;
        let step = Step { seqs, cos, sin };
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = self.embed_tokens(ids)?;
        for (layer, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.input_norm, eps)?;
            x = (x + b.attn.forward(&h, &step, kv, layer)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.post_attn_norm, eps)?;
            x = (x + b.mlp.forward(&h)?)?;
        }
        for s in &step.seqs {
            kv.advance(s.slot, s.len)?;
        }
        // Only the rows someone will sample from go through the final norm and the LM head.
        let x = if select.len() == t {
            x
        } else {
            x.index_select(
                &Tensor::from_vec(select.clone(), select.len(), &self.device)?,
                0,
            )?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let logits = match &self.vocab_part {
            None => logits,
            Some((start, _, shard)) => {
                // Each rank computed its vocabulary slice; place it in a zero row and sum.
                let (r, _) = logits.dims2()?;
                let full = Tensor::zeros((r, self.cfg.vocab_size), DType::F32, &self.device)?;
                full.slice_set(&logits.contiguous()?, 1, *start)?;
                all_reduce_tensor(shard.comm.as_ref(), &full)?
            }
        };
        Ok(BatchLogits {
            logits,
            rows,
            shard: self.shard.clone(),
        })
    }

    /// Token embeddings; with a split vocabulary each rank looks up the ids it holds (zeros
    /// for the others) and the group sums them.
    fn embed_tokens(&self, ids: Vec<u32>) -> Result<Tensor> {
        let t = ids.len();
        let Some((start, len, shard)) = &self.vocab_part else {
            return self.embed.forward(&Tensor::from_vec(ids, t, &self.device)?);
        };
        let (start, len) = (*start as u32, *len as u32);
        let mine = |id: u32| id >= start && id < start + len;
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| if mine(i) { i - start } else { 0 })
            .collect();
        let mask: Vec<f32> = ids
            .iter()
            .map(|&i| if mine(i) { 1.0 } else { 0.0 })
            .collect();
        let x = self
            .embed
            .forward(&Tensor::from_vec(local, t, &self.device)?)?;
        let x = x.broadcast_mul(&Tensor::from_vec(mask, (t, 1), &self.device)?)?;
        Ok(all_reduce_tensor(shard.comm.as_ref(), &x)?)
    }

    /// One small forward in a throwaway slot. candle packs quantized weights for its fast
    /// kernels lazily, on first use; doing it at startup keeps it off the first request's latency.
    pub fn warm_up(&self) -> Result<()> {
        let tokens: Vec<u32> = (0..8).map(|i| i % self.cfg.vocab_size as u32).collect();
        self.score(&tokens).map(|_| ())
    }

    /// Convenience for tests and scoring: logits of every position of `tokens` in a fresh slot.
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut kv = self.new_cache();
        let slot = kv.allocate();
        let out = self.forward(
            &mut kv,
            &[SeqInput {
                slot,
                tokens,
                all_logits: true,
            }],
        )?;
        Ok(out.logits.i((.., ..))?.to_vec2::<f32>()?)
    }
}
