//! Speculative decoding across services, end to end: a real `tandem draft` process paired with
//! a real worker (the verifier) behind a real router, tiny test-kit models on loopback.
//! - greedy output with the draft service equals plain greedy output, token for token, and the
//!   verifier accepts drafts (the target as its own draft accepts them all);
//! - killing the draft mid-stream changes no stream's tokens; a restarted draft is paired again
//!   (sequences it doesn't know are resent whole);
//! - a draft with another tokenizer is refused at the worker's start with a clear error.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, speculation, ChatMessage, ChatMessages, GenerateRequest, ListModelsRequest,
    Speculation, StoppingCriteria, TokenIds,
};
use tandem_testkit::{tiny_model, TinyConfig};
use tonic::transport::Channel;

mod common;
use common::{free_addr, metric_sample, scrape_metrics, Proc};

fn draft(model: &Path, addr: SocketAddr, logs: &Path, name: &str) -> Proc {
    Proc::start(
        name,
        logs,
        &[
            "draft".into(),
            "--model".into(),
            model.display().to_string(),
            "--listen".into(),
            addr.to_string(),
        ],
    )
}

struct Pair {
    draft: Proc,
    draft_addr: SocketAddr,
    _worker: Proc,
    worker_metrics: SocketAddr,
    _router: Proc,
    router_addr: SocketAddr,
    logs: tempfile::TempDir,
}

/// A draft on `draft_model`, a worker on `target` paired with it, and a router. Drafting must
/// not depend on timing, whatever else loads the machine: the worker starts once the draft
/// serves (so it pairs at start), drafts the fixed maximum every step, sends a new sequence's
/// context inside the step's draft call (`--draft-catch-up inline`: no step decodes without
/// drafts while a background catch-up runs) and waits up to a minute for a draft call.
async fn start(target: &Path, draft_model: &Path) -> Pair {
    let logs = tempfile::Builder::new()
        .prefix("tandem-spec-")
        .tempdir()
        .unwrap();
    let draft_addr = free_addr();
    let d = draft(draft_model, draft_addr, logs.path(), "draft");
    wait_serving(draft_addr).await;
    let (worker_addr, worker_metrics) = (free_addr(), free_addr());
    let w = Proc::start(
        "worker",
        logs.path(),
        &[
            "worker".into(),
            "--model".into(),
            target.display().to_string(),
            "--listen".into(),
            worker_addr.to_string(),
            "--metrics-listen".into(),
            worker_metrics.to_string(),
            "--draft-endpoint".into(),
            format!("http://{draft_addr}"),
            "--draft-length".into(),
            "fixed".into(),
            "--max-draft-tokens".into(),
            "4".into(),
            "--draft-timeout".into(),
            "60s".into(),
            "--draft-catch-up".into(),
            "inline".into(),
        ],
    );
    let router_addr = free_addr();
    let r = Proc::start(
        "router",
        logs.path(),
        &[
            "router".into(),
            "--listen".into(),
            router_addr.to_string(),
            "--workers".into(),
            format!("http://{worker_addr}"),
            "--poll-interval".into(),
            "250ms".into(),
        ],
    );
    let pair = Pair {
        draft: d,
        draft_addr,
        _worker: w,
        worker_metrics,
        _router: r,
        router_addr,
        logs,
    };
    let start = Instant::now();
    loop {
        if let Ok(mut c) = GenerationClient::connect(format!("http://{router_addr}")).await {
            if let Ok(r) = c.list_models(ListModelsRequest {}).await {
                if r.into_inner()
                    .models
                    .first()
                    .is_some_and(|m| m.replicas == 1)
                {
                    break;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(600), "no replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pair
}

impl Pair {
    async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.router_addr))
            .await
            .unwrap()
    }

    async fn metric(&self, name: &str) -> f64 {
        let m = scrape_metrics(self.worker_metrics).await;
        metric_sample(&m, name, "").unwrap_or_else(|| panic!("no {name} in:\n{m}"))
    }
}

fn req(prompt: &[u32], n: u32, mode: speculation::Mode) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds {
            ids: prompt.to_vec(),
        })),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(n),
            ignore_eos: true,
            ..Default::default()
        }),
        speculation: Some(Speculation {
            mode: mode as i32,
            max_draft_tokens: 0,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..4u32)
        .map(|i| {
            (0..(5 + 3 * i))
                .map(|j| (i * 31 + j * 7 + 3) % 250)
                .collect()
        })
        .collect()
}

async fn generate_all(
    c: &GenerationClient<Channel>,
    n: u32,
    mode: speculation::Mode,
) -> Vec<(Vec<u32>, u32)> {
    let tasks: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let r = c.generate(req(&p, n, mode)).await.unwrap().into_inner();
                (r.token_ids, r.usage.unwrap().accepted_draft_tokens)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// With the target as its own draft every drafted token is the target's own greedy choice: all
/// accepted, output identical.
#[tokio::test(flavor = "multi_thread")]
async fn draft_service_greedy_equals_plain_and_survives_a_draft_kill() {
    let tiny = tiny_model(&TinyConfig {
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 3,
        max_position_embeddings: 2048,
        ..TinyConfig::qwen2()
    })
    .unwrap();
    let mut pair = start(&tiny.dir, &tiny.dir).await;
    let c = pair.client().await;

    let plain = generate_all(&c, 40, speculation::Mode::Off).await;
    let spec = generate_all(&c, 40, speculation::Mode::DraftModel).await;
    for ((p, pa), (s, sa)) in plain.iter().zip(&spec) {
        assert_eq!(s, p);
        assert_eq!(*pa, 0);
        assert!(*sa > 0, "no drafted token accepted");
    }
    // The server's default (a draft is paired) is the draft model too.
    let default = generate_all(&c, 40, speculation::Mode::Unspecified).await;
    assert_eq!(
        default.iter().map(|d| &d.0).collect::<Vec<_>>(),
        plain.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    assert!(default.iter().all(|d| d.1 > 0));
    assert_eq!(pair.metric("tandem_worker_draft_paired").await, 1.0);

    // Long streams (far longer than the 20 accepted tokens awaited before the kill); the draft
    // dies while they run.
    const N: u32 = 1500;
    let want = generate_all(&c, N, speculation::Mode::Off).await;
    let accepted_before = pair.metric("tandem_worker_spec_accepted_tokens").await;
    let streams: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut s = c
                    .generate_stream(req(&p, N, speculation::Mode::DraftModel))
                    .await
                    .unwrap()
                    .into_inner();
                let mut ids = Vec::new();
                while let Some(m) = s.message().await.unwrap() {
                    ids.extend(m.token_ids);
                }
                ids
            })
        })
        .collect();
    // Kill once drafts are flowing, then restart it after a moment.
    let t0 = Instant::now();
    while pair.metric("tandem_worker_spec_accepted_tokens").await < accepted_before + 20.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no drafts accepted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pair.draft.kill();
    let running_at_kill = streams.iter().filter(|s| !s.is_finished()).count();
    assert!(running_at_kill > 0, "the streams ended before the kill");
    let mut got = Vec::new();
    for s in streams {
        got.push(s.await.unwrap());
    }
    for (g, (w, _)) in got.iter().zip(&want) {
        assert_eq!(g, w, "a stream changed when the draft died");
    }
    assert!(pair.metric("tandem_worker_draft_failures").await >= 1.0);
    assert_eq!(pair.metric("tandem_worker_draft_paired").await, 0.0);

    // A restarted draft (empty: it knows no sequence) is paired again and drafts again.
    pair.draft = draft(
        &tiny.dir,
        pair.draft_addr,
        pair.logs.path(),
        "draft restarted",
    );
    let t0 = Instant::now();
    loop {
        let again = generate_all(&c, 40, speculation::Mode::DraftModel).await;
        for ((a, _), (p, _)) in again.iter().zip(&plain) {
            assert_eq!(a, p);
        }
        if again.iter().all(|d| d.1 > 0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the restarted draft was not used again"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(pair.metric("tandem_worker_draft_paired").await, 1.0);
}

/// A draft whose vocabulary differs from the target's is refused at start, naming both.
#[tokio::test(flavor = "multi_thread")]
async fn a_draft_with_another_tokenizer_is_refused() {
    let smol = dirs_model("SmolLM2-135M-Instruct.Q4_1.gguf");
    let Some(smol) = smol else {
        assert!(
            std::env::var("TANDEM_REQUIRE_REAL_MODELS").as_deref() != Ok("1"),
            "SmolLM2 is required (scripts/fetch-models smollm2)"
        );
        eprintln!("skipped: SmolLM2 not in the model cache");
        return;
    };
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let draft_addr = free_addr();
    let _d = draft(&smol, draft_addr, logs.path(), "draft");
    // Wait for the draft to serve (model loaded), so the worker's pairing check reaches it.
    wait_serving(draft_addr).await;
    let mut w = Proc::start(
        "worker",
        logs.path(),
        &[
            "worker".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--listen".into(),
            free_addr().to_string(),
            "--draft-endpoint".into(),
            format!("http://{draft_addr}"),
        ],
    );
    let status = w.wait_exit(Duration::from_secs(600)).await;
    assert!(!status.success());
    let out = w.output();
    assert!(out.contains("tokenizer hash"), "{out}");
}

/// Waits until the server at `addr` reports SERVING. The bound only catches a hang: loading a
/// real draft on a loaded 2-core machine is slow.
async fn wait_serving(addr: SocketAddr) {
    let t0 = Instant::now();
    while !serving(addr).await {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the draft never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serving(addr: SocketAddr) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| e.connect_timeout(Duration::from_secs(1)))
    else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    let mut c = HealthClient::new(channel);
    matches!(
        c.check(HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

fn dirs_model(file: &str) -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("TANDEM_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tandem/models")))?;
    let p = cache.join(file);
    p.exists().then_some(p)
}

/// The real pair `tandem up` runs: Qwen2.5-Coder-1.5B (Q4_K/Q6_K) verifying drafts of the 0.5B
/// draft service. Speculative greedy must give plain greedy's tokens exactly: verification
/// scores drafted tokens in one batched forward, decoding one at a time, and the model makes
/// both give the same bits (row-exact attention, single rows padded where candle's kernels
/// differ). Three code prompts at once, so rows of several sequences share each forward.
#[tokio::test(flavor = "multi_thread")]
async fn real_qwen_pair_speculative_greedy_equals_plain() {
    let Some(target) = tandem_testkit::real_model("qwen2.5-coder-1.5b-instruct.gguf", "qwen-1.5b")
    else {
        return;
    };
    let Some(draft_model) =
        tandem_testkit::real_model("qwen2.5-coder-0.5b-instruct.gguf", "qwen-0.5b")
    else {
        return;
    };
    let pair = start(&target, &draft_model).await;
    let t0 = Instant::now();
    // `start` waited for the draft to serve, so the worker paired with it at its own start.
    while pair.metric("tandem_worker_draft_paired").await < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the draft was never paired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = pair.client().await;
    let tasks = [
        "Write a Python function that checks whether a number is prime, with a docstring and tests.",
        "Write a Rust function that parses a CSV line into fields, with tests.",
        "Write a JavaScript debounce function with JSDoc.",
    ];
    let run = |mode: speculation::Mode, candidates: u32| {
        let c = c.clone();
        async move {
            let gens: Vec<_> = tasks
                .iter()
                .map(|t| {
                    let mut c = c.clone();
                    let r = GenerateRequest {
                        input: Some(generate_request::Input::Chat(ChatMessages {
                            messages: vec![ChatMessage {
                                role: "user".into(),
                                content: (*t).into(),
                            }],
                        })),
                        stopping: Some(StoppingCriteria {
                            max_new_tokens: Some(96),
                            ..Default::default()
                        }),
                        speculation: Some(Speculation {
                            mode: mode as i32,
                            max_draft_tokens: 0,
                            candidates,
                        }),
                        ..Default::default()
                    };
                    tokio::spawn(async move { c.generate(r).await.unwrap().into_inner() })
                })
                .collect();
            let mut out = Vec::new();
            for g in gens {
                let r = g.await.unwrap();
                out.push((r.token_ids, r.usage.unwrap().accepted_draft_tokens));
            }
            out
        }
    };
    let plain = run(speculation::Mode::Off, 0).await;
    let spec = run(speculation::Mode::DraftModel, 0).await;
    // Multi-candidate drafting: three candidate drafts per step from the draft service.
    let multi = run(speculation::Mode::DraftModel, 3).await;
    for (name, out) in [("one draft", &spec), ("3 candidates", &multi)] {
        for (i, ((p, _), (s, accepted))) in plain.iter().zip(out).enumerate() {
            let at = p.iter().zip(s).position(|(a, b)| a != b);
            assert!(
                at.is_none() && p.len() == s.len(),
                "{name}, prompt {}: speculative greedy left plain greedy at token {at:?}",
                i + 1
            );
            assert!(*accepted > 0, "{name}, prompt {}: no draft accepted", i + 1);
        }
    }
}
