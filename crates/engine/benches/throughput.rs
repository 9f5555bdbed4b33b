//! Engine throughput on a real model: prefill tokens/s, single-sequence decode tokens/s and
//! aggregate decode tokens/s at several concurrencies, through the real scheduler (sampling,
//! detokenization and all). Prints a Markdown table for docs/benchmarks.md.
//!
//!   cargo bench -p tandem-engine --bench throughput -- --model PATH [--dequantized | --keep-dense]
//!       [--concurrency 1,4,16,32] [--new-tokens 64] [--prompt-tokens 256]
//!
//! Threads: candle uses every core it sees (2 on the reference machine); set RAYON_NUM_THREADS
//! to pin it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_engine::{Engine, EngineConfig, Event, Request, SamplingParams, StopCriteria};
use tandem_model::{BatchMatmul, LoadOptions, Model, QuantMode, SeqInput};

struct Args {
    model: PathBuf,
    quant: QuantMode,
    keep_dense: bool,
    dense_from_rows: Option<usize>,
    concurrency: Vec<usize>,
    new_tokens: usize,
    prompt_tokens: usize,
    device: tandem_model::DeviceKind,
}

fn args() -> Args {
    let mut a = Args {
        model: PathBuf::new(),
        quant: QuantMode::Quantized,
        keep_dense: false,
        dense_from_rows: None,
        concurrency: vec![1, 4, 16, 32],
        new_tokens: 64,
        prompt_tokens: 256,
        device: tandem_model::DeviceKind::Cpu,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--model" => a.model = it.next().unwrap().into(),
            "--dequantized" => a.quant = QuantMode::Dequantized,
            "--keep-dense" => a.keep_dense = true,
            "--dense-from-rows" => a.dense_from_rows = Some(it.next().unwrap().parse().unwrap()),
            "--concurrency" => {
                a.concurrency = it
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|s| s.parse().unwrap())
                    .collect()
            }
            "--new-tokens" => a.new_tokens = it.next().unwrap().parse().unwrap(),
            "--prompt-tokens" => a.prompt_tokens = it.next().unwrap().parse().unwrap(),
            "--device" => a.device = it.next().unwrap().parse().unwrap(),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(!a.model.as_os_str().is_empty(), "--model PATH is required");
    a
}

fn prompt(model: &Model, n: usize, salt: usize) -> Vec<u32> {
    let text = format!(
        "Request {salt}. The quick brown fox jumps over the lazy dog while the engineers measure \
         how fast the inference engine decodes tokens on two CPU cores. "
    );
    let ids = model.text.encode(&text, false).unwrap();
    ids.iter().copied().cycle().take(n).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = args();
    let t0 = Instant::now();
    let model = Model::load(
        &a.model,
        &LoadOptions {
            quant: a.quant,
            max_context: Some(4096),
            batch_matmul: BatchMatmul {
                keep_dense_copy: a.keep_dense,
                dense_from_rows: a
                    .dense_from_rows
                    .unwrap_or(BatchMatmul::default().dense_from_rows),
            },
            device: a.device,
            ..Default::default()
        },
    )
    .unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let name = a.model.file_name().unwrap().to_string_lossy().to_string();
    let mode = match (a.quant, a.keep_dense) {
        (QuantMode::Quantized, false) => "quantized",
        (QuantMode::Quantized, true) => "quantized + f32 copy for batches",
        (QuantMode::Dequantized, _) => "f32",
    };
    eprintln!("loaded {name} ({mode}) in {load_s:.1} s");

    // Prefill: one forward over the whole prompt, fresh slot each time (after a warm-up that
    // also triggers candle's lazy weight repacking).
    let t = &model.transformer;
    let p = prompt(&model, a.prompt_tokens, 0);
    let mut times = Vec::new();
    for i in 0..4 {
        let mut kv = t.new_cache();
        let slot = kv.allocate();
        let s = Instant::now();
        t.forward(
            &mut kv,
            &[SeqInput {
                slot,
                tokens: &p,
                all_logits: false,
            }],
        )
        .unwrap();
        if i > 0 {
            times.push(s.elapsed().as_secs_f64());
        }
    }
    let prefill_tps = a.prompt_tokens as f64 / median(times);

    let engine = Engine::start(
        model,
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            ..Default::default()
        },
    );
    let mut rows = vec![format!(
        "| {name} | {mode} | prefill ({} tokens) | 1 | {prefill_tps:.1} |",
        a.prompt_tokens
    )];
    for &n in &a.concurrency {
        let tps = decode(&engine, n, a.new_tokens);
        rows.push(format!(
            "| {name} | {mode} | decode, {n} concurrent | {n} | {tps:.1} |"
        ));
        eprintln!("{}", rows.last().unwrap());
    }
    println!("| model | weights | phase | sequences | tokens/s |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

/// Aggregate decode tokens/s with `n` sequences running: counted from the moment every sequence
/// has its first token (prefill done) to the moment the first one finishes, so the batch is full
/// the whole time measured.
fn decode(engine: &Engine, n: usize, new_tokens: usize) -> f64 {
    let text = engine.text().clone();
    let mut gens: Vec<_> = (0..n)
        .map(|i| {
            let p = text
                .encode(
                    &format!("Sequence {i}: write a long story about a robot."),
                    false,
                )
                .unwrap();
            engine
                .submit(Request {
                    prompt: p,
                    sampling: SamplingParams::default(),
                    stop: StopCriteria {
                        max_new_tokens: new_tokens + 1,
                        ..Default::default()
                    },
                    ignore_eos: true,
                    speculation: Default::default(),
                })
                .unwrap()
        })
        .collect();
    // First token of every sequence.
    for g in gens.iter_mut() {
        match g.events.blocking_recv() {
            Some(Event::Token(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let start = Instant::now();
    let mut counted = 0usize;
    // Round-robin over the streams: each step yields one token per sequence.
    let elapsed: Duration = 'outer: loop {
        for g in gens.iter_mut() {
            match g.events.blocking_recv() {
                Some(Event::Token(_)) => counted += 1,
                _ => break 'outer start.elapsed(),
            }
        }
        if counted >= n * new_tokens {
            break start.elapsed();
        }
    };
    drop(gens);
    counted as f64 / elapsed.as_secs_f64()
}
