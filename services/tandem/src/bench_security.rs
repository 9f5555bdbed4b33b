//! `tandem bench security`: what TLS, mTLS and API keys add to latency through the router, in
//! one run. Three routers in front of the same model: plaintext (router and worker), TLS on the
//! public API, and mTLS on the public API with an API key plus mTLS from the router to its own
//! worker. Requests go one at a time, rotating which path goes first, and the report gives time
//! to first token and per-token latency of each, with the difference to plaintext. Certificates
//! are made for the run (rcgen) in a temporary folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{tokenize_request, TokenizeRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bench::{ms, percentile, via_router, Sample};
use crate::children::{self, Children};

#[derive(Debug, clap::Args)]
pub struct SecurityArgs {
    /// Model: a .gguf file or a Hugging Face folder (a small one measures the hops, not the
    /// model).
    #[arg(long)]
    pub model: PathBuf,
    /// Measured requests per path.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
    /// Unmeasured requests per path first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: u32,
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    pub prompt: String,
    #[arg(long, default_value = "10m")]
    pub ready_timeout: crate::config::Dur,
}

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and one certificate for localhost / 127.0.0.1, server and client auth.
fn pki(dir: &Path) -> anyhow::Result<Pki> {
    let ca = tandem_testkit::pki::Ca::new(dir, "bench")?;
    let (cert, key) = ca.leaf(dir, "tls")?;
    Ok(Pki {
        ca: ca.pem,
        cert,
        key,
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Path3 {
    name: &'static str,
    client: GenerationClient<Channel>,
    key: Option<String>,
    ttft: Vec<Duration>,
    per_token: Vec<Duration>,
}

async fn connect(
    addr: SocketAddr,
    tls: Option<(&Pki, bool)>,
) -> anyhow::Result<GenerationClient<Channel>> {
    let ep = match tls {
        None => Endpoint::from_shared(format!("http://{addr}"))?,
        Some((pki, client_cert)) => {
            let mut t = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca)?))
                .domain_name("localhost");
            if client_cert {
                t = t.identity(Identity::from_pem(
                    std::fs::read(&pki.cert)?,
                    std::fs::read(&pki.key)?,
                ));
            }
            Endpoint::from_shared(format!("https://{addr}"))?.tls_config(t)?
        }
    };
    Ok(GenerationClient::new(ep.connect().await?))
}

async fn one(p: &mut Path3, prompt: &[u32], max_new: u32) -> anyhow::Result<Sample> {
    via_router(&mut p.client, prompt, max_new, p.key.as_deref())
        .await
        .with_context(|| p.name)
}

pub async fn run(args: SecurityArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    let dir = tempfile::tempdir()?;
    let pki = pki(dir.path())?;
    let (api_key, entry) = tandem_router::auth::new_key("bench");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, entry)?;
    let mut children = Children::default();
    if std::env::var_os("RUST_LOG").is_none() {
        children.env("RUST_LOG", "warn");
    }
    let result = async {
        let (plain_worker, mtls_worker) = (children::free_port()?, children::free_port()?);
        let routers = [
            children::free_port()?,
            children::free_port()?,
            children::free_port()?,
        ];
        let model = s(&args.model);
        let worker = |addr: SocketAddr| {
            vec![
                "worker".to_owned(),
                "--model".to_owned(),
                model.clone(),
                "--listen".to_owned(),
                addr.to_string(),
            ]
        };
        let tls_server = |client_ca: bool| {
            let mut a = vec![
                "--tls-cert".to_owned(),
                s(&pki.cert),
                "--tls-key".to_owned(),
                s(&pki.key),
            ];
            if client_ca {
                a.extend(["--tls-client-ca".to_owned(), s(&pki.ca)]);
            }
            a
        };
        children.spawn("worker plaintext", &worker(plain_worker))?;
        children.spawn(
            "worker mtls",
            &[worker(mtls_worker), tls_server(true)].concat(),
        )?;
        let router = |addr: SocketAddr, to: SocketAddr| {
            vec![
                "router".to_owned(),
                "--listen".to_owned(),
                addr.to_string(),
                "--workers".to_owned(),
                format!("http://{to}"),
            ]
        };
        children.spawn("router plaintext", &router(routers[0], plain_worker))?;
        children.spawn(
            "router tls",
            &[router(routers[1], plain_worker), tls_server(false)].concat(),
        )?;
        children.spawn(
            "router mtls+key",
            &[
                router(routers[2], mtls_worker),
                tls_server(true),
                vec![
                    "--tls-ca".to_owned(),
                    s(&pki.ca),
                    "--tls-server-name".to_owned(),
                    "localhost".to_owned(),
                    "--api-keys".to_owned(),
                    s(&keys),
                ],
            ]
            .concat(),
        )?;
        eprintln!("bench: loading {} twice ...", args.model.display());
        children::wait_router_ready(&mut children, routers[0], 1, args.ready_timeout.0).await?;
        // The TLS servers' health needs TLS; their readiness shows in the first requests below.
        let mut paths = [
            Path3 {
                name: "plaintext",
                client: connect(routers[0], None).await?,
                key: None,
                ttft: Vec::new(),
                per_token: Vec::new(),
            },
            Path3 {
                name: "TLS",
                client: connect(routers[1], Some((&pki, false))).await?,
                key: None,
                ttft: Vec::new(),
                per_token: Vec::new(),
            },
            Path3 {
                name: "mTLS + API key (+ mTLS to the worker)",
                client: connect(routers[2], Some((&pki, true))).await?,
                key: Some(api_key.clone()),
                ttft: Vec::new(),
                per_token: Vec::new(),
            },
        ];
        let prompt = paths[0]
            .client
            .tokenize(TokenizeRequest {
                model: String::new(),
                input: Some(tokenize_request::Input::Text(args.prompt.clone())),
            })
            .await?
            .into_inner()
            .token_ids;
        // Every path answers before measuring (the mTLS worker may still be loading).
        let deadline = Instant::now() + args.ready_timeout.0;
        for p in paths.iter_mut() {
            while one(p, &prompt, 1).await.is_err() {
                anyhow::ensure!(Instant::now() < deadline, "{} never answered", p.name);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for i in 0..args.warmup + args.requests {
            // Rotate which path goes first: none always runs on a cooler machine.
            for j in 0..paths.len() {
                let k = (i + j) % paths.len();
                let sample = one(&mut paths[k], &prompt, args.max_new_tokens).await?;
                if i >= args.warmup {
                    paths[k].ttft.push(sample.ttft);
                    paths[k].per_token.extend(sample.per_token);
                }
            }
        }
        println!(
            "security overhead: {} ({} requests per path, prompt {} tokens, {} new tokens, greedy, one at a time, rotating order)",
            args.model.display(),
            args.requests,
            prompt.len(),
            args.max_new_tokens
        );
        println!(
            "| path | first token p50 (ms) | vs plaintext | per token p50 (ms) | vs plaintext |"
        );
        println!("|---|---|---|---|---|");
        let mut base = None;
        for p in paths.iter_mut() {
            p.ttft.sort();
            p.per_token.sort();
            let (t, k) = (ms(percentile(&p.ttft, 0.5)), ms(percentile(&p.per_token, 0.5)));
            let (bt, bk) = *base.get_or_insert((t, k));
            println!(
                "| {} | {t:.2} | {:+.2} | {k:.3} | {:+.3} |",
                p.name,
                t - bt,
                k - bk
            );
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    children.stop(Duration::from_secs(10)).await;
    result
}
