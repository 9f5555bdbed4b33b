//! TLS and mTLS with real processes: a worker that only routers with a client certificate may
//! call, a router that serves its public API over TLS and requires client certificates, with
//! certificates made at run time (rcgen). Checks: a TLS client works end to end (router →
//! worker over mTLS); a plaintext client, a client without a certificate, one with a
//! certificate of another CA, and one that does not trust the server are refused; certificates
//! rotated on disk are picked up by new connections while a stream in flight goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{free_addr, Proc};
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, FinishReason, GenerateRequest, ListModelsRequest, StoppingCriteria,
};
use tandem_testkit::pki::Ca;
use tandem_testkit::{tiny_model, TinyConfig};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A connection to `addr`: trusting `ca` (plaintext without), presenting `identity` when given.
async fn channel(
    addr: std::net::SocketAddr,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, String> {
    let url = match ca {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let mut ep = Endpoint::from_shared(url).unwrap();
    if let Some(ca) = ca {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(c).unwrap(),
                std::fs::read(k).unwrap(),
            ));
        }
        ep = ep.tls_config(tls).unwrap();
    }
    ep.connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// A client of the router at `addr`.
async fn client(
    addr: std::net::SocketAddr,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<GenerationClient<Channel>, String> {
    Ok(GenerationClient::new(channel(addr, ca, identity).await?))
}

/// The worker's shard API `Info` through a fresh connection.
async fn worker_info(
    addr: std::net::SocketAddr,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<String, String> {
    let mut c =
        tandem_proto::shard::v1::shard_client::ShardClient::new(channel(addr, ca, identity).await?);
    c.info(tandem_proto::shard::v1::InfoRequest {})
        .await
        .map(|r| r.into_inner().model)
        .map_err(|e| format!("{e:?}"))
}

/// ListModels through a fresh connection: Ok(replicas) or why not.
async fn replicas(
    addr: std::net::SocketAddr,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<u32, String> {
    let mut c = client(addr, ca, identity).await?;
    let r = c
        .list_models(ListModelsRequest {})
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(r.into_inner().models.first().map_or(0, |m| m.replicas))
}

fn long_req(n: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::Text("a long story".into())),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(n),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_mtls_on_every_public_and_internal_hop() {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    let ca1 = Ca::new(dir, "one").unwrap();
    let other = Ca::new(dir, "other").unwrap();
    let (server_crt, server_key) = ca1.leaf(dir, "server").unwrap();
    let (client_crt, client_key) = ca1.leaf(dir, "client").unwrap();
    let (rogue_crt, rogue_key) = other.leaf(dir, "rogue").unwrap();

    // Slow enough that a long stream outlasts a rotation (reloads are checked every 5 s).
    let tiny = tiny_model(&TinyConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 8,
        max_position_embeddings: 4096,
        ..TinyConfig::llama()
    })
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let worker_addr = free_addr();
    let router_addr = free_addr();
    // The worker takes only callers with a certificate of CA one (routers).
    let _worker = Proc::start(
        "worker",
        logs.path(),
        &[
            "worker".into(),
            "--model".into(),
            s(&tiny.dir),
            "--listen".into(),
            worker_addr.to_string(),
            "--tls-cert".into(),
            s(&server_crt),
            "--tls-key".into(),
            s(&server_key),
            "--tls-client-ca".into(),
            s(&ca1.pem),
        ],
    );
    // The router: TLS with client certificates on its public API, mTLS to the worker. Its own
    // files are copies, so they can be rotated alone.
    let router_crt = dir.join("router.crt");
    let router_key = dir.join("router.key");
    std::fs::copy(&server_crt, &router_crt).unwrap();
    std::fs::copy(&server_key, &router_key).unwrap();
    let _router = Proc::start(
        "router",
        logs.path(),
        &[
            "router".into(),
            "--listen".into(),
            router_addr.to_string(),
            "--workers".into(),
            format!("http://{worker_addr}"),
            "--tls-cert".into(),
            s(&router_crt),
            "--tls-key".into(),
            s(&router_key),
            "--tls-client-ca".into(),
            s(&ca1.pem),
            "--tls-ca".into(),
            s(&ca1.pem),
            "--tls-server-name".into(),
            "localhost".into(),
        ],
    );
    let me = Some((client_crt.as_path(), client_key.as_path()));

    // A TLS client with a certificate works, through the router's mTLS hop to the worker.
    let start = Instant::now();
    loop {
        match replicas(router_addr, Some(&ca1.pem), me).await {
            Ok(1) => break,
            r => assert!(
                start.elapsed() < Duration::from_secs(120),
                "the router never listed the TLS worker: {r:?}\nrouter log: {}",
                std::fs::read_to_string(logs.path().join("router.log")).unwrap_or_default()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = client(router_addr, Some(&ca1.pem), me).await.unwrap();
    let out = c
        .generate(long_req(8))
        .await
        .expect("generate over TLS")
        .into_inner();
    assert_eq!(out.token_ids.len(), 8);

    // Refused: plaintext; no client certificate; a certificate of another CA; a client that
    // does not trust the server's CA.
    let refused = [
        ("plaintext", replicas(router_addr, None, None).await),
        (
            "no client certificate",
            replicas(router_addr, Some(&ca1.pem), None).await,
        ),
        (
            "a client certificate of another CA",
            replicas(
                router_addr,
                Some(&ca1.pem),
                Some((rogue_crt.as_path(), rogue_key.as_path())),
            )
            .await,
        ),
        (
            "a client that trusts another CA",
            replicas(router_addr, Some(&other.pem), me).await,
        ),
    ];
    for (what, r) in refused {
        assert!(r.is_err(), "{what}: accepted ({r:?})");
    }
    // The shard API takes only callers with a certificate of the cluster's CA (routers).
    worker_info(worker_addr, Some(&ca1.pem), me)
        .await
        .expect("a caller with the cluster's certificate");
    for (what, r) in [
        ("plaintext", worker_info(worker_addr, None, None).await),
        (
            "no certificate",
            worker_info(worker_addr, Some(&ca1.pem), None).await,
        ),
        (
            "another CA's certificate",
            worker_info(
                worker_addr,
                Some(&ca1.pem),
                Some((rogue_crt.as_path(), rogue_key.as_path())),
            )
            .await,
        ),
    ] {
        assert!(r.is_err(), "the worker accepted {what}: {r:?}");
    }

    // Rotation: a stream runs while the router's certificate is replaced by one of another CA.
    let mut stream = c
        .generate_stream(long_req(4000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().token_ids.len();
    let reader = tokio::spawn(async move {
        let (mut tokens, mut finish) = (first, None);
        while let Some(m) = stream
            .message()
            .await
            .expect("the stream survives the rotation")
        {
            tokens += m.token_ids.len();
            if m.finish_reason != 0 {
                finish = Some(m.finish_reason);
            }
        }
        (tokens, finish, Instant::now())
    });
    let ca2 = Ca::new(dir, "two").unwrap();
    let (new_crt, new_key) = ca2.leaf(dir, "rotated").unwrap();
    std::fs::copy(&new_key, &router_key).unwrap();
    std::fs::copy(&new_crt, &router_crt).unwrap();
    // New connections get the new certificate within the reload period (5 s).
    let start = Instant::now();
    loop {
        if replicas(router_addr, Some(&ca2.pem), me).await == Ok(1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rotated = Instant::now();
    assert!(
        replicas(router_addr, Some(&ca1.pem), me).await.is_err(),
        "new connections still get the old certificate"
    );
    // The stream started before the rotation was still running after it, and ends normally
    // with every token delivered.
    let (tokens, finish, ended) = reader.await.unwrap();
    assert!(
        ended > rotated,
        "the stream ended before the rotation took effect: the test's model is too fast"
    );
    assert_eq!(tokens, 4000);
    assert_eq!(finish, Some(FinishReason::Length as i32));
}
