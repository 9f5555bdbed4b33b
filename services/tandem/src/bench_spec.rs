//! `tandem bench speculation`: the target model decoding one sequence at a time, plainly and
//! with each drafter, on the same prompts in the same run (modes interleaved per prompt so
//! machine noise spreads evenly). The target runs in this process; the draft model runs as its
//! own service (`tandem draft`, a child process) and is called over gRPC, as in a cluster.
//!
//! Reports decode tokens/s and the ratio to plain decoding, acceptance per draft position, the
//! cost model's estimates (α, k, draft cost c, verification cost of k+1 tokens) and the speedup
//! it predicted beside the one measured, and whether greedy output stayed identical.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_engine::speculate::MAX_DRAFT_TOKENS;
use tandem_engine::{
    Engine, EngineConfig, EngineParts, EngineStats, Event, Request, SamplingParams, SpecMode,
    Speculation, StopCriteria,
};
use tandem_model::{ChatMessage, LoadOptions, Model};
use tandem_worker::{DraftClientConfig, DraftClientStats, RemoteDrafter};

use crate::children::{self, Children};
use crate::config::{model_cache, DeviceArg, Quant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No speculation.
    Plain,
    /// The draft model service, draft lengths from the cost model.
    Draft,
    /// The draft model service, always --fixed-k tokens (as fixed-k implementations do).
    DraftFixed,
    /// Prompt lookup, draft lengths from the cost model.
    Ngram,
    /// Prompt lookup, always --fixed-k tokens.
    NgramFixed,
    /// Prompt lookup with --candidates candidate drafts per step (multi-candidate drafting),
    /// draft lengths from the cost model.
    NgramMulti,
    /// The draft model service with --candidates candidate drafts per step, fixed k.
    DraftMulti,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Draft => "draft model, adaptive k",
            Mode::DraftFixed => "draft model, fixed k",
            Mode::Ngram => "n-gram, adaptive k",
            Mode::NgramFixed => "n-gram, fixed k",
            Mode::NgramMulti => "n-gram, multi-candidate",
            Mode::DraftMulti => "draft model, multi-candidate, fixed k",
        }
    }

    fn adaptive(self) -> bool {
        matches!(self, Mode::Draft | Mode::Ngram | Mode::NgramMulti)
    }

    fn uses_draft_model(self) -> bool {
        matches!(self, Mode::Draft | Mode::DraftFixed | Mode::DraftMulti)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Write new code from a description.
    Code,
    /// Rewrite code given in the prompt (rename, type hints, translate comments): output copies
    /// much of the input.
    Editing,
}

#[derive(Debug, clap::Args)]
pub struct SpecArgs {
    /// Target model [default: Qwen2.5-Coder-1.5B-Instruct GGUF in the model cache].
    #[arg(long)]
    pub target: Option<PathBuf>,
    /// Draft model, run as a `tandem draft` service [default: Qwen2.5-Coder-0.5B-Instruct GGUF
    /// in the model cache].
    #[arg(long)]
    pub draft: Option<PathBuf>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,draft,draft-fixed,ngram"
    )]
    pub modes: Vec<Mode>,
    #[arg(long, value_enum, default_value = "code")]
    pub workload: Workload,
    /// Tokens to generate per prompt (fewer if the model ends its answer).
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Most drafted tokens per step for the adaptive modes.
    #[arg(long, default_value_t = 8)]
    pub max_k: usize,
    /// Drafted tokens per step for the fixed modes.
    #[arg(long, default_value_t = 4)]
    pub fixed_k: usize,
    /// Candidate drafts per step for `ngram-multi`.
    #[arg(long, default_value_t = 3)]
    pub candidates: usize,
    /// Prompts of the workload to run (1-3).
    #[arg(long, default_value_t = 3)]
    pub prompts: usize,
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    /// Where the target and the draft service run: cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    pub device: Option<DeviceArg>,
}

const CODE_PROMPTS: [&str; 3] = [
    "Write a Python function that checks whether a number is prime, with a docstring and tests.",
    "Write a Rust function that parses one CSV line into fields, handling quoted fields with \
     commas inside, with unit tests.",
    "Write a JavaScript function that debounces another function, with JSDoc comments and a \
     usage example.",
];

const EDIT_CODE: &str = r#"def summarize(records, key, limit):
    # Group the records by the given key and count them
    counts = {}
    for rec in records:
        k = rec.get(key)
        if k is None:
            # Skip records without the key
            continue
        counts[k] = counts.get(k, 0) + 1
    # Sort by count, largest first, then by name
    items = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    # Keep only the first entries
    result = []
    for name, n in items[:limit]:
        result.append({"name": name, "count": n})
    return result


def load(path):
    # Read one JSON record per line, ignoring empty lines
    import json
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            out.append(json.loads(line))
    return out
"#;

fn edit_prompts() -> [String; 3] {
    [
        format!(
            "Rename the variable `counts` to `tally` and `rec` to `record` in this code. Output \
             the whole code, changed, and nothing else.\n\n```python\n{EDIT_CODE}```"
        ),
        format!(
            "Add Python type hints to every function of this code. Output the whole code, \
             changed, and nothing else.\n\n```python\n{EDIT_CODE}```"
        ),
        format!(
            "Translate the comments of this code into French. Output the whole code, changed, \
             and nothing else.\n\n```python\n{EDIT_CODE}```"
        ),
    ]
}

/// One generation's outcome.
struct Run {
    tokens: Vec<u32>,
    /// From the first token to the last.
    decode: Duration,
}

/// Counters of one engine, to diff before and after a run.
#[derive(Debug, Clone, Default)]
struct Counters {
    drafts: u64,
    drafted: u64,
    accepted: u64,
    drafted_at: Vec<u64>,
    accepted_at: Vec<u64>,
    predicted_sum: u64,
    planned: u64,
    skipped: u64,
    alternative_wins: u64,
}

impl Counters {
    fn read(s: &EngineStats) -> Self {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Self {
            drafts: r(&s.drafts),
            drafted: r(&s.draft_tokens),
            accepted: r(&s.accepted_draft_tokens),
            drafted_at: s.drafted_at.iter().map(r).collect(),
            accepted_at: s.accepted_at.iter().map(r).collect(),
            predicted_sum: r(&s.spec_predicted_sum_milli),
            planned: r(&s.spec_planned_steps),
            skipped: r(&s.spec_skipped_steps),
            alternative_wins: r(&s.alternative_wins),
        }
    }

    fn minus(&self, o: &Self) -> Self {
        let v = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| x - y).collect();
        Self {
            drafts: self.drafts - o.drafts,
            drafted: self.drafted - o.drafted,
            accepted: self.accepted - o.accepted,
            drafted_at: v(&self.drafted_at, &o.drafted_at),
            accepted_at: v(&self.accepted_at, &o.accepted_at),
            predicted_sum: self.predicted_sum - o.predicted_sum,
            planned: self.planned - o.planned,
            skipped: self.skipped - o.skipped,
            alternative_wins: self.alternative_wins - o.alternative_wins,
        }
    }

    fn add(&mut self, o: &Self) {
        if self.drafted_at.is_empty() {
            self.drafted_at = vec![0; o.drafted_at.len()];
            self.accepted_at = vec![0; o.accepted_at.len()];
        }
        self.drafts += o.drafts;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.alternative_wins += o.alternative_wins;
        for (a, b) in self.drafted_at.iter_mut().zip(&o.drafted_at) {
            *a += b;
        }
        for (a, b) in self.accepted_at.iter_mut().zip(&o.accepted_at) {
            *a += b;
        }
        self.predicted_sum += o.predicted_sum;
        self.planned += o.planned;
        self.skipped += o.skipped;
    }
}

/// Per mode: total tokens and decode time, counters, and per prompt the tokens (for equality).
#[derive(Default)]
struct Totals {
    tokens: usize,
    decode: Duration,
    counters: Counters,
    outputs: Vec<Vec<u32>>,
}

pub async fn run(args: SpecArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=3).contains(&args.prompts),
        "--prompts must be 1, 2 or 3"
    );
    anyhow::ensure!(
        (1..=MAX_DRAFT_TOKENS).contains(&args.max_k)
            && (1..=MAX_DRAFT_TOKENS).contains(&args.fixed_k),
        "--max-k and --fixed-k must be in 1..={MAX_DRAFT_TOKENS}"
    );
    let target = args
        .target
        .clone()
        .unwrap_or_else(|| model_cache().join(crate::up::DEFAULT_MODEL_FILE));
    let draft = args
        .draft
        .clone()
        .unwrap_or_else(|| model_cache().join(crate::up::DEFAULT_DRAFT_FILE));
    anyhow::ensure!(
        target.exists(),
        "target {} does not exist (scripts/fetch-models qwen-1.5b)",
        target.display()
    );
    let needs_draft = args.modes.iter().any(|m| m.uses_draft_model());
    if needs_draft {
        anyhow::ensure!(
            draft.exists(),
            "draft {} does not exist (scripts/fetch-models qwen-0.5b)",
            draft.display()
        );
    }
    let mut children = Children::default();
    if std::env::var_os("RUST_LOG").is_none() {
        children.env("RUST_LOG", "warn");
    }
    let result = async {
        let draft_url = if needs_draft {
            let addr = children::free_port()?;
            let mut a = vec![
                "draft".to_owned(),
                "--model".to_owned(),
                draft.display().to_string(),
                "--listen".to_owned(),
                addr.to_string(),
            ];
            if let Some(d) = args.device {
                a.extend(["--device".to_owned(), d.to_string()]);
            }
            children.spawn("draft", &a)?;
            eprintln!(
                "bench: starting the draft service ({}) ...",
                draft.display()
            );
            children::wait_serving(&mut children, addr, Duration::from_secs(600)).await?;
            Some(format!("http://{addr}"))
        } else {
            None
        };
        measure(&args, &target, draft_url).await
    }
    .await;
    children.stop(Duration::from_secs(10)).await;
    result
}

async fn measure(
    args: &SpecArgs,
    target: &std::path::Path,
    draft_url: Option<String>,
) -> anyhow::Result<()> {
    let opts = LoadOptions {
        quant: args.quant.map(Into::into).unwrap_or_default(),
        device: args.device.map(|d| d.0).unwrap_or_default(),
        ..Default::default()
    };
    // Two engines: adaptive draft lengths and fixed ones (an engine-wide setting); each pairs
    // its own client with the one draft service.
    let mut engines = Vec::new();
    let mut draft_stats = Vec::new();
    for adaptive in [true, false] {
        eprintln!(
            "bench: loading {} ({}) ...",
            target.display(),
            if adaptive { "adaptive" } else { "fixed" }
        );
        let t = target.to_owned();
        let o = opts.clone();
        let model = tokio::task::spawn_blocking(move || Model::load(&t, &o))
            .await?
            .with_context(|| format!("loading {}", target.display()))?;
        let mut parts = EngineParts::default();
        if let Some(url) = &draft_url {
            let stats = Arc::new(DraftClientStats::default());
            let mut cfg = DraftClientConfig::new(url.clone());
            cfg.timeout = Duration::from_secs(5);
            let hash = model.text.vocab_hash();
            let s = stats.clone();
            let drafter = tokio::task::spawn_blocking(move || {
                let mut d = RemoteDrafter::new(cfg, hash, s)?;
                anyhow::ensure!(d.pair_now()?, "the draft service did not answer Info");
                Ok::<_, anyhow::Error>(d)
            })
            .await??;
            parts.draft_model = Some(Box::new(drafter));
            draft_stats.push(stats);
        }
        let cfg = EngineConfig {
            max_draft_tokens: if adaptive { args.max_k } else { args.fixed_k },
            adaptive_draft: adaptive,
            ..Default::default()
        };
        engines.push(Engine::start_with(model, cfg, parts));
    }
    let text = engines[0].text().clone();
    let prompts: Vec<String> = match args.workload {
        Workload::Code => CODE_PROMPTS.iter().map(|s| s.to_string()).collect(),
        Workload::Editing => edit_prompts().to_vec(),
    };
    let prompts: Vec<Vec<u32>> = prompts[..args.prompts]
        .iter()
        .map(|p| {
            let chat = text.apply_chat_template(&[ChatMessage {
                role: "user".into(),
                content: p.clone(),
            }])?;
            Ok(text.encode(&chat, false)?)
        })
        .collect::<anyhow::Result<_>>()?;
    // Warm-up: one short generation per engine and mode kind (lazy weight repacking, the
    // draft's first calls, the cost model's first measurements).
    eprintln!("bench: warming up ...");
    for &mode in &args.modes {
        let e = &engines[usize::from(!mode.adaptive() && mode != Mode::Plain)];
        generate(e, &prompts[0], 24, mode, args.candidates).await?;
    }
    let mut totals: Vec<Totals> = args.modes.iter().map(|_| Totals::default()).collect();
    for (pi, prompt) in prompts.iter().enumerate() {
        for (mi, &mode) in args.modes.iter().enumerate() {
            let e = &engines[usize::from(!mode.adaptive() && mode != Mode::Plain)];
            let before = Counters::read(e.stats());
            let run = generate(e, prompt, args.new_tokens, mode, args.candidates).await?;
            let c = Counters::read(e.stats()).minus(&before);
            let tps =
                run.tokens.len().saturating_sub(1) as f64 / run.decode.as_secs_f64().max(1e-9);
            eprintln!(
                "bench: prompt {} {:<26} {:>4} tokens {:>7.2} tok/s  drafted {:>4} accepted {:>4}",
                pi + 1,
                mode.name(),
                run.tokens.len(),
                tps,
                c.drafted,
                c.accepted
            );
            let t = &mut totals[mi];
            t.tokens += run.tokens.len().saturating_sub(1);
            t.decode += run.decode;
            t.counters.add(&c);
            t.outputs.push(run.tokens);
        }
    }
    report(args, target, &engines, &totals, &prompts);
    if let Err(e) = report_margins(args, target, &opts, &totals, &prompts) {
        println!("(margins at divergences not computed: {e:#})");
    }
    for s in draft_stats {
        let f = s.failures.load(Ordering::Relaxed);
        if f > 0 {
            println!("draft call failures: {f} (those steps decoded without drafts)");
        }
    }
    Ok(())
}

/// Where a mode's greedy output left plain greedy's: the target's logits at that position
/// computed the two ways the runs computed them, from one shared prefix: one token at a time
/// (plain decoding) and the last few tokens in one batched forward (verification). Reports the
/// single-token top-two margin, whether the batched forward's argmax differs, and the largest
/// logit difference between the two paths: a different argmax there means the quantized
/// kernels (single row vs several rows) disagree, not that speculation chose wrongly.
fn report_margins(
    args: &SpecArgs,
    target: &std::path::Path,
    opts: &LoadOptions,
    totals: &[Totals],
    prompts: &[Vec<u32>],
) -> anyhow::Result<()> {
    let Some(plain) = args.modes.iter().position(|&m| m == Mode::Plain) else {
        return Ok(());
    };
    let mut found = Vec::new();
    for (m, t) in args.modes.iter().zip(totals) {
        if *m == Mode::Plain {
            continue;
        }
        for (pi, (a, b)) in totals[plain].outputs.iter().zip(&t.outputs).enumerate() {
            if let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) {
                found.push((m.name(), pi, at));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let model = Model::load(target, opts)?;
    let tf = &model.transformer;
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    };
    let margin = |v: &[f32]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        s.first().zip(s.get(1)).map_or(f32::NAN, |(a, b)| a - b)
    };
    println!("\nDivergences from plain greedy, with the target's logits there computed one token at a time and batched (last 5 tokens in one forward), from the same prefix:\n");
    for (name, pi, at) in found {
        let mut ctx = prompts[pi].clone();
        ctx.extend_from_slice(&totals[plain].outputs[pi][..at]);
        let w = 5.min(ctx.len() - 1);
        let (prefix, tail) = ctx.split_at(ctx.len() - w);
        let mut kv = tf.new_cache();
        let single = kv.allocate();
        let batched = kv.allocate();
        for slot in [single, batched] {
            for chunk in prefix.chunks(256) {
                tf.forward(
                    &mut kv,
                    &[tandem_model::SeqInput {
                        slot,
                        tokens: chunk,
                        all_logits: false,
                    }],
                )?;
            }
        }
        let mut one = Vec::new();
        for t in tail {
            one = tf
                .forward(
                    &mut kv,
                    &[tandem_model::SeqInput {
                        slot: single,
                        tokens: std::slice::from_ref(t),
                        all_logits: false,
                    }],
                )?
                .to_vecs()?
                .into_iter()
                .next()
                .and_then(|r| r.into_iter().last())
                .unwrap_or_default();
        }
        let many = tf
            .forward(
                &mut kv,
                &[tandem_model::SeqInput {
                    slot: batched,
                    tokens: tail,
                    all_logits: true,
                }],
            )?
            .to_vecs()?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().last())
            .unwrap_or_default();
        let diff = one
            .iter()
            .zip(&many)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "- {name}, prompt {}: token {at}: single-token top-two margin {:.4}; batched argmax {} the single-token one; largest logit difference between the paths {diff:.4}",
            pi + 1,
            margin(&one),
            if argmax(&one) == argmax(&many) { "equals" } else { "differs from" },
        );
    }
    Ok(())
}

async fn generate(
    e: &Engine,
    prompt: &[u32],
    n: usize,
    mode: Mode,
    candidates: usize,
) -> anyhow::Result<Run> {
    let spec = match mode {
        Mode::Plain => SpecMode::Off,
        Mode::Draft | Mode::DraftFixed | Mode::DraftMulti => SpecMode::DraftModel,
        Mode::Ngram | Mode::NgramFixed | Mode::NgramMulti => SpecMode::Ngram,
    };
    let mut g = e.submit(Request {
        prompt: prompt.to_vec(),
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_new_tokens: n,
            ..Default::default()
        },
        ignore_eos: false,
        speculation: Speculation {
            mode: spec,
            max_draft_tokens: 0,
            candidates: if matches!(mode, Mode::NgramMulti | Mode::DraftMulti) {
                candidates
            } else {
                1
            },
        },
    })?;
    let mut tokens = Vec::new();
    let mut first = None;
    loop {
        match g.events.recv().await {
            Some(Event::Token(t)) => {
                first.get_or_insert_with(Instant::now);
                tokens.push(t.token);
            }
            Some(Event::Finished { .. }) => break,
            Some(Event::Error(e)) => anyhow::bail!("generation failed: {e}"),
            None => anyhow::bail!("the engine stopped"),
        }
    }
    Ok(Run {
        tokens,
        decode: first.map_or(Duration::ZERO, |f| f.elapsed()),
    })
}

fn report(
    args: &SpecArgs,
    target: &std::path::Path,
    engines: &[Engine],
    totals: &[Totals],
    prompts: &[Vec<u32>],
) {
    let tps = |t: &Totals| t.tokens as f64 / t.decode.as_secs_f64().max(1e-9);
    let plain = args
        .modes
        .iter()
        .position(|&m| m == Mode::Plain)
        .map(|i| tps(&totals[i]));
    println!(
        "\nspeculation: {} ({:?} workload, {} prompts, up to {} new tokens, greedy, one sequence at a time; modes interleaved per prompt)\n",
        target.display(),
        args.workload,
        prompts.len(),
        args.new_tokens
    );
    println!("| Mode | decode tok/s | vs plain | drafted | accepted | mean k | predicted speedup | greedy output |");
    println!("|---|---|---|---|---|---|---|---|");
    let plain_out = args
        .modes
        .iter()
        .position(|&m| m == Mode::Plain)
        .map(|i| &totals[i].outputs);
    for (m, t) in args.modes.iter().zip(totals) {
        let c = &t.counters;
        let ratio = plain.map_or("-".to_owned(), |p| format!("{:.2}x", tps(t) / p));
        let acc = if c.drafted > 0 {
            format!("{:.0}%", 100.0 * c.accepted as f64 / c.drafted as f64)
        } else {
            "-".to_owned()
        };
        let mean_k = if c.drafts > 0 {
            format!("{:.2}", c.drafted as f64 / c.drafts as f64)
        } else {
            "0".to_owned()
        };
        let predicted = if c.planned > 0 {
            format!("{:.2}x", c.predicted_sum as f64 / 1000.0 / c.planned as f64)
        } else {
            "-".to_owned()
        };
        let same = match plain_out {
            Some(p) if *m != Mode::Plain => {
                let diverged: Vec<String> = p
                    .iter()
                    .zip(&t.outputs)
                    .enumerate()
                    .filter_map(|(i, (a, b))| {
                        let at = a.iter().zip(b).position(|(x, y)| x != y);
                        match at {
                            Some(at) => Some(format!("prompt {} from token {at}", i + 1)),
                            None if a.len() != b.len() => Some(format!("prompt {} length", i + 1)),
                            None => None,
                        }
                    })
                    .collect();
                if diverged.is_empty() {
                    "identical".to_owned()
                } else {
                    format!("differs: {}", diverged.join(", "))
                }
            }
            _ => "-".to_owned(),
        };
        println!(
            "| {} | {:.2} | {ratio} | {} | {} ({acc}) | {mean_k} | {predicted} | {same} |",
            m.name(),
            tps(t),
            c.drafted,
            c.accepted,
        );
    }
    println!("\nAcceptance per draft position (accepted / drafted):\n");
    for (m, t) in args.modes.iter().zip(totals) {
        let c = &t.counters;
        if c.drafted == 0 {
            continue;
        }
        let cells: Vec<String> = c
            .drafted_at
            .iter()
            .zip(&c.accepted_at)
            .take_while(|(d, _)| **d > 0)
            .map(|(d, a)| format!("{:.0}% ({a}/{d})", 100.0 * *a as f64 / *d as f64))
            .collect();
        println!("- {}: {}", m.name(), cells.join(", "));
        if c.alternative_wins > 0 {
            println!(
                "  (an alternative candidate was kept in {} of {} verified drafts)",
                c.alternative_wins, c.drafts
            );
        }
    }
    for (name, e) in [
        ("adaptive engine", &engines[0]),
        ("fixed engine", &engines[1]),
    ] {
        let Ok(s) = e.stats().spec_costs.lock().map(|s| s.clone()) else {
            continue;
        };
        let Some(Some(t1)) = s.forward.first().copied() else {
            continue;
        };
        let fwd: Vec<String> = s
            .forward
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{}: {}",
                    i + 1,
                    v.map_or("-".into(), |v| format!("{:.2}", v / t1))
                )
            })
            .collect();
        println!("\nCost model ({name}): target step with 1 token {:.1} ms; n tokens cost (x one step) {}", t1 * 1e3, fwd.join(", "));
        for (d, label) in s.drafters.iter().zip(["n-gram", "draft model"]) {
            let cells: Vec<String> = d
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| format!("{}: {:.2}", i + 1, v / t1)))
                .collect();
            if !cells.is_empty() {
                println!(
                    "  {label} call drafting k tokens (x one target step): {}",
                    cells.join(", ")
                );
            }
        }
    }
}
