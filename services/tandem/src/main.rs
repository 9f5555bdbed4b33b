//! `tandem`: every Tandem role in one binary (one container image).
//!
//! - `tandem worker`: one worker (group leader) serving the shard API over a model;
//! - `tandem router`: the public gRPC API in front of workers;
//! - `tandem draft`: the draft model service of speculative decoding;
//! - `tandem up`: a whole cluster on this machine (workers and a router as child processes);
//! - `tandem generate`: a command-line client that streams a completion;
//! - `tandem bench router-overhead`: the router's added latency, measured.
//!
//! Settings come from flags, then `TANDEM_<SUBCOMMAND>_<FLAG>` environment variables, then the
//! TOML file given by `--config` / `TANDEM_CONFIG` (see `config.rs`), then defaults.

mod bench;
mod bench_device;
mod bench_routing;
mod bench_security;
mod bench_spec;
mod children;
mod config;
mod generate;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::config::{
    layer, CollectiveArg, DeviceArg, DraftCatchUp, DraftLength, Dur, FileConfig, Quant,
    SpeculationArg,
};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Distributed LLM inference: router, workers, client"
)]
struct Cli {
    /// TOML config file; its values apply where no flag or environment variable is set.
    #[arg(long, global = true, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of text (`--log-json=false` overrides the file).
    #[arg(
        long,
        global = true,
        env = "TANDEM_LOG_JSON",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    log_json: Option<bool>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the flag structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a model as a worker (the shard API that routers call).
    Worker(WorkerArgs),
    /// Serve the public API (tandem.v1.Generation) in front of workers.
    Router(RouterArgs),
    /// Serve a small draft model for speculative decoding (tandem.draft.v1.Drafter).
    Draft(DraftArgs),
    /// Run workers and a router on this machine until Ctrl-C.
    Up(UpArgs),
    /// Stream a completion from a router to stdout.
    Generate(generate::GenerateArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// Write a random-weight model of a real shape (for `bench device` where real weights
    /// cannot be fetched, e.g. scripts/gpu-check).
    MakeModel(bench_device::MakeModelArgs),
    /// Make a new API key: prints the key (give it to the client) and the entry for the
    /// router's --api-keys file (which holds only its digest).
    ApiKey {
        /// The key's name, shown in metrics and logs.
        #[arg(long)]
        name: String,
    },
}

/// `tandem worker` flags; also the `[worker]` section of the config file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerArgs {
    /// Model: a Hugging Face folder (config.json, safetensors, tokenizer.json) or a .gguf file.
    #[arg(long, env = "TANDEM_WORKER_MODEL")]
    pub model: Option<PathBuf>,
    /// Shard API address [default: 0.0.0.0:50061].
    #[arg(long, env = "TANDEM_WORKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus endpoint address (/metrics) [default: none].
    #[arg(long, env = "TANDEM_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Model name reported to routers [default: from the model's file or folder name].
    #[arg(long, env = "TANDEM_WORKER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// How to run a GGUF file's weights [default: quantized].
    #[arg(long, value_enum, env = "TANDEM_WORKER_QUANT")]
    pub quant: Option<Quant>,
    /// Where the model runs: cpu, cuda or cuda:N [default: cpu]. In a group, `cuda` puts rank r
    /// on GPU r % GPUs (one GPU per pod: GPU 0). Needs the GPU binary (scripts/build-cuda).
    #[arg(long, env = "TANDEM_WORKER_DEVICE")]
    pub device: Option<DeviceArg>,
    /// How a GPU group's ranks sum activations [default: auto = NCCL on GPUs].
    #[arg(long, value_enum, env = "TANDEM_WORKER_COLLECTIVE")]
    pub collective: Option<CollectiveArg>,
    /// Cap the context length below the model's own [default: the model's].
    #[arg(long, env = "TANDEM_WORKER_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Most tokens (prefill + decode) in one forward.
    #[arg(long, env = "TANDEM_WORKER_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, env = "TANDEM_WORKER_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Longest a request waits to start before RESOURCE_EXHAUSTED (an overload answered at
    /// once instead of minutes later); 0 = no limit [default: 60s].
    #[arg(long, env = "TANDEM_WORKER_MAX_QUEUE_TIME")]
    pub max_queue_time: Option<Dur>,
    /// Most requests waiting; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TANDEM_WORKER_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Largest max_new_tokens accepted.
    #[arg(long, env = "TANDEM_WORKER_MAX_NEW_TOKENS_LIMIT")]
    pub max_new_tokens_limit: Option<usize>,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "TANDEM_WORKER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// HTTP/2 concurrent streams per connection.
    #[arg(long, env = "TANDEM_WORKER_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// How long SIGTERM waits for running sequences (e.g. 30s).
    #[arg(long, env = "TANDEM_WORKER_DRAIN_GRACE")]
    pub drain_grace: Option<Dur>,
    /// This process's rank in its tensor-parallel group: 0 serves the shard API (the leader),
    /// others only follow it and serve health [default: 0].
    #[arg(long, env = "TANDEM_WORKER_RANK")]
    pub rank: Option<usize>,
    /// Ranks in the tensor-parallel group [default: 1, no group].
    #[arg(long, env = "TANDEM_WORKER_WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// Collective addresses of every rank, in rank order, comma separated (HOST:PORT); rank R
    /// listens on the R-th. The same list on every rank.
    #[arg(long, env = "TANDEM_WORKER_GROUP_PEERS", value_delimiter = ',')]
    pub group_peers: Option<Vec<String>>,
    /// How long ranks wait for each other to start [default: 60s].
    #[arg(long, env = "TANDEM_WORKER_GROUP_CONNECT_TIMEOUT")]
    pub group_connect_timeout: Option<Dur>,
    /// Once loaded, how long a silent rank may stall a step before the group fails [default: 10s].
    #[arg(long, env = "TANDEM_WORKER_GROUP_IO_TIMEOUT")]
    pub group_io_timeout: Option<Dur>,
    /// Draft service to pair with for speculative decoding (http://host:port; the leader calls
    /// it). Its tokenizer must be this model's [default: none].
    #[arg(long, env = "TANDEM_WORKER_DRAFT_ENDPOINT")]
    pub draft_endpoint: Option<String>,
    /// Deadline of one draft call; past it the step decodes without drafts [default: 1500ms].
    #[arg(long, env = "TANDEM_WORKER_DRAFT_TIMEOUT")]
    pub draft_timeout: Option<Dur>,
    /// The draft stops drafting a sequence when its top probability falls below this
    /// [default: 0.3].
    #[arg(long, env = "TANDEM_WORKER_DRAFT_MIN_CONFIDENCE")]
    pub draft_min_confidence: Option<f32>,
    /// How a sequence's context first reaches the draft: `background` (steps decode without
    /// drafts until it is in; for a draft on shared CPUs) or `inline` (the step waits for the
    /// draft's prefill; for a draft on its own fast hardware) [default: background].
    #[arg(long, value_enum, env = "TANDEM_WORKER_DRAFT_CATCH_UP")]
    pub draft_catch_up: Option<DraftCatchUp>,
    /// Speculation for requests that leave it to the server [default: draft-model with
    /// --draft-endpoint, else off].
    #[arg(long, value_enum, env = "TANDEM_WORKER_SPECULATION")]
    pub speculation: Option<SpeculationArg>,
    /// Most drafted tokens per sequence per step when a request leaves it unset [default: 8].
    #[arg(long, env = "TANDEM_WORKER_MAX_DRAFT_TOKENS")]
    pub max_draft_tokens: Option<usize>,
    /// Draft length: `adaptive` (the cost model picks it from measured costs and acceptance,
    /// down to none) or `fixed` (always the most allowed, for comparison) [default: adaptive].
    #[arg(long, value_enum, env = "TANDEM_WORKER_DRAFT_LENGTH")]
    pub draft_length: Option<DraftLength>,
    /// Candidate drafts per step when a request leaves it unset (multi-candidate drafting; each
    /// extra candidate is scored in the same forward) [default: 1].
    #[arg(long, env = "TANDEM_WORKER_DRAFT_CANDIDATES")]
    pub draft_candidates: Option<usize>,
    /// etcd endpoints, comma separated (http://HOST:2379): the group leader registers there so
    /// routers find it; ranks of a group without --group-peers meet there [default: none].
    #[arg(long, env = "TANDEM_WORKER_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Cluster name: etcd keys live under /tandem/v1/<cluster>/ [default: default].
    #[arg(long, env = "TANDEM_WORKER_CLUSTER")]
    pub cluster: Option<String>,
    /// CA of etcd's server certificate: talk to etcd over TLS [default: plaintext].
    #[arg(long, env = "TANDEM_WORKER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd with --client-cert-auth.
    #[arg(long, env = "TANDEM_WORKER_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TANDEM_WORKER_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// HOST:PORT that routers should dial for this worker [default: the listen address].
    #[arg(long, env = "TANDEM_WORKER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Group id in etcd [default: derived from the advertise address].
    #[arg(long, env = "TANDEM_WORKER_GROUP")]
    pub group: Option<String>,
    /// This server's TLS certificate chain (PEM); with --tls-key the API is served over TLS
    /// only. Re-read when the file changes (rotation keeps open streams) [default: plaintext].
    #[arg(long, env = "TANDEM_WORKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_WORKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS) [default: no client certificates].
    #[arg(long, env = "TANDEM_WORKER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Call the draft service over TLS, trusting this CA (its server certificate); --tls-cert/--tls-key are then this worker's client certificate [default: plaintext].
    #[arg(long, env = "TANDEM_WORKER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the servers' certificates must carry when it is not the host dialled (pods
    /// are dialled by IP) [default: the host].
    #[arg(long, env = "TANDEM_WORKER_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Shut down when stdin closes: children of `tandem up` die with their parent.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub exit_on_stdin_eof: bool,
}

impl WorkerArgs {
    fn layer(&mut self, mut file: WorkerArgs) {
        layer!(
            self,
            file,
            [
                model,
                listen,
                metrics_listen,
                model_name,
                quant,
                device,
                collective,
                max_context,
                max_batch_tokens,
                max_running,
                max_queue_time,
                max_waiting,
                max_new_tokens_limit,
                max_message_bytes,
                max_concurrent_streams,
                drain_grace,
                rank,
                world_size,
                group_peers,
                group_connect_timeout,
                group_io_timeout,
                draft_endpoint,
                draft_timeout,
                draft_min_confidence,
                draft_catch_up,
                speculation,
                max_draft_tokens,
                draft_length,
                draft_candidates,
                etcd_endpoints,
                cluster,
                etcd_ca,
                etcd_cert,
                etcd_key,
                advertise_address,
                group,
                tls_cert,
                tls_key,
                tls_client_ca,
                tls_ca,
                tls_server_name,
            ]
        );
    }

    fn discovery(&self) -> Option<tandem_worker::WorkerDiscovery> {
        let endpoints = self.etcd_endpoints.clone().unwrap_or_default();
        if endpoints.iter().all(|e| e.trim().is_empty()) {
            return None;
        }
        Some(tandem_worker::WorkerDiscovery {
            etcd_endpoints: endpoints,
            cluster: cluster_name(self.cluster.as_deref()),
            advertise: self.advertise_address.clone(),
            group: self.group.clone(),
            etcd_tls: etcd_tls(&self.etcd_ca, &self.etcd_cert, &self.etcd_key),
        })
    }

    /// The group settings: `None` for world size 1 (no group).
    fn group_config(&self) -> anyhow::Result<Option<tandem_worker::GroupConfig>> {
        let world_size = self.world_size.unwrap_or(1);
        let rank = self.rank.unwrap_or(0);
        anyhow::ensure!(world_size >= 1, "--world-size must be at least 1");
        if world_size == 1 {
            anyhow::ensure!(rank == 0, "--rank {rank} needs --world-size above {rank}");
            return Ok(None);
        }
        let peers = self.group_peers.clone().unwrap_or_default();
        let etcd = self.discovery().is_some();
        // No peer list but etcd: the ranks meet through etcd rendezvous keys.
        let etcd_rendezvous = peers.is_empty() && etcd;
        if etcd_rendezvous {
            anyhow::ensure!(
                self.group.as_deref().is_some_and(|g| !g.trim().is_empty()),
                "--world-size {world_size} with --etcd-endpoints and no --group-peers: the ranks meet through etcd and need the same --group NAME on every rank (TANDEM_WORKER_GROUP)"
            );
        } else {
            anyhow::ensure!(
                peers.len() == world_size,
                "--world-size {world_size} needs --group-peers with {world_size} HOST:PORT addresses (one per rank, rank order; TANDEM_WORKER_GROUP_PEERS or group_peers in the [worker] section), or --etcd-endpoints and --group to meet through etcd; got {} addresses",
                peers.len()
            );
        }
        let peers = peers
            .iter()
            .map(|p| {
                use std::net::ToSocketAddrs as _;
                p.to_socket_addrs()
                    .with_context(|| format!("resolving group peer {p}"))?
                    .next()
                    .with_context(|| format!("group peer {p} resolves to no address"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut g = tandem_worker::GroupConfig::new(rank, world_size, peers);
        g.etcd_rendezvous = etcd_rendezvous;
        if let Some(t) = self.group_connect_timeout {
            g.connect_timeout = t.0;
        }
        if let Some(t) = self.group_io_timeout {
            anyhow::ensure!(!t.0.is_zero(), "group_io_timeout must be above 0");
            g.io_timeout = t.0;
        }
        g.validate()?;
        Ok(Some(g))
    }

    fn into_config(self) -> anyhow::Result<tandem_worker::WorkerConfig> {
        let group = self.group_config()?;
        let discovery = self.discovery();
        let model = self.model.context(
            "no model: pass --model PATH (a .gguf file or a Hugging Face folder), set TANDEM_WORKER_MODEL, or set model in the [worker] section of the config file",
        )?;
        let listen = self.listen.unwrap_or_else(|| ([0, 0, 0, 0], 50061).into());
        let mut cfg = tandem_worker::WorkerConfig::new(model, listen);
        cfg.metrics_listen = self.metrics_listen;
        if let Some(name) = self.model_name {
            cfg.model_name = Some(name);
        }
        if let Some(q) = self.quant {
            cfg.quant = q.into();
        }
        if let Some(d) = self.device {
            cfg.device = d.0;
        }
        if let Some(c) = self.collective {
            cfg.collective = c.into();
        }
        if let Some(c) = self.max_context {
            cfg.max_context = Some(c);
        }
        if let Some(v) = self.max_batch_tokens {
            cfg.engine.max_batch_tokens = v;
        }
        if let Some(v) = self.max_running {
            cfg.engine.max_running = v;
        }
        if let Some(v) = self.max_waiting {
            cfg.engine.max_waiting = v;
        }
        if let Some(v) = self.max_queue_time {
            cfg.engine.max_queue_time = (!v.0.is_zero()).then_some(v.0);
        }
        if let Some(v) = self.max_new_tokens_limit {
            cfg.max_new_tokens_limit = v;
        }
        if let Some(v) = self.max_message_bytes {
            cfg.max_message_bytes = v;
        }
        if let Some(v) = self.max_concurrent_streams {
            cfg.max_concurrent_streams = v;
        }
        if let Some(v) = self.drain_grace {
            cfg.drain_grace = v.0;
        }
        cfg.group = group;
        if let Some(endpoint) = self.draft_endpoint.filter(|e| !e.trim().is_empty()) {
            let mut d = tandem_worker::DraftClientConfig::new(endpoint.trim());
            if let Some(t) = self.draft_timeout {
                anyhow::ensure!(!t.0.is_zero(), "draft_timeout must be above 0");
                d.timeout = t.0;
            }
            if let Some(c) = self.draft_min_confidence {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&c),
                    "draft_min_confidence must be in [0, 1], got {c}"
                );
                d.min_confidence = c;
            }
            if let Some(c) = self.draft_catch_up {
                d.catch_up = c.into();
            }
            d.tls = client_tls(
                self.tls_ca.clone(),
                self.tls_cert.as_ref(),
                self.tls_key.as_ref(),
                self.tls_server_name.clone(),
            );
            cfg.draft = Some(d);
            cfg.engine.default_speculation = tandem_engine::SpecMode::DraftModel;
        }
        if let Some(s) = self.speculation {
            cfg.engine.default_speculation = s.into();
        }
        if let Some(k) = self.max_draft_tokens {
            let max = tandem_engine::speculate::MAX_DRAFT_TOKENS;
            anyhow::ensure!(
                (1..=max).contains(&k),
                "max_draft_tokens must be in 1..={max}, got {k}"
            );
            cfg.engine.max_draft_tokens = k;
        }
        if let Some(l) = self.draft_length {
            cfg.engine.adaptive_draft = l == DraftLength::Adaptive;
        }
        if let Some(c) = self.draft_candidates {
            let max = tandem_engine::speculate::MAX_DRAFT_CANDIDATES;
            anyhow::ensure!(
                (1..=max).contains(&c),
                "draft_candidates must be in 1..={max}, got {c}"
            );
            cfg.engine.draft_candidates = c;
        }
        cfg.discovery = discovery;
        cfg.tls = server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)?;
        Ok(cfg)
    }
}

/// `tandem router` flags; also the `[router]` section of the config file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterArgs {
    /// Public API address [default: 0.0.0.0:50051].
    #[arg(long, env = "TANDEM_ROUTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Workers' shard endpoints, comma separated (http://host:port or host:port).
    #[arg(long, env = "TANDEM_ROUTER_WORKERS", value_delimiter = ',')]
    pub workers: Option<Vec<String>>,
    /// Prometheus endpoint address (/metrics) [default: none].
    #[arg(long, env = "TANDEM_ROUTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Model used when a request leaves `model` empty [default: the only/first model served].
    #[arg(long, env = "TANDEM_ROUTER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Largest max_new_tokens accepted [default: 4096].
    #[arg(long, env = "TANDEM_ROUTER_MAX_NEW_TOKENS_LIMIT")]
    pub max_new_tokens_limit: Option<usize>,
    /// Largest gRPC message, in bytes [default: 4 MiB].
    #[arg(long, env = "TANDEM_ROUTER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// HTTP/2 concurrent streams per client connection [default: 1024].
    #[arg(long, env = "TANDEM_ROUTER_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// How long SIGTERM waits for in-flight requests [default: 30s].
    #[arg(long, env = "TANDEM_ROUTER_DRAIN_GRACE")]
    pub drain_grace: Option<Dur>,
    /// Upper bound on any generation request, besides the client's deadline [default: none].
    #[arg(long, env = "TANDEM_ROUTER_REQUEST_TIMEOUT")]
    pub request_timeout: Option<Dur>,
    /// How often workers are polled for health and load [default: 1s].
    #[arg(long, env = "TANDEM_ROUTER_POLL_INTERVAL")]
    pub poll_interval: Option<Dur>,
    /// API keys (TOML: names, SHA-256 digests, allowed models, per-key limits; re-read when it
    /// changes): clients must send `authorization: Bearer <key>`. `tandem api-key` makes keys
    /// [default: no keys needed].
    #[arg(long, env = "TANDEM_ROUTER_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// This server's TLS certificate chain (PEM); with --tls-key the API is served over TLS
    /// only. Re-read when the file changes (rotation keeps open streams) [default: plaintext].
    #[arg(long, env = "TANDEM_ROUTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_ROUTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS) [default: no client certificates].
    #[arg(long, env = "TANDEM_ROUTER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Call the workers over TLS, trusting this CA; --tls-cert/--tls-key are then the router's client certificate for workers that require one (mTLS) [default: plaintext].
    #[arg(long, env = "TANDEM_ROUTER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the servers' certificates must carry when it is not the host dialled (pods
    /// are dialled by IP) [default: the host].
    #[arg(long, env = "TANDEM_ROUTER_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// etcd endpoints, comma separated (http://HOST:2379): groups that register there join and
    /// leave without a restart (on top of --workers) [default: none].
    #[arg(long, env = "TANDEM_ROUTER_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// CA of etcd's server certificate: talk to etcd over TLS [default: plaintext].
    #[arg(long, env = "TANDEM_ROUTER_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd with --client-cert-auth.
    #[arg(long, env = "TANDEM_ROUTER_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TANDEM_ROUTER_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Cluster name: etcd keys live under /tandem/v1/<cluster>/ [default: default].
    #[arg(long, env = "TANDEM_ROUTER_CLUSTER")]
    pub cluster: Option<String>,
    /// How a group is picked: least-tokens, prefix (shared prompt prefixes to the same group),
    /// session (least-tokens plus session-id affinity) or round-robin [default: session].
    #[arg(long, env = "TANDEM_ROUTER_ROUTING_POLICY")]
    pub routing_policy: Option<String>,
    /// Shut down when stdin closes: children of `tandem up` die with their parent.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub exit_on_stdin_eof: bool,
}

impl RouterArgs {
    fn layer(&mut self, mut file: RouterArgs) {
        layer!(
            self,
            file,
            [
                listen,
                workers,
                metrics_listen,
                model_name,
                max_new_tokens_limit,
                max_message_bytes,
                max_concurrent_streams,
                drain_grace,
                request_timeout,
                poll_interval,
                api_keys,
                tls_cert,
                tls_key,
                tls_client_ca,
                tls_ca,
                tls_server_name,
                etcd_endpoints,
                cluster,
                etcd_ca,
                etcd_cert,
                etcd_key,
                routing_policy,
            ]
        );
    }

    fn into_config(self) -> anyhow::Result<tandem_router::RouterConfig> {
        let workers = self.workers.unwrap_or_default();
        let etcd: Vec<String> = self
            .etcd_endpoints
            .unwrap_or_default()
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect();
        anyhow::ensure!(
            !workers.is_empty() || !etcd.is_empty(),
            "no workers: pass --workers http://HOST:PORT[,...] or --etcd-endpoints http://HOST:2379 (TANDEM_ROUTER_WORKERS / TANDEM_ROUTER_ETCD_ENDPOINTS, or workers / etcd_endpoints in the [router] section of the config file)"
        );
        let listen = self.listen.unwrap_or_else(|| ([0, 0, 0, 0], 50051).into());
        let mut cfg = tandem_router::RouterConfig::new(listen, workers);
        cfg.etcd_endpoints = etcd;
        cfg.cluster = cluster_name(self.cluster.as_deref());
        tandem_discovery::Keys::new(&cfg.cluster).context("--cluster")?;
        if let Some(p) = &self.routing_policy {
            cfg.routing_policy = p
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--routing-policy: {e}"))?;
        }
        cfg.metrics_listen = self.metrics_listen;
        cfg.model_name = self.model_name;
        if let Some(v) = self.max_new_tokens_limit {
            cfg.max_new_tokens_limit = v;
        }
        if let Some(v) = self.max_message_bytes {
            cfg.max_message_bytes = v;
        }
        if let Some(v) = self.max_concurrent_streams {
            cfg.max_concurrent_streams = v;
        }
        if let Some(v) = self.drain_grace {
            cfg.drain_grace = v.0;
        }
        cfg.request_timeout = self.request_timeout.map(|d| d.0);
        if let Some(v) = self.poll_interval {
            anyhow::ensure!(!v.0.is_zero(), "poll_interval must be above 0");
            cfg.poll_interval = v.0;
        }
        cfg.upstream_tls = client_tls(
            self.tls_ca,
            self.tls_cert.as_ref(),
            self.tls_key.as_ref(),
            self.tls_server_name,
        );
        cfg.tls = server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)?;
        cfg.api_keys = self.api_keys;
        cfg.etcd_tls = etcd_tls(&self.etcd_ca, &self.etcd_cert, &self.etcd_key);
        Ok(cfg)
    }
}

/// `tandem draft` flags; also the `[draft]` section of the config file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftArgs {
    /// Draft model: a Hugging Face folder or a .gguf file sharing the target's tokenizer.
    #[arg(long, env = "TANDEM_DRAFT_MODEL")]
    pub model: Option<PathBuf>,
    /// Drafter API address [default: 127.0.0.1:50071].
    #[arg(long, env = "TANDEM_DRAFT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus endpoint address (/metrics) [default: none].
    #[arg(long, env = "TANDEM_DRAFT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Model name reported in Info [default: from the model's file or folder name].
    #[arg(long, env = "TANDEM_DRAFT_MODEL_NAME")]
    pub model_name: Option<String>,
    /// How to run a GGUF file's weights [default: quantized].
    #[arg(long, value_enum, env = "TANDEM_DRAFT_QUANT")]
    pub quant: Option<Quant>,
    /// Where the draft model runs: cpu, cuda or cuda:N [default: cpu]; the target's GPU or
    /// another. Needs the GPU binary (scripts/build-cuda).
    #[arg(long, env = "TANDEM_DRAFT_DEVICE")]
    pub device: Option<DeviceArg>,
    /// This server's TLS certificate chain (PEM); with --tls-key the API is served over TLS
    /// only. Re-read when the file changes (rotation keeps open streams) [default: plaintext].
    #[arg(long, env = "TANDEM_DRAFT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_DRAFT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS) [default: no client certificates].
    #[arg(long, env = "TANDEM_DRAFT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Cap the context length below the model's own [default: the model's].
    #[arg(long, env = "TANDEM_DRAFT_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Sequences held at once (KV per sequence), and the most one call may name; beyond it the
    /// least recently used is evicted [default: 256].
    #[arg(long, env = "TANDEM_DRAFT_MAX_SEQUENCES")]
    pub max_sequences: Option<usize>,
    /// Evict a sequence unused this long (e.g. 60s) [default: 60s].
    #[arg(long, env = "TANDEM_DRAFT_IDLE_TTL")]
    pub idle_ttl: Option<Dur>,
    /// KV positions held over all sequences; least recently used sequences are evicted to
    /// stay under it, a call needing more gets RESOURCE_EXHAUSTED [default: no budget].
    #[arg(long, env = "TANDEM_DRAFT_MAX_KV_TOKENS")]
    pub max_kv_tokens: Option<usize>,
    /// Largest gRPC request message, in bytes [default: 4 MiB].
    #[arg(long, env = "TANDEM_DRAFT_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// How long SIGTERM waits for calls in flight [default: 30s].
    #[arg(long, env = "TANDEM_DRAFT_DRAIN_GRACE")]
    pub drain_grace: Option<Dur>,
    /// etcd endpoints, comma separated: the draft registers under
    /// /tandem/v1/<cluster>/drafts/<model>/<id> while it serves [default: none].
    #[arg(long, env = "TANDEM_DRAFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Cluster name for the etcd keys [default: default].
    #[arg(long, env = "TANDEM_DRAFT_CLUSTER")]
    pub cluster: Option<String>,
    /// CA of etcd's server certificate: talk to etcd over TLS [default: plaintext].
    #[arg(long, env = "TANDEM_DRAFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd with --client-cert-auth.
    #[arg(long, env = "TANDEM_DRAFT_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TANDEM_DRAFT_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// HOST:PORT that verifiers should dial [default: the listen address].
    #[arg(long, env = "TANDEM_DRAFT_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Shut down when stdin closes: children of `tandem up` die with their parent.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub exit_on_stdin_eof: bool,
}

impl DraftArgs {
    fn layer(&mut self, mut file: DraftArgs) {
        layer!(
            self,
            file,
            [
                model,
                listen,
                metrics_listen,
                model_name,
                quant,
                device,
                tls_cert,
                tls_key,
                tls_client_ca,
                max_context,
                max_sequences,
                idle_ttl,
                max_kv_tokens,
                max_message_bytes,
                drain_grace,
                etcd_endpoints,
                cluster,
                etcd_ca,
                etcd_cert,
                etcd_key,
                advertise_address,
            ]
        );
    }

    fn into_config(self) -> anyhow::Result<tandem_draft::DraftConfig> {
        let endpoints = self.etcd_endpoints.clone().unwrap_or_default();
        let discovery = (!endpoints.iter().all(|e| e.trim().is_empty())).then(|| {
            tandem_draft::DraftDiscovery {
                etcd_endpoints: endpoints,
                cluster: cluster_name(self.cluster.as_deref()),
                advertise: self.advertise_address.clone(),
                etcd_tls: etcd_tls(&self.etcd_ca, &self.etcd_cert, &self.etcd_key),
            }
        });
        let model = self.model.context(
            "no draft model: pass --model PATH (a .gguf file or a Hugging Face folder), set TANDEM_DRAFT_MODEL, or set model in the [draft] section of the config file",
        )?;
        let listen = match self.listen {
            Some(l) => l,
            None => tandem_draft::DEFAULT_LISTEN.parse()?,
        };
        let mut cfg = tandem_draft::DraftConfig::new(model, listen);
        cfg.metrics_listen = self.metrics_listen;
        cfg.model_name = self.model_name;
        if let Some(q) = self.quant {
            cfg.quant = q.into();
        }
        if let Some(d) = self.device {
            cfg.device = d.0;
        }
        cfg.max_context = self.max_context;
        if let Some(v) = self.max_sequences {
            anyhow::ensure!(v >= 1, "max_sequences must be at least 1");
            cfg.core.max_sequences = v;
        }
        if let Some(v) = self.idle_ttl {
            anyhow::ensure!(!v.0.is_zero(), "idle_ttl must be above 0");
            cfg.core.idle_ttl = v.0;
        }
        cfg.core.max_kv_tokens = self.max_kv_tokens;
        if let Some(v) = self.max_message_bytes {
            cfg.max_message_bytes = v;
        }
        if let Some(v) = self.drain_grace {
            cfg.drain_grace = v.0;
        }
        cfg.discovery = discovery;
        cfg.tls = server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)?;
        Ok(cfg)
    }
}

/// `tandem up` flags; also the `[up]` section of the config file.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpArgs {
    /// Model for every worker [default: Qwen2.5-Coder-1.5B-Instruct GGUF in the model cache,
    /// fetched on first use].
    #[arg(long, env = "TANDEM_UP_MODEL")]
    pub model: Option<PathBuf>,
    /// Number of worker groups (replicas) [default: 1].
    #[arg(long, env = "TANDEM_UP_WORKERS")]
    pub workers: Option<usize>,
    /// Tensor-parallel size: worker processes per group, each holding a shard of the model
    /// [default: 2]. The model's heads and KV heads must divide by it.
    #[arg(long, env = "TANDEM_UP_TP")]
    pub tp: Option<usize>,
    /// Router address [default: 127.0.0.1:50051].
    #[arg(long, env = "TANDEM_UP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Router metrics address [default: a free port on 127.0.0.1].
    #[arg(long, env = "TANDEM_UP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Passed to each worker.
    #[arg(long, value_enum, env = "TANDEM_UP_QUANT")]
    pub quant: Option<Quant>,
    /// Where workers and the draft run: cpu, cuda or cuda:N [default: cpu]. With `cuda`, rank r
    /// of every group takes GPU r % GPUs and the draft GPU 0; activations go over NCCL.
    #[arg(long, env = "TANDEM_UP_DEVICE")]
    pub device: Option<DeviceArg>,
    /// Passed to each worker.
    #[arg(long, env = "TANDEM_UP_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Passed to each worker.
    #[arg(long, env = "TANDEM_UP_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Passed to each worker.
    #[arg(long, env = "TANDEM_UP_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Passed to each worker.
    #[arg(long, env = "TANDEM_UP_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// How long to wait for the cluster to serve [default: 10m; large models load slowly].
    #[arg(long, env = "TANDEM_UP_READY_TIMEOUT")]
    pub ready_timeout: Option<Dur>,
    /// On shutdown, how long children get before they are killed [default: 10s].
    #[arg(long, env = "TANDEM_UP_GRACE")]
    pub grace: Option<Dur>,
    /// Draft model for speculative decoding, run as its own service and paired with every
    /// group's leader; it must share the target's tokenizer [default: Qwen2.5-Coder-0.5B-Instruct
    /// GGUF (fetched on first use) with the default target, none with another --model].
    #[arg(long, env = "TANDEM_UP_DRAFT_MODEL")]
    pub draft_model: Option<PathBuf>,
    /// Run without a draft service (plain decoding unless requests ask for n-gram speculation).
    #[arg(long, env = "TANDEM_UP_NO_DRAFT")]
    #[serde(default)]
    pub no_draft: bool,
    /// Start a local etcd (the `etcd` binary, apt: etcd-server) and let groups register there
    /// and the router follow it, instead of the static worker list.
    #[arg(
        long,
        env = "TANDEM_UP_ETCD",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub etcd: Option<bool>,
}

impl UpArgs {
    fn layer(&mut self, mut file: UpArgs) {
        layer!(
            self,
            file,
            [
                model,
                workers,
                tp,
                listen,
                metrics_listen,
                quant,
                device,
                max_context,
                max_batch_tokens,
                max_running,
                max_waiting,
                ready_timeout,
                grace,
                draft_model,
                etcd,
            ]
        );
        self.no_draft |= file.no_draft;
    }
}

/// A server's TLS files from its flags: none (plaintext), or certificate and key (and a client
/// CA for mTLS). Half a pair is an error, not a silent plaintext server.
fn server_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> anyhow::Result<Option<tandem_runtime::tls::TlsFiles>> {
    match (cert, key) {
        (None, None) => {
            anyhow::ensure!(
                client_ca.is_none(),
                "--tls-client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)"
            );
            Ok(None)
        }
        (Some(cert), Some(key)) => Ok(Some(tandem_runtime::tls::TlsFiles {
            cert: Some(cert),
            key: Some(key),
            ca: client_ca,
        })),
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key"),
    }
}

/// A client hop's TLS: on with --tls-ca, presenting --tls-cert/--tls-key when given.
fn client_tls(
    ca: Option<PathBuf>,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    server_name: Option<String>,
) -> Option<tandem_runtime::tls::ClientTls> {
    ca.map(|ca| tandem_runtime::tls::ClientTls {
        files: tandem_runtime::tls::TlsFiles {
            cert: cert.cloned(),
            key: key.cloned(),
            ca: Some(ca),
        },
        domain: server_name,
    })
}

/// TLS to etcd from `--etcd-ca` (and a client certificate), or plaintext.
fn etcd_tls(
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Option<tandem_discovery::EtcdTls> {
    ca.clone().map(|ca| tandem_discovery::EtcdTls {
        ca,
        cert: cert.clone(),
        key: key.clone(),
    })
}

/// `--cluster`, or the default cluster.
fn cluster_name(flag: Option<&str>) -> String {
    flag.map(str::trim)
        .filter(|c| !c.is_empty())
        .unwrap_or(tandem_discovery::DEFAULT_CLUSTER)
        .to_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut file = FileConfig::load(cli.config.as_deref())?;
    let json = cli.log_json.or(file.log_json).unwrap_or(false);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = match cli.command {
        Command::Worker(mut args) => {
            tandem_runtime::init_tracing(json);
            args.layer(std::mem::take(&mut file.worker));
            let stdin_eof = args.exit_on_stdin_eof;
            args.into_config().and_then(|cfg| {
                rt.block_on(tandem_worker::serve(cfg, shutdown(stdin_eof)))
                    .map(|()| ExitCode::SUCCESS)
            })
        }
        Command::Router(mut args) => {
            tandem_runtime::init_tracing(json);
            args.layer(std::mem::take(&mut file.router));
            let stdin_eof = args.exit_on_stdin_eof;
            args.into_config().and_then(|cfg| {
                rt.block_on(tandem_router::serve(cfg, shutdown(stdin_eof)))
                    .map(|()| ExitCode::SUCCESS)
            })
        }
        Command::Draft(mut args) => {
            tandem_runtime::init_tracing(json);
            args.layer(std::mem::take(&mut file.draft));
            let stdin_eof = args.exit_on_stdin_eof;
            args.into_config().and_then(|cfg| {
                rt.block_on(tandem_draft::serve(cfg, shutdown(stdin_eof)))
                    .map(|()| ExitCode::SUCCESS)
            })
        }
        Command::Up(mut args) => {
            tandem_runtime::init_tracing(json);
            args.layer(std::mem::take(&mut file.up));
            rt.block_on(up::run(args, json))
        }
        Command::Generate(args) => rt.block_on(generate::run(args)),
        // Runs the engine's blocking calls: outside the async runtime.
        Command::Bench(bench::BenchArgs {
            which: bench::Bench::Device(args),
        }) => bench_device::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => {
            tandem_runtime::init_tracing(json);
            rt.block_on(bench::run(args)).map(|()| ExitCode::SUCCESS)
        }
        Command::MakeModel(args) => bench_device::make_model(args).map(|()| ExitCode::SUCCESS),
        Command::ApiKey { name } => {
            let (key, entry) = tandem_router::auth::new_key(&name);
            eprintln!("api key for '{name}' (shown once; the router keeps only its digest):");
            println!("{key}");
            eprintln!("\nadd to the router's --api-keys file:\n\n{entry}");
            Ok(ExitCode::SUCCESS)
        }
    };
    // Don't wait for stray blocking tasks (a stdin reader, a follower loop) once the server has
    // stopped, on success or failure: dropping the runtime would wait for them forever.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// SIGTERM/SIGINT, or (children of `tandem up`) stdin reaching EOF because the parent is gone.
fn shutdown(stdin_eof: bool) -> impl std::future::Future<Output = ()> + Send + 'static {
    let signal = tandem_runtime::shutdown_signal();
    async move {
        if !stdin_eof {
            return signal.await;
        }
        let eof = async {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            // Anything written is ignored; only EOF (or a read error) matters.
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            tracing::info!("parent process gone (stdin closed); shutting down");
        };
        tokio::select! {
            _ = signal => {}
            _ = eof => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_environment_beat_file() {
        let file: FileConfig = toml::from_str(
            r#"
            [router]
            listen = "10.0.0.1:1"
            workers = ["http://w:1"]
            drain_grace = "5s"
            request_timeout = "7s"
            "#,
        )
        .unwrap();
        // Only this test reads this variable.
        std::env::set_var("TANDEM_ROUTER_DRAIN_GRACE", "6s");
        let cli = Cli::try_parse_from(["tandem", "router", "--listen", "10.0.0.2:2"]).unwrap();
        std::env::remove_var("TANDEM_ROUTER_DRAIN_GRACE");
        let Command::Router(mut args) = cli.command else {
            panic!("not the router subcommand");
        };
        args.layer(file.router);
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.listen, "10.0.0.2:2".parse().unwrap()); // flag
        assert_eq!(cfg.drain_grace, Duration::from_secs(6)); // environment over file
        assert_eq!(cfg.workers, vec!["http://w:1".to_owned()]); // file
        assert_eq!(cfg.request_timeout, Some(Duration::from_secs(7))); // file
        assert_eq!(cfg.max_new_tokens_limit, 4096); // default
    }

    #[test]
    fn worker_flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "tandem",
            "worker",
            "--model",
            "/m.gguf",
            "--listen",
            "127.0.0.1:7",
            "--quant",
            "dequantized",
            "--max-running",
            "3",
            "--drain-grace",
            "250ms",
        ])
        .unwrap();
        let Command::Worker(args) = cli.command else {
            panic!("not the worker subcommand");
        };
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.model, PathBuf::from("/m.gguf"));
        assert_eq!(cfg.quant, tandem_model::QuantMode::Dequantized);
        assert_eq!(cfg.engine.max_running, 3);
        assert_eq!(cfg.drain_grace, Duration::from_millis(250));
        assert!(cfg.group.is_none());
    }

    #[test]
    fn group_flags_reach_the_config() {
        let cli = Cli::try_parse_from([
            "tandem",
            "worker",
            "--model",
            "/m.gguf",
            "--rank",
            "1",
            "--world-size",
            "2",
            "--group-peers",
            "127.0.0.1:9001,127.0.0.1:9002",
            "--group-io-timeout",
            "3s",
        ])
        .unwrap();
        let Command::Worker(args) = cli.command else {
            panic!("not the worker subcommand");
        };
        let g = args.into_config().unwrap().group.unwrap();
        assert_eq!((g.rank, g.world_size), (1, 2));
        assert_eq!(g.peers[1], "127.0.0.1:9002".parse().unwrap());
        assert_eq!(g.io_timeout, Duration::from_secs(3));

        let file: FileConfig = toml::from_str(
            "[worker]\nmodel = \"/m\"\nrank = 2\nworld_size = 3\ngroup_peers = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n",
        )
        .unwrap();
        let g = file.worker.into_config().unwrap().group.unwrap();
        assert_eq!((g.rank, g.world_size, g.peers.len()), (2, 3, 3));

        let bad = WorkerArgs {
            model: Some("/m".into()),
            world_size: Some(2),
            group_peers: Some(vec!["127.0.0.1:1".into()]),
            ..Default::default()
        };
        let e = bad.into_config().unwrap_err().to_string();
        assert!(e.contains("--group-peers"), "{e}");
    }

    #[test]
    fn draft_flags_environment_and_file_reach_the_config() {
        let file: FileConfig = toml::from_str(
            "[draft]\nmodel = \"/d.gguf\"\nidle_ttl = \"90s\"\nmax_sequences = 8\nquant = \"dequantized\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "tandem",
            "draft",
            "--max-sequences",
            "16",
            "--metrics-listen",
            "127.0.0.1:9",
            "--drain-grace",
            "2s",
            "--max-kv-tokens",
            "100000",
        ])
        .unwrap();
        let Command::Draft(mut args) = cli.command else {
            panic!("not the draft subcommand");
        };
        args.layer(file.draft);
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.model, PathBuf::from("/d.gguf")); // file
        assert_eq!(cfg.core.max_sequences, 16); // flag over file
        assert_eq!(cfg.core.idle_ttl, Duration::from_secs(90)); // file
        assert_eq!(cfg.quant, tandem_model::QuantMode::Dequantized);
        assert_eq!(cfg.drain_grace, Duration::from_secs(2));
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(cfg.listen, "127.0.0.1:50071".parse().unwrap()); // default
        assert_eq!(cfg.core.max_draft_tokens, 16);
        assert_eq!(cfg.core.max_kv_tokens, Some(100_000));
        let e = DraftArgs::default().into_config().unwrap_err().to_string();
        assert!(
            e.contains("--model") && e.contains("TANDEM_DRAFT_MODEL"),
            "{e}"
        );
    }

    #[test]
    fn discovery_flags_reach_the_configs() {
        let cli = Cli::try_parse_from([
            "tandem",
            "worker",
            "--model",
            "/m.gguf",
            "--etcd-endpoints",
            "http://e1:2379,e2:2379",
            "--cluster",
            "prod",
            "--advertise-address",
            "w-0.w:50061",
            "--group",
            "g0",
        ])
        .unwrap();
        let Command::Worker(args) = cli.command else {
            panic!("not the worker subcommand");
        };
        let d = args.into_config().unwrap().discovery.unwrap();
        assert_eq!(d.etcd_endpoints, vec!["http://e1:2379", "e2:2379"]);
        assert_eq!(d.cluster, "prod");
        assert_eq!(d.advertise.as_deref(), Some("w-0.w:50061"));
        assert_eq!(d.group.as_deref(), Some("g0"));
        let plain = WorkerArgs {
            model: Some("/m".into()),
            ..Default::default()
        };
        assert!(plain.into_config().unwrap().discovery.is_none());

        // etcd alone is enough for a router; the cluster defaults to "default".
        let cli =
            Cli::try_parse_from(["tandem", "router", "--etcd-endpoints", "http://e:2379"]).unwrap();
        let Command::Router(args) = cli.command else {
            panic!("not the router subcommand");
        };
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.etcd_endpoints, vec!["http://e:2379"]);
        assert_eq!(cfg.cluster, "default");
        assert!(cfg.workers.is_empty());
        assert_eq!(cfg.routing_policy, tandem_router::Policy::Session);
        let cli = Cli::try_parse_from([
            "tandem",
            "router",
            "--workers",
            "w:1",
            "--routing-policy",
            "prefix",
        ])
        .unwrap();
        let Command::Router(args) = cli.command else {
            panic!("not the router subcommand");
        };
        assert_eq!(
            args.into_config().unwrap().routing_policy,
            tandem_router::Policy::Prefix
        );
        let e = format!(
            "{:#}",
            RouterArgs {
                workers: Some(vec!["w:1".into()]),
                routing_policy: Some("fastest".into()),
                ..Default::default()
            }
            .into_config()
            .unwrap_err()
        );
        assert!(
            e.contains("--routing-policy") && e.contains("round-robin"),
            "{e}"
        );
        let bad = RouterArgs {
            etcd_endpoints: Some(vec!["http://e:2379".into()]),
            cluster: Some("a/b".into()),
            ..Default::default()
        };
        let e = format!("{:#}", bad.into_config().unwrap_err());
        assert!(e.contains("--cluster") && e.contains("ASCII"), "{e}");
    }

    #[test]
    fn missing_required_settings_say_how_to_set_them() {
        let e = WorkerArgs::default().into_config().unwrap_err().to_string();
        assert!(
            e.contains("--model") && e.contains("TANDEM_WORKER_MODEL"),
            "{e}"
        );
        let e = RouterArgs::default().into_config().unwrap_err().to_string();
        assert!(
            e.contains("--workers") && e.contains("TANDEM_ROUTER_WORKERS"),
            "{e}"
        );
    }
}
