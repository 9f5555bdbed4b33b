//! `tandem draft` as a real process: flags reach the server, it serves health, Info and
//! Propose on its address and metrics on its own, and drains and exits 0 on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_proto::draft::v1::drafter_client::DrafterClient;
use tandem_proto::draft::v1::{InfoRequest, ProposeRequest, SequenceDraftRequest};
use tandem_testkit::{tiny_model, TinyConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod common;
use common::{free_addr, scrape_metrics, Proc};

/// The overall grpc.health.v1 status of a process, `None` when unreachable.
async fn health(addr: SocketAddr) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread")]
async fn draft_subcommand_serves_and_drains() {
    let tiny = tiny_model(&TinyConfig::qwen2()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (addr, metrics) = (free_addr(), free_addr());
    let mut p = Proc::start(
        "draft",
        logs.path(),
        &[
            "draft".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--model-name".into(),
            "tiny-draft".into(),
            "--max-sequences".into(),
            "4".into(),
            "--max-context".into(),
            "128".into(),
            "--idle-ttl".into(),
            "5m".into(),
            "--drain-grace".into(),
            "5s".into(),
        ],
    );
    let start = Instant::now();
    while health(addr).await != Some(ServingStatus::Serving as i32) {
        assert!(p.is_running(), "tandem draft exited:\n{}", p.output());
        assert!(start.elapsed() < Duration::from_secs(60), "not serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = DrafterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model, "tiny-draft");
    assert_eq!((info.context_length, info.max_sequences), (128, 4));
    let r = c
        .propose(ProposeRequest {
            sequences: vec![SequenceDraftRequest {
                sequence_id: 1,
                append: vec![1, 2, 3, 4],
                max_tokens: 3,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.sequences[0].tokens.len(), 3);
    assert_eq!(r.sequences[0].held, 6);
    let e = c
        .propose(ProposeRequest {
            sequences: (0..5)
                .map(|i| SequenceDraftRequest {
                    sequence_id: i,
                    append: vec![1],
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("at most 4"), "{e:?}");
    let m = scrape_metrics(metrics).await;
    assert!(m.contains("tandem_draft_tokens_drafted_total 3"), "{m}");

    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", p.output());
}
