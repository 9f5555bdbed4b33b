//! `tandem bench device`: the model on one device, measured and checked against another, in
//! one run. What `scripts/gpu-check` runs on a GPU machine (`--device cuda:0`), and what runs
//! on any machine with `--device cpu` (the CPU side of the same code):
//!
//! - logits: the device's against the reference device's on the same tokens (teacher-forced),
//!   max and mean absolute difference and greedy top-1 agreement;
//! - speed: prefill tokens/s, decode tokens/s at each batch size through the real engine
//!   (scheduler, sampling, detokenizer);
//! - speculation: the cost of verifying k+1 tokens against one decode step, the draft's cost
//!   per token, and the speedup they predict with a given acceptance rate;
//! - tensor parallelism: TP=1 through the group code (NCCL with world size 1 on a GPU) and TP=2
//!   over TCP with both ranks on the one device, logits against the plain model.
//!
//! `tandem make-model` writes the random-weight models of real shapes it runs on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
#[cfg(feature = "nccl")]
use std::time::Duration;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;
use tandem_engine::{Engine, EngineConfig, Event, Request, SamplingParams, StopCriteria};
use tandem_model::{DeviceKind, LoadOptions, Model, SeqInput, Shard};

use crate::config::DeviceArg;

#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// The model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The device measured.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// The device whose logits are the reference; `none` skips the comparison.
    #[arg(long, default_value = "cpu")]
    pub reference: String,
    /// Hugging Face folders: block-quantize the linears at load (q4k, q8_0) [default: as stored].
    #[arg(long)]
    pub quantize: Option<String>,
    /// Decode batch sizes measured.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch: Vec<usize>,
    /// Tokens decoded per sequence at each batch size.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens compared teacher-forced against the reference.
    #[arg(long, default_value_t = 128)]
    pub compare_tokens: usize,
    /// A draft model for the speculation prediction (its cost per token on this device).
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Drafted tokens per verification step.
    #[arg(long, default_value_t = 4)]
    pub draft_tokens: usize,
    /// Per-token acceptance rate of the draft, as measured with the real pair on CPU
    /// (docs/benchmarks.md).
    #[arg(long, default_value_t = 0.75)]
    pub acceptance: f64,
    /// Also run the model as TP=1 through the group code and TP=2 over TCP on this device.
    #[arg(long)]
    pub tensor_parallel: bool,
    /// Append the results as one JSON line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Parses `--quantize`.
fn block_type(s: &str) -> anyhow::Result<candle_core::quantized::GgmlDType> {
    use candle_core::quantized::GgmlDType;
    Ok(match s.to_ascii_lowercase().as_str() {
        "q4k" | "q4_k" => GgmlDType::Q4K,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        "q8_0" | "q80" => GgmlDType::Q8_0,
        "q4_0" | "q40" => GgmlDType::Q4_0,
        other => anyhow::bail!("--quantize {other}: use q4k, q6k, q8_0 or q4_0"),
    })
}

/// How every model of the run loads: on `device`, quantized at load as `--quantize` says.
fn load_options(args: &DeviceArgs, device: DeviceKind) -> anyhow::Result<LoadOptions> {
    Ok(LoadOptions {
        device,
        quantize_hf: args.quantize.as_deref().map(block_type).transpose()?,
        max_context: Some(4096),
        ..Default::default()
    })
}

fn load(args: &DeviceArgs, path: &Path, device: DeviceKind) -> anyhow::Result<(Model, f64)> {
    let opts = load_options(args, device)?;
    let t = Instant::now();
    let m = Model::load(path, &opts)
        .with_context(|| format!("loading {} on {device}", path.display()))?;
    Ok((m, t.elapsed().as_secs_f64()))
}

/// Fixed pseudo-random token ids below the tokenizer's size (no RNG: the same on every run).
fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    let v = vocab.clamp(2, 30_000) as u64;
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + salt as u64 * 97 + 11) % v) as u32)
        .collect()
}

/// Every position's logits of `ids` as one sequence.
fn all_logits(m: &Model, ids: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
    let t = &m.transformer;
    let mut kv = t.new_cache();
    let slot = kv.allocate();
    let out = t.forward(
        &mut kv,
        &[SeqInput {
            slot,
            tokens: ids,
            all_logits: true,
        }],
    )?;
    Ok(out.to_vecs()?.remove(0))
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Max and mean |a - b| over all logits, and the share of positions with the same argmax.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64, f64) {
    let (mut max, mut sum, mut n, mut same) = (0f64, 0f64, 0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            let d = f64::from((p - q).abs());
            max = max.max(d);
            sum += d;
            n += 1;
        }
        same += usize::from(argmax(x) == argmax(y));
    }
    (
        max,
        sum / n.max(1) as f64,
        same as f64 / a.len().max(1) as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median seconds of one forward of `n` new tokens on a sequence that already holds `ctx`.
fn step_seconds(m: &Model, ctx: usize, n: usize, all: bool) -> anyhow::Result<f64> {
    let t = &m.transformer;
    let vocab = m.transformer.config().vocab_size;
    let prefix = tokens(ctx, vocab, 1);
    let step = tokens(n, vocab, 2);
    let mut times = Vec::new();
    for i in 0..6 {
        let mut kv = t.new_cache();
        let slot = kv.allocate();
        if !prefix.is_empty() {
            t.forward(
                &mut kv,
                &[SeqInput {
                    slot,
                    tokens: &prefix,
                    all_logits: false,
                }],
            )?
            .to_vecs()?;
        }
        let s = Instant::now();
        t.forward(
            &mut kv,
            &[SeqInput {
                slot,
                tokens: &step,
                all_logits: all,
            }],
        )?
        .to_vecs()?; // brings the logits to the host: the step is done
        if i > 0 {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Seconds from submitting `n` requests of `new_tokens` each to their last token.
fn generate_seconds(
    engine: &Engine,
    n: usize,
    new_tokens: usize,
    vocab: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut gens = (0..n)
        .map(|i| {
            engine.submit(Request {
                prompt: tokens(32, vocab, 10 + i),
                sampling: SamplingParams::default(),
                stop: StopCriteria {
                    max_new_tokens: new_tokens,
                    ..Default::default()
                },
                ignore_eos: true,
                speculation: Default::default(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("submitting: {e:?}"))?;
    for g in gens.iter_mut() {
        let mut got = 0;
        while let Some(ev) = g.events.blocking_recv() {
            match ev {
                Event::Token(_) => got += 1,
                Event::Finished { .. } => break,
                Event::Error(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
        anyhow::ensure!(got > 0, "a sequence produced no tokens");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Aggregate decode tokens/s of `n` sequences through the engine: the time of generating
/// `new_tokens` minus that of generating 1 (prefill and first token), as scripts/gpu-peer.py
/// measures transformers, best of two.
fn decode_tps(engine: &Engine, n: usize, new_tokens: usize, vocab: usize) -> anyhow::Result<f64> {
    let new_tokens = new_tokens.max(2);
    let mut first = f64::MAX;
    let mut full = f64::MAX;
    for _ in 0..2 {
        first = first.min(generate_seconds(engine, n, 1, vocab)?);
        full = full.min(generate_seconds(engine, n, new_tokens, vocab)?);
    }
    Ok((n * (new_tokens - 1)) as f64 / (full - first).max(1e-9))
}

/// The model as every rank of a `world`-rank group in this process (threads), each on `device`,
/// communicating through `comm(rank)`; returns rank 0's logits of `ids`, and the decode seconds
/// per step of one sequence.
fn group_logits(
    args: &DeviceArgs,
    device: DeviceKind,
    comms: Vec<Arc<dyn tandem_collective::Communicator>>,
    ids: &[u32],
) -> anyhow::Result<(Vec<Vec<f32>>, f64)> {
    let results: Vec<anyhow::Result<(Vec<Vec<f32>>, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let opts = LoadOptions {
                        shard: Some(Shard::new(comm)),
                        ..load_options(args, device)?
                    };
                    let m = Model::load(&args.model, &opts)?;
                    let logits = all_logits(&m, ids)?;
                    let step = step_seconds(&m, 64, 1, false)?;
                    Ok((logits, step))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("rank thread panicked")))
            })
            .collect()
    });
    let mut results = results.into_iter();
    let first = results.next().context("no ranks")??;
    for r in results {
        r?;
    }
    Ok(first)
}

pub fn run(args: DeviceArgs) -> anyhow::Result<()> {
    let device = args.device.0;
    let mut report = serde_json::Map::new();
    report.insert("model".into(), json!(args.model.display().to_string()));
    report.insert("device".into(), json!(device.to_string()));
    report.insert("quantize".into(), json!(args.quantize));
    let (model, load_s) = load(&args, &args.model, device)?;
    let cfg = model.transformer.config().clone();
    let vocab = model
        .text
        .tokenizer
        .get_vocab_size(true)
        .min(cfg.vocab_size);
    eprintln!(
        "bench device: {} on {device}: {} layers, hidden {}, vocab {}, loaded in {load_s:.1} s",
        args.model.display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size
    );
    report.insert("load_s".into(), json!(load_s));

    // (a) logits against the reference device.
    let ids = tokens(args.compare_tokens, vocab, 0);
    let here = all_logits(&model, &ids)?;
    if args.reference != "none" {
        let reference: DeviceKind = args
            .reference
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--reference: {e}"))?;
        let (ref_model, _) = load(&args, &args.model, reference)?;
        let there = all_logits(&ref_model, &ids)?;
        drop(ref_model);
        let (max, mean, top1) = compare(&here, &there);
        eprintln!(
            "logits vs {reference}: max |diff| {max:.4}, mean |diff| {mean:.5}, greedy top-1 \
             agreement {:.1}% over {} positions",
            top1 * 100.0,
            ids.len()
        );
        report.insert(
            "logits".into(),
            json!({"reference": reference.to_string(), "max_abs_diff": max,
                   "mean_abs_diff": mean, "top1_agreement": top1, "positions": ids.len()}),
        );
    }

    // (b) speed: prefill, then decode at each batch size through the engine.
    let prefill = step_seconds(&model, 0, args.prompt_tokens, false)?;
    let prefill_tps = args.prompt_tokens as f64 / prefill;
    eprintln!(
        "prefill {} tokens: {prefill_tps:.1} tokens/s",
        args.prompt_tokens
    );
    report.insert("prefill_tokens_per_s".into(), json!(prefill_tps));
    // (d) verification cost: k+1 tokens (all logits) against one decode step, same context.
    let k = args.draft_tokens;
    let one = step_seconds(&model, 128, 1, false)?;
    let verify = step_seconds(&model, 128, k + 1, true)?;
    eprintln!(
        "decode step {:.2} ms; verifying {} tokens {:.2} ms ({:.2}x a step)",
        one * 1e3,
        k + 1,
        verify * 1e3,
        verify / one
    );
    report.insert(
        "verify".into(),
        json!({"step_ms": one * 1e3, "verify_ms": verify * 1e3, "tokens": k + 1,
               "ratio": verify / one}),
    );
    if let Some(draft) = &args.draft {
        let (d, _) = load(&args, draft, device)?;
        let draft_step = step_seconds(&d, 128, 1, false)?;
        drop(d);
        // Leviathan et al.: a step verifies k drafted tokens and yields (1 - a^(k+1)) / (1 - a)
        // tokens on average, for k draft steps plus one verification.
        let a = args.acceptance.clamp(0.0, 0.999);
        let per_step = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
        let cost = (k as f64 * draft_step + verify) / one;
        let speedup = per_step / cost;
        eprintln!(
            "draft step {:.2} ms ({:.2}x the target's); at acceptance {a} and k = {k}: {per_step:.2} \
             tokens per {cost:.2} steps = predicted speedup {speedup:.2}x",
            draft_step * 1e3,
            draft_step / one
        );
        report.insert(
            "speculation".into(),
            json!({"draft": draft.display().to_string(), "draft_step_ms": draft_step * 1e3,
                   "acceptance": a, "k": k, "tokens_per_verify": per_step,
                   "cost_in_steps": cost, "predicted_speedup": speedup}),
        );
    }
    let text_vocab = vocab;
    let engine = Engine::start(
        model,
        EngineConfig {
            max_batch_tokens: 2048,
            max_running: args.batch.iter().copied().max().unwrap_or(1).max(1),
            max_waiting: 256,
            ..Default::default()
        },
    );
    let mut decode = serde_json::Map::new();
    for &n in &args.batch {
        let tps = decode_tps(&engine, n, args.new_tokens, text_vocab)?;
        eprintln!("decode, batch {n}: {tps:.1} tokens/s aggregate");
        decode.insert(n.to_string(), json!(tps));
    }
    drop(engine);
    report.insert("decode_tokens_per_s".into(), json!(decode));

    // (e) tensor parallelism on this device.
    if args.tensor_parallel {
        let ids = tokens(32, vocab, 3);
        let (plain, _) = load(&args, &args.model, device)?;
        let plain_logits = all_logits(&plain, &ids)?;
        let plain_step = step_seconds(&plain, 64, 1, false)?;
        drop(plain);
        let world1 = world1_comm(device)?;
        let (l1, _) = group_logits(&args, device, vec![world1.0], &ids)?;
        let (max1, _, top1_1) = compare(&l1, &plain_logits);
        eprintln!(
            "TP=1 through {}: max |diff| {max1:.5} vs the plain model, top-1 {:.1}%",
            world1.1,
            top1_1 * 100.0
        );
        let tcp = tandem_collective::TcpCommunicator::local_group(2, &Default::default())?;
        let comms = tcp
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn tandem_collective::Communicator>)
            .collect();
        let (l2, step2) = group_logits(&args, device, comms, &ids)?;
        let (max2, _, top1_2) = compare(&l2, &plain_logits);
        eprintln!(
            "TP=2 over TCP on {device}: max |diff| {max2:.5} vs TP=1, top-1 {:.1}%, decode step \
             {:.2} ms vs {:.2} ms",
            top1_2 * 100.0,
            step2 * 1e3,
            plain_step * 1e3
        );
        report.insert(
            "tensor_parallel".into(),
            json!({"tp1_backend": world1.1, "tp1_max_abs_diff": max1, "tp1_top1": top1_1,
                   "tp2_tcp_max_abs_diff": max2, "tp2_tcp_top1": top1_2,
                   "tp2_step_ms": step2 * 1e3, "tp1_step_ms": plain_step * 1e3}),
        );
    }

    let line = serde_json::Value::Object(report).to_string();
    println!("{line}");
    if let Some(out) = &args.out {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .with_context(|| format!("opening {}", out.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// A one-rank group: NCCL on a GPU (the real NCCL path, world size 1), the no-op otherwise.
fn world1_comm(
    device: DeviceKind,
) -> anyhow::Result<(Arc<dyn tandem_collective::Communicator>, &'static str)> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        let dev = device.open()?;
        let id = tandem_collective::new_unique_id()?;
        let nccl =
            tandem_collective::NcclCommunicator::new(0, 1, &id, &dev, Duration::from_secs(60))?;
        return Ok((Arc::new(nccl), "NCCL (world size 1)"));
    }
    let _ = device;
    Ok((
        Arc::new(tandem_collective::LocalCommunicator),
        "the local (no-op) communicator",
    ))
}

/// `tandem make-model`: a random-weight model of a real shape, for machines the real weights
/// cannot reach (scripts/gpu-check).
#[derive(Debug, clap::Args)]
pub struct MakeModelArgs {
    /// qwen2.5-1.5b or qwen2.5-0.5b.
    #[arg(long)]
    pub shape: String,
    /// Stored dtype of the weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// The folder to write (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn make_model(args: MakeModelArgs) -> anyhow::Result<()> {
    let cfg = match args.shape.as_str() {
        "qwen2.5-1.5b" => tandem_testkit::TinyConfig::qwen2_5_1_5b(),
        "qwen2.5-0.5b" => tandem_testkit::TinyConfig::qwen2_5_0_5b(),
        "tiny" => tandem_testkit::TinyConfig::qwen2(),
        other => anyhow::bail!("--shape {other}: use qwen2.5-1.5b, qwen2.5-0.5b or tiny"),
    };
    let dtype = match args.dtype.as_str() {
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        "f32" => candle_core::DType::F32,
        other => anyhow::bail!("--dtype {other}: use bf16, f16 or f32"),
    };
    let t = Instant::now();
    tandem_testkit::write_model(&cfg, &args.out, dtype)?;
    eprintln!(
        "make-model: {} ({}) written to {} in {:.1} s",
        args.shape,
        args.dtype,
        args.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
