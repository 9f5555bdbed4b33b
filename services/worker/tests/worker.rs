//! The worker in-process: a tiny testkit model served on 127.0.0.1:0, called through a real
//! tonic client. Covers health and reflection, greedy output equal to the engine's, refusals with
//! the right status codes, cancellation (client drop, deadline, Abort) freeing KV, metrics, drain
//! and a failed model load.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_engine::{Engine, EngineConfig, Request, SamplingParams, StopCriteria};
use tandem_model::{LoadOptions, Model};
use tandem_proto::shard::v1::shard_client::ShardClient;
use tandem_proto::shard::v1::{
    AbortRequest, GenerateRequest, GenerateResponse, InfoRequest, LoadRequest, LoadResponse,
    TokenizerRequest,
};
use tandem_proto::v1::{FinishReason, SamplingParameters, StoppingCriteria};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};
use tandem_worker::{spawn, WorkerConfig, WorkerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CONTEXT: usize = 4096;
/// Long enough (seconds on the tiny model) to still be running while a test acts on it.
const LONG: u32 = 4000;
/// A bound on waits for the engine or server to react; only there to catch hangs (the suite
/// runs on a loaded 2-core machine).
const PATIENCE: Duration = Duration::from_secs(30);

fn tiny() -> TinyModel {
    tiny_model(&TinyConfig {
        max_position_embeddings: CONTEXT,
        ..TinyConfig::llama()
    })
    .unwrap()
}

struct Worker {
    handle: WorkerHandle,
    client: ShardClient<Channel>,
    // Keeps the model folder alive.
    _tiny: TinyModel,
}

async fn start(edit: impl FnOnce(&mut WorkerConfig)) -> Worker {
    let tiny = tiny();
    let mut cfg = WorkerConfig::new(&tiny.dir, "127.0.0.1:0".parse().unwrap());
    edit(&mut cfg);
    let handle = spawn(cfg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), handle.ready())
        .await
        .unwrap()
        .unwrap();
    let client = ShardClient::connect(format!("http://{}", handle.addr))
        .await
        .unwrap();
    Worker {
        handle,
        client,
        _tiny: tiny,
    }
}

fn prompt(i: u32, len: u32) -> Vec<u32> {
    (0..len).map(|j| (i * 31 + j * 7 + 1) % 300).collect()
}

fn greedy(prompt: Vec<u32>, max_new: u32) -> GenerateRequest {
    GenerateRequest {
        prompt,
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(max_new),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn long(prompt: Vec<u32>) -> GenerateRequest {
    let mut r = greedy(prompt, LONG);
    r.stopping.as_mut().unwrap().ignore_eos = true;
    r
}

/// Every message of a stream, or the status it failed with.
async fn collect(
    mut s: Streaming<GenerateResponse>,
) -> Result<Vec<GenerateResponse>, tonic::Status> {
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.push(m);
    }
    Ok(out)
}

fn token_ids(msgs: &[GenerateResponse]) -> Vec<u32> {
    msgs.iter()
        .flat_map(|m| m.tokens.iter().map(|t| t.id))
        .collect()
}

async fn load(c: &mut ShardClient<Channel>) -> LoadResponse {
    c.load(LoadRequest {}).await.unwrap().into_inner()
}

/// Waits until nothing runs, waits or holds KV.
async fn wait_idle(c: &mut ShardClient<Channel>, within: Duration) -> LoadResponse {
    let t = Instant::now();
    loop {
        let l = load(c).await;
        if (l.running, l.waiting, l.kv_tokens) == (0, 0, 0) {
            return l;
        }
        assert!(t.elapsed() < within, "still busy after {within:?}: {l:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_running(c: &mut ShardClient<Channel>, running: u32, waiting: u32) {
    let t = Instant::now();
    loop {
        let l = load(c).await;
        if l.running == running && l.waiting == waiting && l.kv_tokens > 0 {
            return;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "never reached {running}/{waiting}: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the engine itself generates for `req` (same model folder, no server).
async fn engine_tokens(tiny_dir: &std::path::Path, reqs: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let dir = tiny_dir.to_path_buf();
    tokio::task::spawn_blocking(move || engine_tokens_blocking(&dir, reqs))
        .await
        .unwrap()
}

fn engine_tokens_blocking(tiny_dir: &std::path::Path, reqs: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    let e = Engine::start(
        Model::load(tiny_dir, &LoadOptions::default()).unwrap(),
        EngineConfig::default(),
    );
    reqs.into_iter()
        .map(|r| {
            let req = Request {
                prompt: r.prompt,
                sampling: SamplingParams::default(),
                stop: StopCriteria {
                    max_new_tokens: r.stopping.unwrap().max_new_tokens.unwrap() as usize,
                    ..Default::default()
                },
                ignore_eos: false,
                speculation: Default::default(),
            };
            let (toks, _, _) = e.submit(req).unwrap().collect_blocking().unwrap();
            toks.into_iter().map(|t| t.token).collect()
        })
        .collect()
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(addr: std::net::SocketAddr, service: &str) -> i32 {
    let mut h = HealthClient::new(channel(addr).await);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_after_load_with_info_tokenizer_and_reflection() {
    let mut w = start(|c| c.model_name = Some("tiny".into())).await;
    for svc in ["", "tandem.shard.v1.Shard"] {
        assert_eq!(
            health(w.handle.addr, svc).await,
            ServingStatus::Serving as i32,
            "{svc:?}"
        );
    }
    let info = w.client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model, "tiny");
    assert_eq!(info.context_length as usize, CONTEXT);
    assert_eq!(info.vocab_size as usize, tandem_testkit::VOCAB_SIZE);
    assert_eq!(info.tp_size, 1);
    assert_eq!(info.max_new_tokens_limit, 4096);
    assert!(!info.version.is_empty());

    let tok = w
        .client
        .tokenizer(TokenizerRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.tokenizer_hash, info.tokenizer_hash);
    assert!(!tok.eos_token_ids.is_empty());
    // The shipped tokenizer rebuilds into the same vocabulary.
    let rebuilt = tandem_model::TextModel::from_parts(
        &tok.tokenizer_json,
        Some(tok.chat_template.clone()).filter(|s| !s.is_empty()),
        Some(tok.bos_token.clone()).filter(|s| !s.is_empty()),
        Some(tok.eos_token.clone()).filter(|s| !s.is_empty()),
        tok.eos_token_ids.clone(),
    )
    .unwrap();
    assert_eq!(rebuilt.vocab_hash(), info.tokenizer_hash);

    // Server reflection lists the shard service (grpcurl needs nothing local).
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(channel(w.handle.addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tandem.shard.v1.Shard".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"tandem.v1.Generation".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_the_engines_greedy_output() {
    let w = start(|_| {}).await;
    let reqs: Vec<_> = (0..4).map(|i| greedy(prompt(i, 3 + 5 * i), 40)).collect();
    let want = engine_tokens(&w._tiny.dir, reqs.clone()).await;
    // Concurrently, so they share batches.
    let calls = reqs.into_iter().map(|r| {
        let mut c = w.client.clone();
        tokio::spawn(async move { collect(c.generate(r).await.unwrap().into_inner()).await })
    });
    for (call, want) in calls.collect::<Vec<_>>().into_iter().zip(want) {
        let msgs = call.await.unwrap().unwrap();
        assert_eq!(token_ids(&msgs), want);
        let (last, rest) = msgs.split_last().unwrap();
        // finish_reason and usage on the last message only.
        assert!(rest
            .iter()
            .all(|m| m.finish_reason == 0 && m.usage.is_none() && !m.tokens.is_empty()));
        let usage = last.usage.unwrap();
        assert_eq!(usage.completion_tokens as usize, want.len());
        assert!(usage.prompt_tokens > 0);
        let reason = FinishReason::try_from(last.finish_reason).unwrap();
        if want.len() == 40 {
            assert_eq!(reason, FinishReason::Length);
        } else {
            assert_eq!(reason, FinishReason::Eos);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_while_good_ones_run() {
    let w = start(|c| c.max_new_tokens_limit = 1000).await;
    let good: Vec<_> = (0..3).map(|i| greedy(prompt(i, 10), 200)).collect();
    let want = engine_tokens(&w._tiny.dir, good.clone()).await;
    let running: Vec<_> = good
        .into_iter()
        .map(|r| {
            let mut c = w.client.clone();
            tokio::spawn(async move { collect(c.generate(r).await.unwrap().into_inner()).await })
        })
        .collect();

    let sampling = |s: SamplingParameters| GenerateRequest {
        prompt: vec![1, 2, 3],
        sampling: Some(s),
        ..Default::default()
    };
    let stopping = |s: StoppingCriteria| GenerateRequest {
        prompt: vec![1, 2, 3],
        stopping: Some(s),
        ..Default::default()
    };
    let bad: Vec<(&str, GenerateRequest, &[&str])> = vec![
        ("empty prompt", greedy(vec![], 5), &["prompt", "empty"]),
        (
            "token id >= vocab",
            greedy(vec![1, tandem_testkit::VOCAB_SIZE as u32], 5),
            &["prompt", "vocabulary"],
        ),
        ("max_new_tokens 0", greedy(vec![1], 0), &["max_new_tokens"]),
        (
            "max_new_tokens over the limit",
            greedy(vec![1], 1001),
            &["max_new_tokens", "1000", "1001"],
        ),
        (
            "temperature -1",
            sampling(SamplingParameters {
                temperature: Some(-1.0),
                ..Default::default()
            }),
            &["temperature"],
        ),
        (
            "temperature NaN",
            sampling(SamplingParameters {
                temperature: Some(f32::NAN),
                ..Default::default()
            }),
            &["temperature"],
        ),
        (
            "top_p 0",
            sampling(SamplingParameters {
                top_p: Some(0.0),
                ..Default::default()
            }),
            &["top_p"],
        ),
        (
            "top_p 1.5",
            sampling(SamplingParameters {
                top_p: Some(1.5),
                ..Default::default()
            }),
            &["top_p"],
        ),
        (
            "top_k -1",
            sampling(SamplingParameters {
                top_k: -1,
                ..Default::default()
            }),
            &["top_k must be >= 0, got -1"],
        ),
        (
            "too many stop strings",
            stopping(StoppingCriteria {
                stop: (0..9).map(|i| format!("s{i}")).collect(),
                ..Default::default()
            }),
            &["stop", "8"],
        ),
        (
            "too long stop string",
            stopping(StoppingCriteria {
                stop: vec!["x".repeat(257)],
                ..Default::default()
            }),
            &["stop", "256"],
        ),
        (
            "prompt longer than the context",
            greedy(prompt(0, CONTEXT as u32 + 1), 5),
            &["prompt", "context"],
        ),
    ];
    for (what, req, words) in bad {
        let err = w.client.clone().generate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        for word in words {
            assert!(
                err.message().contains(word),
                "{what}: {:?} lacks {word:?}",
                err.message()
            );
        }
    }
    for (call, want) in running.into_iter().zip(want) {
        assert_eq!(token_ids(&call.await.unwrap().unwrap()), want);
    }
    wait_idle(&mut w.client.clone(), PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted() {
    let mut w = start(|c| {
        c.engine = EngineConfig {
            max_running: 1,
            max_waiting: 1,
            ..Default::default()
        }
    })
    .await;
    let a = w.client.clone().generate(long(prompt(1, 5))).await.unwrap();
    wait_running(&mut w.client, 1, 0).await;
    let b = w.client.clone().generate(long(prompt(2, 5))).await.unwrap();
    wait_running(&mut w.client, 1, 1).await;
    let err = w
        .client
        .clone()
        .generate(long(prompt(3, 5)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("queue full"), "{err:?}");
    // Dropping both frees the running sequence's KV and the queue place.
    drop((a, b));
    wait_idle(&mut w.client, PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_cancels_and_frees_kv() {
    let mut w = start(with_metrics).await;
    let mut s = w
        .client
        .clone()
        .generate(long(prompt(1, 20)))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(!first.tokens.is_empty());
    // Stats are published after the step that sent the token, so poll.
    wait_running(&mut w.client, 1, 0).await;
    drop(s);
    wait_idle(&mut w.client, PATIENCE).await;
    // Cancelled, not finished: the engine counted it, and so did the request metric. The
    // server records both as it drops the stream, which can be just after the engine freed
    // the KV: poll.
    wait_metrics(
        &w,
        &[
            "tandem_worker_cancelled_sequences_total 1",
            "tandem_worker_requests_total{code=\"CANCELLED\"} 1",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_deadline_exceeded_and_frees_kv() {
    let mut w = start(with_metrics).await;
    let mut req = tonic::Request::new(long(prompt(1, 20)));
    req.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let err = match w.client.clone().generate(req).await {
        Ok(s) => collect(s.into_inner()).await.unwrap_err(),
        Err(e) => e,
    };
    let took = started.elapsed();
    eprintln!("deadline error after {took:?}: {err:?}");
    // Bounded only to catch a deadline that is not enforced (the request runs far longer).
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // tonic's client times the response headers with the same deadline: under load its timer
    // can fire before the headers arrive (CANCELLED "Timeout expired"). The deadline held
    // then too, and the worker must still free whatever it started.
    if err.code() == Code::Cancelled && err.message().contains("Timeout expired") {
        wait_idle(&mut w.client, PATIENCE).await;
        return;
    }
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The worker enforces it on the stream (tonic's client only times the response headers).
    assert!(err.message().contains("deadline passed"), "{err:?}");
    wait_idle(&mut w.client, PATIENCE).await;
    wait_metrics(
        &w,
        &[
            "tandem_worker_cancelled_sequences_total 1",
            "tandem_worker_requests_total{code=\"DEADLINE_EXCEEDED\"} 1",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_by_request_id_cancels_and_frees_kv() {
    let w = start(|_| {}).await;
    let mut req = long(prompt(1, 20));
    req.request_id = "req-7".into();
    let mut s = w.client.clone().generate(req).await.unwrap().into_inner();
    assert!(!s.message().await.unwrap().unwrap().tokens.is_empty());
    let found = |id: &str| {
        let mut c = w.client.clone();
        let id = id.to_string();
        async move {
            c.abort(AbortRequest { request_id: id })
                .await
                .unwrap()
                .into_inner()
                .found
        }
    };
    assert!(!found("no-such-request").await);
    assert!(found("req-7").await);
    let rest = collect(s).await.unwrap();
    let last = rest.last().unwrap();
    assert_eq!(last.finish_reason, FinishReason::Cancelled as i32);
    assert!(last.usage.unwrap().completion_tokens > 0);
    wait_idle(&mut w.client.clone(), PATIENCE).await;
    // The entry left with its stream.
    assert!(!found("req-7").await);
}

fn with_metrics(c: &mut WorkerConfig) {
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
}

async fn metrics(w: &Worker) -> String {
    http_get(w.handle.metrics_addr.unwrap(), "/metrics").await
}

/// Scrapes until every line in `want` is there (metrics are recorded as streams end, on other
/// threads than the client's); returns that scrape.
async fn wait_metrics(w: &Worker, want: &[&str]) -> String {
    let t = Instant::now();
    loop {
        let m = metrics(w).await;
        if want.iter().all(|l| m.contains(l)) {
            return m;
        }
        assert!(t.elapsed() < PATIENCE, "missing some of {want:?}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_worker_metrics() {
    let w = start(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = w.handle.metrics_addr.unwrap();
    collect(
        w.client
            .clone()
            .generate(greedy(prompt(1, 5), 10))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    let _ = w
        .client
        .clone()
        .generate(greedy(vec![], 5))
        .await
        .unwrap_err();
    // The engine publishes its gauges after the step that sent the last token: wait for them.
    let m = wait_metrics(
        &w,
        &[
            "tandem_worker_running_sequences 0",
            "tandem_worker_kv_tokens 0",
        ],
    )
    .await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    for name in [
        "tandem_worker_requests_total{code=\"OK\"} 1",
        "tandem_worker_requests_total{code=\"INVALID_ARGUMENT\"} 1",
        "tandem_worker_time_to_first_token_seconds_count 1",
        "tandem_worker_inter_token_latency_seconds_bucket",
        "tandem_worker_request_duration_seconds_count 1",
        "tandem_worker_output_tokens_bucket",
        "tandem_worker_model_loaded 1",
        "tandem_worker_waiting_sequences 0",
        "tandem_worker_running_sequences 0",
        "tandem_worker_kv_tokens 0",
        "tandem_worker_kv_bytes",
        "tandem_worker_generated_tokens_total",
        "tandem_worker_prompt_tokens_total",
        "tandem_worker_cancelled_sequences_total",
        "tandem_worker_engine_steps_total",
    ] {
        assert!(m.contains(name), "missing {name}:\n{m}");
    }
    assert!(http_get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_running_streams_and_refuses_new_ones() {
    // The grace only catches a hang: the stream must be able to finish on a loaded machine.
    let mut w = start(|c| c.drain_grace = Duration::from_secs(600)).await;
    // Long, so it still runs while the refusal below is checked.
    let n = LONG;
    let mut s = w
        .client
        .clone()
        .generate(long(prompt(1, 5)))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    w.handle.shutdown();
    let addr = w.handle.addr;
    let t = Instant::now();
    while health(addr, "tandem.shard.v1.Shard").await != ServingStatus::NotServing as i32 {
        assert!(t.elapsed() < PATIENCE, "still SERVING");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(health(addr, "").await, ServingStatus::NotServing as i32);
    let err = w
        .client
        .generate(greedy(prompt(2, 5), 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("draining"), "{err:?}");
    let rest = collect(s).await.unwrap();
    let total = first.tokens.len() + rest.iter().map(|m| m.tokens.len()).sum::<usize>();
    assert_eq!(total, n as usize);
    assert_eq!(
        rest.last().unwrap().finish_reason,
        FinishReason::Length as i32
    );
    tokio::time::timeout(PATIENCE, w.handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_grace_expiry_stops_what_is_left() {
    let w = start(|c| c.drain_grace = Duration::from_millis(200)).await;
    let mut s = w
        .client
        .clone()
        .generate(long(prompt(1, 5)))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    w.handle.shutdown();
    let err = collect(s).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    tokio::time::timeout(PATIENCE, w.handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_model_load_exits_with_the_error() {
    let cfg = WorkerConfig::new("/nonexistent/model.gguf", "127.0.0.1:0".parse().unwrap());
    let handle = spawn(cfg).await.unwrap();
    let err = handle.ready().await.unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/model.gguf"),
        "{err:#}"
    );
    let err = tokio::time::timeout(PATIENCE, handle.join())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("/nonexistent/model.gguf"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_until_its_shutdown_future() {
    let tiny = tiny();
    let cfg = WorkerConfig::new(&tiny.dir, "127.0.0.1:0".parse().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tandem_worker::serve(cfg, async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!task.is_finished());
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
