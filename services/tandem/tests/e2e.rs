//! End to end: the real `tandem` binary as router and worker processes on 127.0.0.1, tiny
//! test-kit models in temp folders, and the real SmolLM2 GGUF when it is in the model cache.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_proto::shard::v1::shard_client::ShardClient;
use tandem_proto::shard::v1::{LoadRequest, LoadResponse};
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, speculation, tokenize_request, ChatMessage, ChatMessages, FinishReason,
    GenerateRequest, GenerateResponse, ListModelsRequest, SamplingParameters, Speculation,
    StoppingCriteria, TokenIds, TokenizeRequest,
};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};
use tonic::transport::Channel;
use tonic::Code;

// ---------------------------------------------------------------------------------------------
// Processes

mod common;
use common::{free_addr, metric_sample, scrape_metrics, Proc};

fn worker(
    model: &Path,
    addr: SocketAddr,
    metrics: SocketAddr,
    logs: &Path,
    name: &str,
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "worker".into(),
        "--model".into(),
        model.display().to_string(),
        "--listen".into(),
        addr.to_string(),
        "--metrics-listen".into(),
        metrics.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(name, logs, &args)
}

fn router(
    addr: SocketAddr,
    metrics: SocketAddr,
    workers: &[SocketAddr],
    logs: &Path,
    drain_grace: &str,
) -> Proc {
    let urls: Vec<String> = workers.iter().map(|a| format!("http://{a}")).collect();
    Proc::start(
        "router",
        logs,
        &[
            "router".into(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--workers".into(),
            urls.join(","),
            "--poll-interval".into(),
            "250ms".into(),
            "--drain-grace".into(),
            drain_grace.into(),
        ],
    )
}

/// A router and `n` workers on one model.
struct Cluster {
    router: Proc,
    router_addr: SocketAddr,
    metrics_addr: SocketAddr,
    workers: Vec<Proc>,
    worker_addrs: Vec<SocketAddr>,
    worker_metrics: Vec<SocketAddr>,
    model: PathBuf,
    logs: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // TANDEM_E2E_KEEP_LOGS=1 keeps the processes' logs for a look after the test.
        if std::env::var("TANDEM_E2E_KEEP_LOGS").as_deref() == Ok("1") {
            let dir = std::mem::replace(&mut self.logs, tempfile::tempdir().unwrap()).keep();
            eprintln!("logs kept in {}", dir.display());
        }
    }
}

impl Cluster {
    async fn start(model: &Path, n: usize) -> Cluster {
        Self::start_with(model, n, &[]).await
    }

    /// `extra` flags go to every worker.
    async fn start_with(model: &Path, n: usize, extra: &[&str]) -> Cluster {
        Self::start_full(model, n, extra, "20s").await
    }

    /// `drain_grace`: the router's `--drain-grace`.
    async fn start_full(model: &Path, n: usize, extra: &[&str], drain_grace: &str) -> Cluster {
        let logs = tempfile::Builder::new()
            .prefix("tandem-e2e-")
            .tempdir()
            .unwrap();
        let worker_addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
        let worker_metrics: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
        let workers = (0..n)
            .map(|i| {
                let name = format!("worker {i}");
                worker(
                    model,
                    worker_addrs[i],
                    worker_metrics[i],
                    logs.path(),
                    &name,
                    extra,
                )
            })
            .collect();
        let router_addr = free_addr();
        let metrics_addr = free_addr();
        let router = router(
            router_addr,
            metrics_addr,
            &worker_addrs,
            logs.path(),
            drain_grace,
        );
        let c = Cluster {
            router,
            router_addr,
            metrics_addr,
            workers,
            worker_addrs,
            worker_metrics,
            model: model.to_owned(),
            logs,
        };
        c.wait_replicas(n, Duration::from_secs(120)).await;
        c
    }

    async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.router_addr))
            .await
            .unwrap()
    }

    async fn shard(&self, i: usize) -> ShardClient<Channel> {
        ShardClient::connect(format!("http://{}", self.worker_addrs[i]))
            .await
            .unwrap()
    }

    /// Waits until ListModels reports `n` usable replicas.
    async fn wait_replicas(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(mut c) =
                GenerationClient::connect(format!("http://{}", self.router_addr)).await
            {
                if let Ok(r) = c.list_models(ListModelsRequest {}).await {
                    let models = r.into_inner().models;
                    if models.first().is_some_and(|m| m.replicas as usize == n) {
                        return;
                    }
                }
            }
            assert!(
                start.elapsed() < timeout,
                "router did not report {n} replicas within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn restart_worker(&mut self, i: usize) {
        self.workers[i] = worker(
            &self.model,
            self.worker_addrs[i],
            self.worker_metrics[i],
            self.logs.path(),
            &format!("worker {i} (restarted)"),
            &[],
        );
    }

    async fn metrics(&self) -> String {
        scrape_metrics(self.metrics_addr).await
    }

    /// Tokens worker `i` has generated so far.
    async fn worker_generated(&self, i: usize) -> f64 {
        let m = scrape_metrics(self.worker_metrics[i]).await;
        metric_sample(&m, "tandem_worker_generated_tokens", "")
            .unwrap_or_else(|| panic!("no generated token count in:\n{m}"))
    }

    /// Sequences worker `i` dropped before they finished (client gone, deadline, abort).
    async fn worker_cancelled(&self, i: usize) -> f64 {
        let m = scrape_metrics(self.worker_metrics[i]).await;
        metric_sample(&m, "tandem_worker_cancelled_sequences", "")
            .unwrap_or_else(|| panic!("no cancelled sequence count in:\n{m}"))
    }

    /// Generation attempts the router has sent to its workers, all together.
    async fn router_attempts(&self) -> f64 {
        let m = self.metrics().await;
        self.worker_addrs
            .iter()
            .map(|a| {
                metric_sample(
                    &m,
                    "tandem_router_worker_requests_total",
                    &format!("http://{a}"),
                )
                .unwrap_or(0.0)
            })
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

fn text_req(text: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Text(text.into())),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Exactly `n` tokens (EOS ignored), so a request runs as long as the test needs.
fn long_req(text: &str, n: u32) -> GenerateRequest {
    let mut r = text_req(text, n);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r
}

fn chat(messages: &[(&str, &str)]) -> generate_request::Input {
    generate_request::Input::Chat(ChatMessages {
        messages: messages
            .iter()
            .map(|(r, c)| ChatMessage {
                role: (*r).into(),
                content: (*c).into(),
            })
            .collect(),
    })
}

/// Streams a request to the end and folds it the way `Generate` does.
async fn stream_all(
    c: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<GenerateResponse, tonic::Status> {
    let mut s = c.generate_stream(req).await?.into_inner();
    let mut out = GenerateResponse::default();
    while let Some(chunk) = s.message().await? {
        out.request_id = chunk.request_id;
        out.text.push_str(&chunk.text);
        out.token_ids.extend(chunk.token_ids);
        out.logprobs.extend(chunk.logprobs);
        if chunk.finish_reason != 0 {
            out.finish_reason = chunk.finish_reason;
            out.usage = chunk.usage;
        }
    }
    Ok(out)
}

async fn load(shard: &mut ShardClient<Channel>) -> LoadResponse {
    shard.load(LoadRequest {}).await.unwrap().into_inner()
}

/// Waits until the worker runs nothing and holds no KV (30 s: only a bound on hangs).
async fn wait_idle(shard: &mut ShardClient<Channel>) {
    let start = Instant::now();
    loop {
        let l = load(shard).await;
        if l.running == 0 && l.waiting == 0 && l.kv_tokens == 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker still holds a sequence: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tiny Llama slow enough that a long generation outlasts the test's checks: 4096 positions,
/// hidden 256, 4 layers.
fn slow_tiny() -> TinyModel {
    tiny_model(&TinyConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        max_position_embeddings: 4096,
        ..TinyConfig::llama()
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_generate_chat_tokenize_and_spread() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let cluster = Cluster::start(&tiny.dir, 2).await;
    let mut c = cluster.client().await;

    // ListModels from the cached Info.
    let models = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1, "{models:?}");
    let m = &models[0];
    assert_eq!(m.replicas, 2);
    assert_eq!(m.context_length, 512);
    assert_eq!(m.vocab_size as usize, tiny.vocab_size);
    assert!(!m.tokenizer_hash.is_empty());
    assert!(m.max_new_tokens_limit > 0);

    // Streaming and unary agree on greedy output.
    let mut req = text_req("The quick brown fox", 24);
    req.request_id = "my-request-1".into();
    let streamed = stream_all(&mut c, req.clone()).await.unwrap();
    let unary = c.generate(req).await.unwrap().into_inner();
    assert_eq!(streamed.token_ids, unary.token_ids);
    assert_eq!(streamed.text, unary.text);
    assert!(!unary.token_ids.is_empty());
    assert_eq!(unary.request_id, "my-request-1");
    assert_eq!(streamed.request_id, "my-request-1");
    assert_eq!(unary.model, m.name);
    assert_ne!(unary.finish_reason, 0);
    let usage = unary.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, unary.token_ids.len());

    // Tokenize agrees with what Generate counted as the prompt.
    let tok = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            input: Some(tokenize_request::Input::Text("The quick brown fox".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.token_ids.len(), usage.prompt_tokens as usize);
    assert_eq!(tok.tokens.len(), tok.token_ids.len());

    // Token ids in give the same output as the text they came from.
    let mut by_ids = text_req("", 24);
    by_ids.input = Some(generate_request::Input::TokenIds(TokenIds {
        ids: tok.token_ids.clone(),
    }));
    let by_ids = c.generate(by_ids).await.unwrap().into_inner();
    assert_eq!(by_ids.token_ids, unary.token_ids);
    assert!(
        by_ids.request_id.starts_with("req-"),
        "{}",
        by_ids.request_id
    );

    // Chat: rendered with the model's template; Tokenize renders the same.
    let msgs = [("system", "You are terse."), ("user", "Hello there")];
    let mut chat_req = text_req("", 16);
    chat_req.input = Some(chat(&msgs));
    let chat_out = c.generate(chat_req).await.unwrap().into_inner();
    assert!(!chat_out.token_ids.is_empty());
    let chat_tok = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            input: Some(tokenize_request::Input::Chat(ChatMessages {
                messages: msgs
                    .iter()
                    .map(|(r, t)| ChatMessage {
                        role: (*r).into(),
                        content: (*t).into(),
                    })
                    .collect(),
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        chat_tok.tokens.iter().any(|t| t.contains("im_start")),
        "{:?}",
        chat_tok.tokens
    );
    assert_eq!(
        chat_out.usage.unwrap().prompt_tokens as usize,
        chat_tok.token_ids.len()
    );

    // Logprobs when asked, one per token.
    let mut lp = text_req("The quick brown fox", 8);
    lp.sampling = Some(SamplingParameters {
        top_logprobs: 3,
        ..Default::default()
    });
    let lp = c.generate(lp).await.unwrap().into_inner();
    assert_eq!(lp.logprobs.len(), lp.token_ids.len());
    assert!(lp
        .logprobs
        .iter()
        .all(|l| l.top.len() == 3 && l.logprob <= 0.0));

    // A burst of concurrent requests lands on both workers.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            stream_all(&mut c, long_req(&format!("request {i}"), 32)).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.token_ids.len(), 32);
    }
    let metrics = cluster.metrics().await;
    for a in &cluster.worker_addrs {
        let n = metric_sample(
            &metrics,
            "tandem_router_worker_requests_total",
            &format!("http://{a}"),
        )
        .unwrap_or_else(|| panic!("no request count for worker {a}:\n{metrics}"));
        assert!(n >= 2.0, "worker {a} got {n} requests:\n{metrics}");
    }
    assert!(metrics.contains("tandem_router_time_to_first_token_seconds"));
    assert!(metrics.contains("tandem_router_requests_total{method=\"GenerateStream\",code=\"ok\"}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_are_invalid_argument_while_good_requests_stream() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let cluster = Cluster::start(&tiny.dir, 1).await;
    let c = cluster.client().await;

    let good: Vec<_> = (0..3)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(
                async move { stream_all(&mut c, long_req(&format!("good {i}"), 200)).await },
            )
        })
        .collect();

    let base = || text_req("hello", 8);
    let with_sampling = |s: SamplingParameters| {
        let mut r = base();
        r.sampling = Some(s);
        r
    };
    let with_stopping = |s: StoppingCriteria| {
        let mut r = base();
        r.stopping = Some(s);
        r
    };
    let mut cases: Vec<(&str, GenerateRequest, &str)> = vec![
        ("no input", GenerateRequest::default(), "input"),
        ("empty text", text_req("", 8), "text"),
        (
            "empty ids",
            {
                let mut r = base();
                r.input = Some(generate_request::Input::TokenIds(TokenIds { ids: vec![] }));
                r
            },
            "token_ids",
        ),
        (
            "id outside vocab",
            {
                let mut r = base();
                r.input = Some(generate_request::Input::TokenIds(TokenIds {
                    ids: vec![1, 2, 1_000_000],
                }));
                r
            },
            "token_ids",
        ),
        (
            "prompt over context",
            text_req(&"hello world ".repeat(400), 8),
            "context",
        ),
        (
            // Over the router's 4 MiB default message limit.
            "message over the size limit",
            text_req(&"x".repeat(5 << 20), 8),
            "max_message_bytes",
        ),
        (
            "max_new_tokens 0",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(0),
                ..Default::default()
            }),
            "max_new_tokens",
        ),
        (
            "max_new_tokens over limit",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(1_000_000),
                ..Default::default()
            }),
            "max_new_tokens",
        ),
        (
            "prompt + max_new_tokens over context",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(510),
                ..Default::default()
            }),
            "context",
        ),
        (
            "negative temperature",
            with_sampling(SamplingParameters {
                temperature: Some(-0.5),
                ..Default::default()
            }),
            "temperature",
        ),
        (
            "NaN temperature",
            with_sampling(SamplingParameters {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            "temperature",
        ),
        (
            "top_p 0",
            with_sampling(SamplingParameters {
                top_p: Some(0.0),
                ..Default::default()
            }),
            "top_p",
        ),
        (
            "top_p above 1",
            with_sampling(SamplingParameters {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "top_p",
        ),
        (
            "negative top_k",
            with_sampling(SamplingParameters {
                top_k: -3,
                ..Default::default()
            }),
            "top_k",
        ),
        (
            "too many stop strings",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(8),
                stop: (0..9).map(|i| format!("s{i}")).collect(),
                ..Default::default()
            }),
            "stop",
        ),
        (
            "stop string too long",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(8),
                stop: vec!["x".repeat(300)],
                ..Default::default()
            }),
            "stop",
        ),
        (
            "stop token outside vocab",
            with_stopping(StoppingCriteria {
                max_new_tokens: Some(8),
                stop_token_ids: vec![999_999],
                ..Default::default()
            }),
            "stop_token_ids",
        ),
        (
            "bad chat role",
            {
                let mut r = base();
                r.input = Some(chat(&[("wizard", "hi")]));
                r
            },
            "role",
        ),
        (
            "empty chat",
            {
                let mut r = base();
                r.input = Some(chat(&[]));
                r
            },
            "chat",
        ),
        (
            "unknown speculation mode",
            {
                let mut r = base();
                r.speculation = Some(Speculation {
                    mode: 42,
                    ..Default::default()
                });
                r
            },
            "speculation.mode",
        ),
        (
            "max_draft_tokens over limit",
            {
                let mut r = base();
                r.speculation = Some(Speculation {
                    mode: speculation::Mode::Ngram as i32,
                    max_draft_tokens: 17,
                    ..Default::default()
                });
                r
            },
            "speculation.max_draft_tokens",
        ),
        (
            "candidates over limit",
            {
                let mut r = base();
                r.speculation = Some(Speculation {
                    mode: speculation::Mode::Ngram as i32,
                    candidates: 9,
                    ..Default::default()
                });
                r
            },
            "speculation.candidates",
        ),
    ];
    let mut unknown_model = base();
    unknown_model.model = "no-such-model".into();
    cases.push(("unknown model", unknown_model, "model"));
    // A 1 MB name: refused by length, and never echoed whole (clients cap status metadata).
    let mut huge_model = base();
    huge_model.model = "m".repeat(1 << 20);
    cases.push(("huge model name", huge_model, "model"));
    cases.push((
        "too many stop token ids",
        with_stopping(StoppingCriteria {
            max_new_tokens: Some(4),
            stop_token_ids: vec![1; 10_000],
            ..Default::default()
        }),
        "stop_token_ids",
    ));

    for (name, req, field) in cases {
        for unary in [false, true] {
            let mut c = c.clone();
            let err = if unary {
                c.generate(req.clone()).await.unwrap_err()
            } else {
                stream_all(&mut c, req.clone()).await.unwrap_err()
            };
            let want = if name == "unknown model" {
                Code::NotFound
            } else {
                Code::InvalidArgument
            };
            assert_eq!(err.code(), want, "{name}: {err:?}");
            assert!(
                err.message().contains(field),
                "{name}: message should name `{field}`: {}",
                err.message()
            );
            assert!(
                err.message().len() < 1024,
                "{name}: {} bytes",
                err.message().len()
            );
        }
    }
    // Limits are named in the messages.
    let mut c2 = c.clone();
    let e = c2
        .generate(with_stopping(StoppingCriteria {
            max_new_tokens: Some(1_000_000),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(e.message().contains("4096"), "{}", e.message());
    let e = c2
        .generate(with_stopping(StoppingCriteria {
            max_new_tokens: Some(8),
            stop: (0..9).map(|i| format!("s{i}")).collect(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert!(e.message().contains('8'), "{}", e.message());

    for g in good {
        let r = g.await.unwrap().unwrap();
        assert_eq!(r.token_ids.len(), 200);
        assert_eq!(r.finish_reason, FinishReason::Length as i32);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_crash_is_survived_and_recovered() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let mut cluster = Cluster::start(&tiny.dir, 2).await;
    let mut c = cluster.client().await;
    let expected = c
        .generate(text_req("crash test", 16))
        .await
        .unwrap()
        .into_inner();

    // Worker 0 crashes. Requests sent right after still succeed: those routed to the dead
    // worker before the router notices are retried on the other.
    cluster.workers[0].kill();
    for _ in 0..6 {
        let r = c
            .generate(text_req("crash test", 16))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.token_ids, expected.token_ids);
    }
    assert!(
        cluster.router.is_running(),
        "the router must survive a worker crash"
    );

    // Both dead: UNAVAILABLE (the router stays up and says so).
    cluster.workers[1].kill();
    let start = Instant::now();
    loop {
        match c.generate(text_req("crash test", 16)).await {
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                break;
            }
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(30), "still served?"),
        }
    }
    let e = stream_all(&mut c, text_req("crash test", 16))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(cluster.router.is_running());

    // Worker 1 comes back on the same port: serving resumes.
    cluster.restart_worker(1);
    let start = Instant::now();
    loop {
        match c.generate(text_req("crash test", 16)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().token_ids, expected.token_ids);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                // The restarted worker loads its model first.
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "serving did not resume: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    cluster.wait_replicas(1, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_stream_frees_the_sequence_and_deadlines_hold() {
    let tiny = slow_tiny();
    let cluster = Cluster::start(&tiny.dir, 1).await;
    let mut c = cluster.client().await;
    let mut shard = cluster.shard(0).await;

    // A client reads a few chunks of a long generation, then goes away.
    let generated_before = cluster.worker_generated(0).await;
    let cancelled_before = cluster.worker_cancelled(0).await;
    let mut s = c
        .generate_stream(long_req("a long story", 4000))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        s.message().await.unwrap().unwrap();
    }
    let l = load(&mut shard).await;
    assert_eq!(l.running, 1, "{l:?}");
    assert!(l.kv_tokens > 0, "{l:?}");
    drop(s);
    // Freed because it was aborted, not because it finished: the worker counts a sequence it
    // dropped unfinished as cancelled (recorded as it drops it, so poll that too).
    let start = Instant::now();
    loop {
        let l = load(&mut shard).await;
        let cancelled = cluster.worker_cancelled(0).await - cancelled_before;
        if l.running == 0 && l.waiting == 0 && l.kv_tokens == 0 && cancelled == 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the worker still holds the dropped sequence or did not cancel it \
             ({cancelled} cancelled): {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = cluster.worker_generated(0).await - generated_before;
    eprintln!("dropped stream: {generated} tokens generated");
    assert!(generated < 4000.0, "{generated} tokens generated");

    // A 300 ms deadline on a long generation: DEADLINE_EXCEEDED, and the worker frees it.
    for unary in [false, true] {
        let mut req = tonic::Request::new(long_req("a long story", 4000));
        req.set_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let err = if unary {
            c.generate(req).await.unwrap_err()
        } else {
            match c.generate_stream(req).await {
                Err(e) => e,
                Ok(r) => {
                    let mut s = r.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => panic!("stream ended without the deadline error"),
                            Err(e) => break e,
                        }
                    }
                }
            }
        };
        let took = started.elapsed();
        // tonic's client enforces the same grpc-timeout: under load its own timer can fire
        // first (CANCELLED "Timeout expired") before the router's DEADLINE_EXCEEDED arrives.
        // Either way the deadline held; that the worker freed the sequence is checked below.
        let client_timer =
            err.code() == Code::Cancelled && err.message().contains("Timeout expired");
        assert!(
            err.code() == Code::DeadlineExceeded || client_timer,
            "unary={unary}: {err:?}"
        );
        eprintln!("unary={unary}: deadline error after {took:?}");
        // Only catches a deadline that is not enforced (the request runs far longer).
        assert!(took < Duration::from_secs(10), "took {took:?}");
        wait_idle(&mut shard).await;
    }

    // Still serving afterwards.
    let r = c.generate(text_req("after", 4)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 4);

    // No long generation ran to its end: the worker's only completed request is the one just
    // above. A deadline's sequence is either cancelled (counted) or never reached the worker
    // (tonic's own timer fired while the router was still routing it); one that reached it late
    // and was not aborted would still be running below, or be a second completed request.
    wait_idle(&mut shard).await;
    let m = scrape_metrics(cluster.worker_metrics[0]).await;
    let cancelled = cluster.worker_cancelled(0).await - cancelled_before;
    let generated = cluster.worker_generated(0).await - generated_before;
    eprintln!("dropped stream, two deadlines: {cancelled} cancelled, {generated} tokens generated");
    assert_eq!(
        metric_sample(&m, "tandem_worker_requests_total", "code=\"OK\""),
        Some(1.0),
        "{m}"
    );
    assert!((1.0..=3.0).contains(&cancelled), "{cancelled} cancelled");

    // Requests ended by the client's deadline count as DEADLINE_EXCEEDED, also when the
    // client's own timer reset the stream first; the one CANCELLED is the dropped stream.
    let rm = cluster.metrics().await;
    let count = |method: &str, code: &str| {
        metric_sample(
            &rm,
            "tandem_router_requests_total",
            &format!("method=\"{method}\",code=\"{code}\""),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("GenerateStream", "cancelled"), 1.0, "{rm}");
    assert_eq!(count("Generate", "cancelled"), 0.0, "{rm}");
    assert_eq!(
        count("Generate", "deadline_exceeded") + count("GenerateStream", "deadline_exceeded"),
        2.0,
        "{rm}"
    );
    assert_eq!(
        metric_sample(&m, "tandem_worker_requests_total", "code=\"CANCELLED\""),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn real_smollm2_capital_of_france() {
    let Some(path) = tandem_testkit::real_smollm2() else {
        return;
    };
    let cluster = Cluster::start(&path, 1).await;
    let mut c = cluster.client().await;
    let mut req = text_req("", 32);
    req.input = Some(chat(&[
        ("system", "You are a helpful assistant."),
        ("user", "What is the capital of France?"),
    ]));
    req.sampling = Some(SamplingParameters {
        temperature: Some(0.0),
        ..Default::default()
    });
    let streamed = stream_all(&mut c, req.clone()).await.unwrap();
    let unary = c.generate(req).await.unwrap().into_inner();
    assert!(unary.text.contains("Paris"), "{:?}", unary.text);
    assert_eq!(streamed.text, unary.text);
    assert_eq!(streamed.token_ids, unary.token_ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn router_drains_in_flight_requests_on_sigterm() {
    let tiny = slow_tiny();
    // The grace only catches a hang: the long request below must be able to finish in it on
    // a loaded machine.
    let mut cluster = Cluster::start_full(&tiny.dir, 1, &[], "600s").await;
    let mut c = cluster.client().await;
    // Long (near the model's 4096 positions), so it is surely still running while the drain
    // starts and the late request is refused.
    let n = 4000;
    let mut s = c
        .generate_stream(long_req("drain", n))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = s.message().await.unwrap().unwrap().token_ids.len();
    cluster.router.sigterm();

    // Draining: health says NOT_SERVING and new generations are refused with UNAVAILABLE.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", cluster.router_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "still SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = c.generate(text_req("late", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // The request in flight runs to its end.
    let mut finish = 0;
    while let Some(chunk) = s.message().await.unwrap() {
        tokens += chunk.token_ids.len();
        finish = chunk.finish_reason;
    }
    assert_eq!(tokens, n as usize);
    assert_eq!(finish, FinishReason::Length as i32);
    let status = cluster.router.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "router exit: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn up_starts_a_cluster_and_stops_it() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let mut up = Proc::start(
        "up",
        logs.path(),
        &[
            "up".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--workers".into(),
            "2".into(),
            "--tp".into(),
            "2".into(),
            "--listen".into(),
            listen.to_string(),
        ],
    );
    let start = Instant::now();
    while !up.output().contains("Tandem is up") {
        assert!(up.is_running(), "tandem up exited:\n{}", up.output());
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{}",
            up.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let banner = up.output();
    assert!(banner.contains("grpcurl"), "{banner}");
    assert!(banner.contains("generate --addr"), "{banner}");

    // Both workers join; the CLI client streams a completion.
    let start = Instant::now();
    loop {
        let mut c = GenerationClient::connect(format!("http://{listen}"))
            .await
            .unwrap();
        let m = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        if m.models.first().is_some_and(|m| m.replicas == 2) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "generate",
            "--addr",
            &format!("http://{listen}"),
            "--max-new-tokens",
            "8",
            "--chat",
            "Hello",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!out.stdout.is_empty());

    up.sigterm();
    let status = up.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "up exit: {status}\n{}", up.output());
    // Its children are gone with it.
    assert!(
        std::net::TcpStream::connect(listen).is_err(),
        "the router still listens"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queues_are_resource_exhausted_after_trying_every_worker() {
    let tiny = slow_tiny();
    let cluster =
        Cluster::start_with(&tiny.dir, 2, &["--max-running", "1", "--max-waiting", "1"]).await;
    let c = cluster.client().await;
    // Capacity is 2 per worker (1 running + 1 waiting): 4 long requests fill both. Least
    // outstanding tokens sends fills 0 and 1 to different workers; each must be running (its
    // first token came) before fills 2 and 3 are sent, or one of those could find a queue
    // still holding a fill not yet admitted, and be refused there.
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut c = c.clone();
        let mut s = c
            .generate_stream(long_req(&format!("fill {i}"), 4000))
            .await
            .unwrap_or_else(|e| panic!("request {i} refused: {e:?}"))
            .into_inner();
        if i < 2 {
            let first = tokio::time::timeout(Duration::from_secs(60), s.message())
                .await
                .unwrap_or_else(|_| panic!("fill {i}: no first token in 60 s"));
            assert!(first.unwrap().is_some(), "fill {i} ended at once");
        }
        streams.push(s);
    }
    for i in 0..2 {
        let mut shard = cluster.shard(i).await;
        let start = Instant::now();
        loop {
            // The engine admits from its queue on its own thread and publishes its stats after
            // a step: poll (the bound only catches a hang).
            let l = load(&mut shard).await;
            if (l.running, l.waiting) == (1, 1) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "worker {i}: {l:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let attempts_before = cluster.router_attempts().await;
    let mut c2 = c.clone();
    let e = stream_all(&mut c2, long_req("one too many", 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = c2.generate(long_req("one too many", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Each refused request was offered to both workers (the fills' attempts are left out: a
    // fill may have been retried elsewhere).
    let attempts = cluster.router_attempts().await - attempts_before;
    assert_eq!(attempts, 2.0 + 2.0, "{}", cluster.metrics().await);
    // Room again once the streams go away.
    drop(streams);
    let start = Instant::now();
    loop {
        match c2.generate(long_req("room again", 4)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().token_ids.len(), 4);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(start.elapsed() < Duration::from_secs(30), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Speculation over the public API: the n-gram drafter on a repetitive prompt gives the same
/// greedy tokens as plain decoding, and usage reports the accepted drafted tokens; the worker's
/// metrics count drafts per position.
#[tokio::test(flavor = "multi_thread")]
async fn ngram_speculation_over_the_api_keeps_greedy_output() {
    let tiny = tiny_model(&TinyConfig::qwen2()).unwrap();
    // Fixed draft length: on a tiny model timing noise could make the cost model skip drafts,
    // and this test is about what the API does with them.
    let cluster = Cluster::start_with(&tiny.dir, 1, &["--draft-length", "fixed"]).await;
    let mut c = cluster.client().await;
    let prompt: Vec<u32> = [5u32, 9, 14, 20, 27]
        .iter()
        .copied()
        .cycle()
        .take(40)
        .collect();
    let req = |mode: speculation::Mode| GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds {
            ids: prompt.clone(),
        })),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(48),
            ignore_eos: true,
            ..Default::default()
        }),
        speculation: Some(Speculation {
            mode: mode as i32,
            max_draft_tokens: 6,
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = c
        .generate(req(speculation::Mode::Off))
        .await
        .unwrap()
        .into_inner();
    let spec = c
        .generate(req(speculation::Mode::Ngram))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.token_ids, plain.token_ids);
    assert_eq!(spec.text, plain.text);
    let usage = spec.usage.unwrap();
    assert!(usage.accepted_draft_tokens > 0, "{usage:?}");
    assert_eq!(plain.usage.unwrap().accepted_draft_tokens, 0);
    let streamed = stream_all(&mut c, req(speculation::Mode::Ngram))
        .await
        .unwrap();
    assert_eq!(streamed.token_ids, plain.token_ids);
    let m = scrape_metrics(cluster.worker_metrics[0]).await;
    let first = metric_sample(
        &m,
        "tandem_worker_spec_accepted_at_position",
        "position=\"0\"",
    )
    .unwrap_or_default();
    assert!(first > 0.0, "{m}");
}

/// Tokenize within the router's request limit (4 MiB by default) answers, though its response
/// (ids plus token strings) is 3.5x the text; beyond the limit it is refused with
/// INVALID_ARGUMENT naming the limit, before any tokenizing, and counted as such (issue 15,
/// probe item 1: 5 MiB spent seconds of router CPU, then OUT_OF_RANGE counted as ok).
#[tokio::test(flavor = "multi_thread")]
async fn tokenize_applies_the_message_limit_and_its_response_fits() {
    let tiny = tandem_testkit::tiny_model(&TinyConfig::llama()).unwrap();
    let cluster = Cluster::start(&tiny.dir, 1).await;
    let mut c = cluster
        .client()
        .await
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let text = |bytes: usize| "the quick brown fox ".repeat(bytes / 20);
    let started = Instant::now();
    let err = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            input: Some(tokenize_request::Input::Text(text(5 << 20))),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("max_message_bytes"),
        "{}",
        err.message()
    );
    // Refused before tokenizing (that took seconds); bounds only that.
    assert!(started.elapsed() < Duration::from_secs(30));
    let ok = c
        .tokenize(TokenizeRequest {
            model: String::new(),
            input: Some(tokenize_request::Input::Text(text(3 << 20))),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.token_ids.is_empty());
    assert_eq!(ok.token_ids.len(), ok.tokens.len());
    let m = cluster.metrics().await;
    assert_eq!(
        metric_sample(
            &m,
            "tandem_router_requests_total",
            "method=\"Tokenize\",code=\"invalid_argument\""
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_sample(
            &m,
            "tandem_router_requests_total",
            "method=\"Tokenize\",code=\"ok\""
        ),
        Some(1.0),
        "{m}"
    );
}
