//! `tandem bench router-overhead`: what the router adds to latency. It starts one worker and one
//! router (child processes), then sends the same greedy request straight to the worker (Shard
//! API) and through the router (public API), alternating which goes first, one at a time, and
//! reports time to first token and per-token latency of both with their difference.
//!
//! `tandem bench routing`: routing policies compared on one set of groups (see `routing.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_proto::shard::v1 as shard;
use tandem_proto::shard::v1::shard_client::ShardClient;
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, tokenize_request, GenerateRequest, SamplingParameters, StoppingCriteria,
    TokenIds, TokenizeRequest,
};
use tonic::transport::Channel;

use crate::children::{self, Children};
use crate::config::Quant;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Latency through the router vs straight to the worker, same run, interleaved.
    RouterOverhead(OverheadArgs),
    /// Decode speed with and without speculative decoding (draft model service, n-gram), same
    /// prompts, same run.
    Speculation(crate::bench_spec::SpecArgs),
    /// Routing policies on prompts that share prefixes: throughput and time to first token.
    Routing(crate::bench_routing::RoutingArgs),
    /// The model on one device: logits against a reference device, prefill and decode speed,
    /// verification cost, tensor parallelism on the device (scripts/gpu-check).
    Device(crate::bench_device::DeviceArgs),
    /// What TLS, mTLS and API keys add to latency through the router, same run.
    Security(crate::bench_security::SecurityArgs),
}

#[derive(Debug, clap::Args)]
pub struct OverheadArgs {
    /// Model: a .gguf file or a Hugging Face folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Measured requests per path.
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// Unmeasured requests per path first (connection setup, lazy weight repacking).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Tokens generated per request (EOS ignored, so every request makes exactly this many).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    pub prompt: String,
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    /// How long to wait for the worker to load the model.
    #[arg(long, default_value = "10m")]
    pub ready_timeout: crate::config::Dur,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Bench::RouterOverhead(a) => router_overhead(a).await,
        Bench::Speculation(a) => crate::bench_spec::run(a).await,
        Bench::Routing(a) => crate::bench_routing::run(a).await,
        Bench::Security(a) => crate::bench_security::run(a).await,
        Bench::Device(_) => anyhow::bail!("bench device runs outside the async runtime (main.rs)"),
    }
}

/// One request's latencies.
pub(crate) struct Sample {
    pub ttft: Duration,
    /// Time per token after the first, one entry per token.
    pub per_token: Vec<Duration>,
}

async fn router_overhead(args: OverheadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(
        args.model.exists(),
        "{} does not exist",
        args.model.display()
    );
    let mut children = Children::default();
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the children's logs from burying the results.
        children.env("RUST_LOG", "warn");
    }
    let result = async {
        let worker_addr = children::free_port()?;
        let router_addr = children::free_port()?;
        let mut w = vec![
            "worker".to_owned(),
            "--model".to_owned(),
            args.model.display().to_string(),
            "--listen".to_owned(),
            worker_addr.to_string(),
        ];
        if let Some(q) = args.quant {
            w.push("--quant".to_owned());
            w.push(
                match q {
                    Quant::Quantized => "quantized",
                    Quant::Dequantized => "dequantized",
                }
                .to_owned(),
            );
        }
        children.spawn("worker", &w)?;
        children.spawn(
            "router",
            &[
                "router".to_owned(),
                "--listen".to_owned(),
                router_addr.to_string(),
                "--workers".to_owned(),
                format!("http://{worker_addr}"),
            ],
        )?;
        eprintln!("bench: loading {} ...", args.model.display());
        children::wait_serving(&mut children, router_addr, args.ready_timeout.0).await?;
        let mut router = GenerationClient::connect(format!("http://{router_addr}")).await?;
        let mut worker = ShardClient::connect(format!("http://{worker_addr}")).await?;
        let prompt = router
            .tokenize(TokenizeRequest {
                model: String::new(),
                input: Some(tokenize_request::Input::Text(args.prompt.clone())),
            })
            .await
            .context("tokenizing the prompt through the router")?
            .into_inner()
            .token_ids;
        eprintln!(
            "bench: {} + {} requests per path, prompt {} tokens, {} new tokens each",
            args.warmup,
            args.requests,
            prompt.len(),
            args.max_new_tokens
        );
        let mut direct = Vec::new();
        let mut routed = Vec::new();
        for i in 0..args.warmup + args.requests {
            // Alternate the order so neither path always runs on a cooler (or warmer) machine.
            let (d, r) = if i % 2 == 0 {
                let d = via_worker(&mut worker, &prompt, args.max_new_tokens).await?;
                let r = via_router(&mut router, &prompt, args.max_new_tokens, None).await?;
                (d, r)
            } else {
                let r = via_router(&mut router, &prompt, args.max_new_tokens, None).await?;
                let d = via_worker(&mut worker, &prompt, args.max_new_tokens).await?;
                (d, r)
            };
            if i >= args.warmup {
                direct.push(d);
                routed.push(r);
            }
        }
        report(&args, prompt.len(), &direct, &routed);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    children.stop(Duration::from_secs(10)).await;
    result
}

fn sampling() -> SamplingParameters {
    SamplingParameters {
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn stopping(max_new_tokens: u32) -> StoppingCriteria {
    StoppingCriteria {
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Records arrival times of token chunks.
struct Clock {
    start: Instant,
    first: Option<Duration>,
    last: Instant,
    per_token: Vec<Duration>,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            first: None,
            last: now,
            per_token: Vec::new(),
        }
    }

    fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some(now - self.start);
        } else {
            let per = (now - self.last) / n as u32;
            self.per_token.extend(std::iter::repeat_n(per, n));
        }
        self.last = now;
    }

    fn sample(self) -> anyhow::Result<Sample> {
        Ok(Sample {
            ttft: self.first.context("the stream ended without a token")?,
            per_token: self.per_token,
        })
    }
}

async fn via_worker(
    worker: &mut ShardClient<Channel>,
    prompt: &[u32],
    max_new_tokens: u32,
) -> anyhow::Result<Sample> {
    let mut clock = Clock::new();
    let mut stream = worker
        .generate(shard::GenerateRequest {
            request_id: String::new(),
            prompt: prompt.to_vec(),
            sampling: Some(sampling()),
            stopping: Some(stopping(max_new_tokens)),
            speculation: None,
        })
        .await
        .context("worker Generate")?
        .into_inner();
    while let Some(m) = stream.message().await.context("worker stream")? {
        clock.tokens(m.tokens.len());
    }
    clock.sample()
}

/// One greedy request through a router, with `api_key` as `authorization: Bearer` if given.
pub(crate) async fn via_router(
    router: &mut GenerationClient<Channel>,
    prompt: &[u32],
    max_new_tokens: u32,
    api_key: Option<&str>,
) -> anyhow::Result<Sample> {
    let mut req = tonic::Request::new(GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(sampling()),
        stopping: Some(stopping(max_new_tokens)),
        ..Default::default()
    });
    if let Some(k) = api_key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse()?);
    }
    let mut clock = Clock::new();
    let mut stream = router
        .generate_stream(req)
        .await
        .context("router GenerateStream")?
        .into_inner();
    while let Some(m) = stream.message().await.context("router stream")? {
        clock.tokens(m.token_ids.len());
    }
    clock.sample()
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(args: &OverheadArgs, prompt_len: usize, direct: &[Sample], routed: &[Sample]) {
    let sorted = |v: Vec<Duration>| {
        let mut v = v;
        v.sort();
        v
    };
    let ttft_d = sorted(direct.iter().map(|s| s.ttft).collect());
    let ttft_r = sorted(routed.iter().map(|s| s.ttft).collect());
    let tok_d = sorted(direct.iter().flat_map(|s| s.per_token.clone()).collect());
    let tok_r = sorted(routed.iter().flat_map(|s| s.per_token.clone()).collect());
    // Paired per request (same iteration, back to back): less noise than comparing quantiles.
    let mut paired: Vec<f64> = direct
        .iter()
        .zip(routed)
        .map(|(d, r)| ms(r.ttft) - ms(d.ttft))
        .collect();
    paired.sort_by(f64::total_cmp);
    let paired_median = paired.get(paired.len() / 2).copied().unwrap_or(0.0);

    println!(
        "router overhead: {} ({} requests per path, prompt {prompt_len} tokens, {} new tokens, greedy, one at a time, interleaved)",
        args.model.display(),
        direct.len(),
        args.max_new_tokens
    );
    println!("{:<28}{:>12}{:>12}", "", "p50 (ms)", "p99 (ms)");
    let row = |name: &str, a: &[Duration]| {
        println!(
            "{name:<28}{:>12.2}{:>12.2}",
            ms(percentile(a, 0.5)),
            ms(percentile(a, 0.99))
        );
    };
    let diff = |name: &str, d: &[Duration], r: &[Duration]| {
        println!(
            "{name:<28}{:>+12.2}{:>+12.2}",
            ms(percentile(r, 0.5)) - ms(percentile(d, 0.5)),
            ms(percentile(r, 0.99)) - ms(percentile(d, 0.99))
        );
    };
    row("first token, direct", &ttft_d);
    row("first token, via router", &ttft_r);
    diff("first token, difference", &ttft_d, &ttft_r);
    row("per token, direct", &tok_d);
    row("per token, via router", &tok_r);
    diff("per token, difference", &tok_d, &tok_r);
    println!("median paired first-token difference: {paired_median:+.2} ms");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
