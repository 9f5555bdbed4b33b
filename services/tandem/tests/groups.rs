//! Tensor-parallel worker groups as real processes: `tandem worker --rank R --world-size N
//! --group-peers ...` on 127.0.0.1, behind real routers, on tiny test-kit models.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_proto::shard::v1::shard_client::ShardClient;
use tandem_proto::shard::v1::InfoRequest;
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, GenerateRequest, GenerateResponse, ListModelsRequest, StoppingCriteria,
};
use tandem_testkit::{tiny_model, TinyConfig};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod common;
use common::{free_addr, Proc};

/// A group of `tp` worker processes (tp 1: a plain worker). `addrs[0]` is the leader's shard API.
struct Group {
    procs: Vec<Proc>,
    addrs: Vec<SocketAddr>,
}

impl Group {
    fn start(model: &Path, tp: usize, logs: &Path, name: &str) -> Group {
        let addrs: Vec<SocketAddr> = (0..tp).map(|_| free_addr()).collect();
        let peers: Vec<String> = (0..tp).map(|_| free_addr().to_string()).collect();
        let procs = (0..tp)
            .map(|rank| {
                let mut args = vec![
                    "worker".to_owned(),
                    "--model".to_owned(),
                    model.display().to_string(),
                    "--listen".to_owned(),
                    addrs[rank].to_string(),
                ];
                if tp > 1 {
                    args.extend([
                        "--rank".to_owned(),
                        rank.to_string(),
                        "--world-size".to_owned(),
                        tp.to_string(),
                        "--group-peers".to_owned(),
                        peers.join(","),
                    ]);
                }
                Proc::start(&format!("{name} rank {rank}"), logs, &args)
            })
            .collect();
        Group { procs, addrs }
    }

    fn leader(&self) -> SocketAddr {
        self.addrs[0]
    }
}

fn router(name: &str, addr: SocketAddr, workers: &[SocketAddr], logs: &Path) -> Proc {
    let urls: Vec<String> = workers.iter().map(|a| format!("http://{a}")).collect();
    Proc::start(
        name,
        logs,
        &[
            "router".into(),
            "--listen".into(),
            addr.to_string(),
            "--workers".into(),
            urls.join(","),
            "--poll-interval".into(),
            "250ms".into(),
        ],
    )
}

async fn client(addr: SocketAddr) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Waits until the router at `addr` reports `n` usable replicas.
async fn wait_replicas(addr: SocketAddr, n: usize, timeout: Duration) {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = GenerationClient::connect(format!("http://{addr}")).await {
            if let Ok(r) = c.list_models(ListModelsRequest {}).await {
                if r.into_inner()
                    .models
                    .first()
                    .is_some_and(|m| m.replicas as usize == n)
                {
                    return;
                }
            }
        }
        assert!(
            start.elapsed() < timeout,
            "router {addr} did not report {n} replicas within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The overall grpc.health.v1 status of a process, `None` when unreachable.
async fn health(addr: SocketAddr) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut c = HealthClient::new(channel);
    c.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

/// Exactly `n` tokens, EOS ignored.
fn req(text: &str, n: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Text(text.into())),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(n),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn generate(c: &mut GenerationClient<Channel>, r: GenerateRequest) -> GenerateResponse {
    c.generate(r).await.unwrap().into_inner()
}

/// 6 heads / 6 KV heads, hidden 96, intermediate 192: divides by 2 and by 3.
fn tiny_6_heads() -> TinyConfig {
    TinyConfig {
        hidden_size: 96,
        intermediate_size: 192,
        num_heads: 6,
        num_kv_heads: 6,
        ..TinyConfig::llama()
    }
}

const PROMPTS: [&str; 4] = [
    "hello",
    "tensor parallel groups",
    "the quick brown fox jumps over the lazy dog",
    "1 2 3 4 5 6 7 8",
];

#[tokio::test(flavor = "multi_thread")]
async fn tp2_and_tp3_groups_equal_one_rank() {
    let tiny = tiny_model(&tiny_6_heads()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let single = Group::start(&tiny.dir, 1, logs.path(), "tp1");
    let tp2 = Group::start(&tiny.dir, 2, logs.path(), "tp2");
    let tp3 = Group::start(&tiny.dir, 3, logs.path(), "tp3");
    let ref_addr = free_addr();
    let _ref_router = router("router tp1", ref_addr, &[single.leader()], logs.path());
    let tp_addr = free_addr();
    let _tp_router = router(
        "router tp",
        tp_addr,
        &[tp2.leader(), tp3.leader()],
        logs.path(),
    );
    wait_replicas(ref_addr, 1, Duration::from_secs(120)).await;
    wait_replicas(tp_addr, 2, Duration::from_secs(120)).await;

    // The leaders report their group size; followers serve health only.
    for (g, tp) in [(&tp2, 2), (&tp3, 3)] {
        let mut s = ShardClient::connect(format!("http://{}", g.leader()))
            .await
            .unwrap();
        let info = s.info(InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.tp_size, tp);
        for &a in &g.addrs[1..] {
            assert_eq!(health(a).await, Some(ServingStatus::Serving as i32));
            let mut f = ShardClient::connect(format!("http://{a}")).await.unwrap();
            let e = f.info(InfoRequest {}).await.unwrap_err();
            assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
        }
    }

    let mut reference = client(ref_addr).await;
    let mut want = Vec::new();
    for p in PROMPTS {
        want.push(generate(&mut reference, req(p, 24)).await.token_ids);
    }

    // Each group directly (a router over one leader each), then both behind one router at once.
    for (name, leader) in [("tp2", tp2.leader()), ("tp3", tp3.leader())] {
        let addr = free_addr();
        let _r = router(&format!("router {name}"), addr, &[leader], logs.path());
        wait_replicas(addr, 1, Duration::from_secs(60)).await;
        let mut c = client(addr).await;
        for (p, w) in PROMPTS.iter().zip(&want) {
            assert_eq!(
                &generate(&mut c, req(p, 24)).await.token_ids,
                w,
                "{name}: {p}"
            );
        }
    }
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (i, p) in PROMPTS.iter().enumerate() {
            let mut c = client(tp_addr).await;
            let w = want[i].clone();
            tasks.push(tokio::spawn(async move {
                let got = generate(&mut c, req(p, 24)).await.token_ids;
                assert_eq!(got, w, "round {round}: {p}");
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_follower_fails_the_group_fast_and_the_router_moves_on() {
    // Slow enough that a long generation is still running when the follower dies.
    let tiny = tiny_model(&TinyConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        max_position_embeddings: 4096,
        ..TinyConfig::llama()
    })
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut group = Group::start(&tiny.dir, 2, logs.path(), "tp2");
    let single_addr = free_addr();
    let router_addr = free_addr();
    // The router knows both replicas; the single worker starts only after the group failed, so
    // the long stream below goes to the group, and afterwards only the single worker can serve.
    let mut router = router(
        "router",
        router_addr,
        &[group.leader(), single_addr],
        logs.path(),
    );
    wait_replicas(router_addr, 1, Duration::from_secs(120)).await;

    let mut c = client(router_addr).await;
    let expected = generate(&mut c, req("still here", 8)).await.token_ids;
    let mut stream = c
        .generate_stream(req("a long one", 3000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!first.token_ids.is_empty() || !first.text.is_empty());

    // The follower dies mid-stream (the stream has thousands of tokens to go).
    group.procs[1].kill();
    let killed = Instant::now();
    // Fails rather than hangs; the bound only catches a hang (under load the leader and the
    // router may take a while to see the closed connection and pass the error on).
    let patience = Duration::from_secs(30);
    let err = loop {
        match tokio::time::timeout(patience, stream.message()).await {
            Err(_) => panic!("the stream neither failed nor ended within {patience:?} of the kill"),
            Ok(Ok(Some(_))) => assert!(killed.elapsed() < patience),
            Ok(Ok(None)) => panic!("the stream ended cleanly after its follower died"),
            Ok(Err(e)) => break e,
        }
    };
    eprintln!("the stream failed {:?} after the kill", killed.elapsed());
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The leader stays up and says NOT_SERVING; its shard API refuses with the reason.
    let start = Instant::now();
    while health(group.leader()).await != Some(ServingStatus::NotServing as i32) {
        assert!(
            start.elapsed() < patience,
            "the leader still reports {:?}",
            health(group.leader()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(group.procs[0].is_running(), "the leader must keep running");
    let mut shard = ShardClient::connect(format!("http://{}", group.leader()))
        .await
        .unwrap();
    let refused = shard
        .generate(tandem_proto::shard::v1::GenerateRequest {
            request_id: "after-the-kill".into(),
            prompt: vec![1, 2, 3],
            sampling: None,
            stopping: Some(StoppingCriteria {
                max_new_tokens: Some(4),
                ..Default::default()
            }),
            speculation: None,
        })
        .await;
    let Err(e) = refused else {
        panic!("a failed group must refuse work");
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("tensor-parallel group failed"),
        "{e:?}"
    );
    // The router takes the failed group out of rotation.
    wait_replicas(router_addr, 0, Duration::from_secs(60)).await;

    // A single worker comes up: the router moves on to it (the group refuses all work, so
    // every request served now is the single worker's).
    let single = Proc::start(
        "tp1 rank 0",
        logs.path(),
        &[
            "worker".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--listen".into(),
            single_addr.to_string(),
        ],
    );
    wait_replicas(router_addr, 1, Duration::from_secs(120)).await;
    for _ in 0..5 {
        assert_eq!(
            generate(&mut c, req("still here", 8)).await.token_ids,
            expected
        );
    }
    assert!(router.is_running());
    drop(single);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_leader_ends_the_whole_group_cleanly() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut group = Group::start(&tiny.dir, 2, logs.path(), "tp2");
    let start = Instant::now();
    while health(group.leader()).await != Some(ServingStatus::Serving as i32) {
        assert!(start.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Leader drains and ends the group; the follower follows it out with success.
    group.procs[0].sigterm();
    let s0 = group.procs[0].wait_exit(Duration::from_secs(30)).await;
    assert!(s0.success(), "leader: {s0}\n{}", group.procs[0].output());
    let s1 = group.procs[1].wait_exit(Duration::from_secs(30)).await;
    // The leader's engine ended the group with a shutdown plan: the follower exits with success.
    assert!(s1.success(), "follower: {s1}\n{}", group.procs[1].output());
    assert!(group.procs[1]
        .output()
        .contains("the leader ended the group"));
}

#[tokio::test(flavor = "multi_thread")]
async fn up_with_heads_that_do_not_divide_fails_clearly() {
    let tiny = tiny_model(&TinyConfig {
        hidden_size: 96,
        intermediate_size: 192,
        num_heads: 3,
        num_kv_heads: 3,
        ..TinyConfig::llama()
    })
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut up = Proc::start(
        "up",
        logs.path(),
        &[
            "up".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--tp".into(),
            "2".into(),
            "--listen".into(),
            free_addr().to_string(),
        ],
    );
    let status = up.wait_exit(Duration::from_secs(60)).await;
    let out = up.output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("not divisible by tensor-parallel size 2"),
        "{out}"
    );
    assert!(out.contains("--tp 1"), "{out}");
}
