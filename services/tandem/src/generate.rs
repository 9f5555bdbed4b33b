//! `tandem generate`: streams one completion from a router to stdout as it arrives.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, ChatMessage, ChatMessages, FinishReason, GenerateRequest, SamplingParameters,
    StoppingCriteria,
};

use crate::config::Dur;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The router's address.
    #[arg(long, env = "TANDEM_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Model name [default: the router's default model].
    #[arg(long, default_value = "")]
    pub model: String,
    /// Send the prompt as a user chat message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message to put before the prompt (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: i32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop at this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Give up after this long (e.g. 30s).
    #[arg(long)]
    pub timeout: Option<Dur>,
    /// Print token counts and timings to stderr at the end.
    #[arg(long, short)]
    pub verbose: bool,
    /// The prompt; `-` reads it from stdin.
    pub prompt: String,
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let prompt = if args.prompt == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        s
    } else {
        args.prompt.clone()
    };
    let input = if args.chat || args.system.is_some() {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt,
        });
        generate_request::Input::Chat(ChatMessages { messages })
    } else {
        generate_request::Input::Text(prompt)
    };
    let req = GenerateRequest {
        model: args.model.clone(),
        input: Some(input),
        sampling: Some(SamplingParameters {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..Default::default()
        }),
        stopping: Some(StoppingCriteria {
            max_new_tokens: args.max_new_tokens,
            stop: args.stop.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut client = GenerationClient::connect(args.addr.clone())
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut request = tonic::Request::new(req);
    if let Some(t) = args.timeout {
        request.set_timeout(t.0);
    }
    let started = Instant::now();
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut first: Option<Duration> = None;
    let mut tokens = 0usize;
    let mut finish = FinishReason::Unspecified;
    let mut usage = None;
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        if first.is_none() && !chunk.token_ids.is_empty() {
            first = Some(started.elapsed());
        }
        tokens += chunk.token_ids.len();
        stdout.write_all(chunk.text.as_bytes())?;
        stdout.flush()?;
        if chunk.finish_reason != 0 {
            finish = FinishReason::try_from(chunk.finish_reason).unwrap_or_default();
            usage = chunk.usage;
        }
    }
    writeln!(stdout)?;
    if args.verbose {
        let total = started.elapsed();
        let ttft = first.unwrap_or(total);
        let decode = total.saturating_sub(ttft).as_secs_f64();
        let rate = if tokens > 1 && decode > 0.0 {
            (tokens - 1) as f64 / decode
        } else {
            0.0
        };
        eprintln!(
            "[{tokens} tokens, prompt {} tokens, finish {}, first token {:.0} ms, {rate:.1} tok/s]",
            usage.map_or(0, |u| u.prompt_tokens),
            finish.as_str_name(),
            ttft.as_secs_f64() * 1000.0,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
