//! API keys on the public API, with real processes: a router with a key file in front of a
//! worker. Missing or unknown keys are UNAUTHENTICATED, a key not allowed the model is
//! PERMISSION_DENIED, a key over its request rate gets RESOURCE_EXHAUSTED with the retry delay
//! in the message and in google.rpc.RetryInfo, metrics count by key name (never the key), and a
//! key added to the file works without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{free_addr, metric_sample, scrape_metrics, Proc};
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{generate_request, GenerateRequest, ListModelsRequest, StoppingCriteria};
use tandem_testkit::{tiny_model, TinyConfig};
use tonic::{Code, Request};

fn new_key(name: &str) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["api-key", "--name", name])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let err = String::from_utf8(out.stderr).unwrap();
    let entry = err[err.find("[[key]]").expect("the file entry")..]
        .trim()
        .to_owned();
    assert!(
        !err.contains(&key),
        "the key itself must not be in the file entry"
    );
    (key, entry)
}

fn req(model: &str, key: Option<&str>) -> Request<GenerateRequest> {
    let mut r = Request::new(GenerateRequest {
        model: model.into(),
        input: Some(generate_request::Input::Text("hello".into())),
        stopping: Some(StoppingCriteria {
            max_new_tokens: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    });
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_authenticate_authorize_and_limit() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let keys_file = logs.path().join("keys.toml");
    let (full, full_entry) = new_key("full");
    let (narrow, narrow_entry) = new_key("narrow");
    let (slow, slow_entry) = new_key("slow");
    std::fs::write(
        &keys_file,
        format!(
            "{full_entry}\n\n{narrow_entry}\nmodels = [\"some-other-model\"]\n\n{slow_entry}\nrequests_per_second = 0.2\n"
        ),
    )
    .unwrap();
    let (worker_addr, router_addr, metrics) = (free_addr(), free_addr(), free_addr());
    let _worker = Proc::start(
        "worker",
        logs.path(),
        &[
            "worker".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--model-name".into(),
            "tiny".into(),
            "--listen".into(),
            worker_addr.to_string(),
        ],
    );
    let _router = Proc::start(
        "router",
        logs.path(),
        &[
            "router".into(),
            "--listen".into(),
            router_addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--workers".into(),
            format!("http://{worker_addr}"),
            "--api-keys".into(),
            keys_file.display().to_string(),
        ],
    );
    let mut c = loop {
        if let Ok(c) = GenerationClient::connect(format!("http://{router_addr}")).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // ListModels needs a key too; wait for the worker with a good one.
    let start = Instant::now();
    loop {
        let mut r = Request::new(ListModelsRequest {});
        r.metadata_mut()
            .insert("authorization", format!("Bearer {full}").parse().unwrap());
        if let Ok(m) = c.list_models(r).await {
            if m.into_inner()
                .models
                .first()
                .is_some_and(|m| m.replicas == 1)
            {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no worker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = c
        .generate(req("tiny", Some(&full)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.token_ids.len(), 2);
    for (what, r, code) in [
        ("no key", req("tiny", None), Code::Unauthenticated),
        (
            "unknown key",
            req("tiny", Some("tdm_nope")),
            Code::Unauthenticated,
        ),
        (
            "model not allowed",
            req("tiny", Some(&narrow)),
            Code::PermissionDenied,
        ),
    ] {
        let e = c.generate(r).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(!e.message().contains(&full) && !e.message().contains(&narrow));
    }
    assert_eq!(
        c.list_models(Request::new(ListModelsRequest {}))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // 0.2 requests per second: one passes, the next is told when to come back.
    c.generate(req("tiny", Some(&slow))).await.unwrap();
    let e = c.generate(req("tiny", Some(&slow))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("retry in"), "{}", e.message());
    let info = tonic_types::StatusExt::get_details_retry_info(&e).expect("RetryInfo");
    let delay = info.retry_delay.unwrap();
    assert!(
        delay > Duration::from_secs(1) && delay <= Duration::from_secs(5),
        "{delay:?}"
    );

    // A key added to the file works without a restart (checked every 5 s).
    let (late, late_entry) = new_key("late");
    let text = std::fs::read_to_string(&keys_file).unwrap();
    std::fs::write(&keys_file, format!("{text}\n{late_entry}\n")).unwrap();
    let start = Instant::now();
    while c.generate(req("tiny", Some(&late))).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the new key never worked"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Metrics by key name, never the key.
    let m = scrape_metrics(metrics).await;
    assert_eq!(
        metric_sample(
            &m,
            "tandem_router_api_key_requests_total",
            "key=\"full\",code=\"ok\""
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_sample(
            &m,
            "tandem_router_api_key_requests_total",
            "key=\"slow\",code=\"resource_exhausted\""
        ),
        Some(1.0),
        "{m}"
    );
    assert!(!m.contains(&full) && !m.contains(&slow));
}
