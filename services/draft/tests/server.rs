//! The draft server in-process on 127.0.0.1:0 with a tiny testkit model, called through a real
//! tonic client: health, Info, Propose (equal to the core's own answers, also under concurrent
//! callers), Release, refusals with their status codes, metrics, drain.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_draft::{spawn, CoreConfig, DraftConfig, DraftCore, DraftHandle};
use tandem_model::{LoadOptions, Model};
use tandem_proto::draft::v1::drafter_client::DrafterClient;
use tandem_proto::draft::v1::{InfoRequest, ProposeRequest, ReleaseRequest, SequenceDraftRequest};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Server {
    handle: DraftHandle,
    client: DrafterClient<Channel>,
    tiny: TinyModel,
}

async fn start(edit: impl FnOnce(&mut DraftConfig)) -> Server {
    let tiny = tiny_model(&TinyConfig::qwen2()).unwrap();
    let mut cfg = DraftConfig::new(&tiny.dir, "127.0.0.1:0".parse().unwrap());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    edit(&mut cfg);
    let handle = spawn(cfg).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), handle.ready())
        .await
        .unwrap()
        .unwrap();
    let client = DrafterClient::connect(format!("http://{}", handle.addr))
        .await
        .unwrap();
    Server {
        handle,
        client,
        tiny,
    }
}

fn prompt(i: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|j| (i * 31 + j * 7 + 1) % 300)
        .collect()
}

fn seq(id: u64, rollback_to: u32, append: Vec<u32>, max_tokens: u32) -> SequenceDraftRequest {
    SequenceDraftRequest {
        sequence_id: id,
        rollback_to,
        append,
        max_tokens,
        ..Default::default()
    }
}

fn req(sequences: Vec<SequenceDraftRequest>) -> ProposeRequest {
    ProposeRequest { sequences }
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
async fn serves_info_propose_release_health_and_metrics() {
    let mut s = start(|_| {}).await;
    let model = Model::load(&s.tiny.dir, &LoadOptions::default()).unwrap();
    let hash = model.text.vocab_hash();
    let mut reference = DraftCore::new(model, CoreConfig::default());

    // Health: SERVING overall and for the Drafter service.
    let mut health = HealthClient::new(
        Channel::from_shared(format!("http://{}", s.handle.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for service in ["", "tandem.draft.v1.Drafter"] {
        let st = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(st, ServingStatus::Serving as i32, "{service}");
    }

    // Server reflection lists the Drafter (grpcurl needs nothing local), not other services.
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let channel = Channel::from_shared(format!("http://{}", s.handle.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new(channel)
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
            names.contains(&"tandem.draft.v1.Drafter".to_string()),
            "{names:?}"
        );
        assert!(
            names.contains(&"grpc.health.v1.Health".to_string()),
            "{names:?}"
        );
        assert!(
            !names.contains(&"tandem.shard.v1.Shard".to_string()),
            "{names:?}"
        );
    }

    let info = s.client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        info.model,
        s.tiny.dir.file_stem().unwrap().to_string_lossy()
    );
    assert_eq!(info.tokenizer_hash, hash);
    assert_eq!(info.vocab_size, 304);
    assert_eq!(info.context_length, 512);
    assert_eq!((info.max_sequences, info.max_draft_tokens), (256, 16));
    assert!(!info.version.is_empty());

    // Propose: the same answers as the core alone.
    let r1 = req(vec![seq(1, 0, prompt(1, 9), 5), seq(2, 0, prompt(2, 4), 3)]);
    let got = s.client.propose(r1.clone()).await.unwrap().into_inner();
    assert_eq!(got, reference.propose(&r1).unwrap());
    assert_eq!(got.sequences[0].tokens.len(), 5);
    assert_eq!(got.sequences[0].held, 13);
    let r2 = req(vec![seq(1, 11, vec![7], 4)]);
    let got = s.client.propose(r2.clone()).await.unwrap().into_inner();
    assert_eq!(got, reference.propose(&r2).unwrap());

    // Release: the sequence is unknown afterwards.
    s.client
        .release(ReleaseRequest {
            sequence_ids: vec![1, 12345],
        })
        .await
        .unwrap();
    let got = s
        .client
        .propose(req(vec![seq(1, 5, vec![], 2)]))
        .await
        .unwrap()
        .into_inner();
    assert!(got.sequences[0].unknown);

    // INVALID_ARGUMENT names the field and the limit.
    let e = s
        .client
        .propose(req(vec![seq(3, 0, prompt(3, 4), 17)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("sequences[0].max_tokens is 17") && e.message().contains("16"),
        "{e:?}"
    );
    let e = s
        .client
        .propose(req(vec![seq(3, 0, vec![1, 304], 2)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("append[1]"), "{e:?}");

    let m = http_get(s.handle.metrics_addr.unwrap(), "/metrics").await;
    for want in [
        "tandem_draft_proposals_total{code=\"OK\"} 3",
        "tandem_draft_proposals_total{code=\"INVALID_ARGUMENT\"} 2",
        "tandem_draft_sequences_proposed_total 4",
        "tandem_draft_tokens_drafted_total 12",
        "tandem_draft_unknown_sequences_total 1",
        "tandem_draft_released_sequences_total 1",
        "tandem_draft_sequences_held 1",
        "tandem_draft_model_loaded 1",
        "tandem_draft_propose_latency_seconds_count 5",
        "tandem_draft_forwards_per_call_count 3",
    ] {
        assert!(m.contains(want), "metrics lack '{want}':\n{m}");
    }

    s.handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), s.handle.join())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_get_their_own_answers() {
    let s = start(|_| {}).await;
    let model = Model::load(&s.tiny.dir, &LoadOptions::default()).unwrap();
    let mut reference = DraftCore::new(model, CoreConfig::default());
    let reqs: Vec<ProposeRequest> = (0..12u64)
        .map(|i| req(vec![seq(i, 0, prompt(i as u32, 3 + i as usize), 6)]))
        .collect();
    let calls = reqs.iter().cloned().map(|r| {
        let mut c = s.client.clone();
        tokio::spawn(async move { c.propose(r).await.unwrap().into_inner() })
    });
    let got = futures_join(calls).await;
    for (r, g) in reqs.iter().zip(got) {
        assert_eq!(g, reference.propose(r).unwrap());
    }
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let s = start(|c| c.max_message_bytes = 1024).await;
    let e = s
        .client
        .clone()
        .propose(req(vec![seq(1, 0, vec![300; 600], 2)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // A small one still works.
    let ok = s
        .client
        .clone()
        .propose(req(vec![seq(1, 0, vec![5; 4], 2)]))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().sequences[0].tokens.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_fails_ready_and_join() {
    let cfg = DraftConfig::new("/nonexistent/model.gguf", "127.0.0.1:0".parse().unwrap());
    let handle = spawn(cfg).await.unwrap();
    let e = handle.ready().await.unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
    assert!(handle.join().await.is_err());
}
