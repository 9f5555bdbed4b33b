//! Discovery end to end: a real etcd (started here), the real `tandem` binary as router and
//! worker processes on 127.0.0.1, tiny test-kit models. Workers register their group in etcd;
//! routers follow it. Without the etcd binary these tests skip, or fail under
//! TANDEM_REQUIRE_ETCD=1 (scripts/test, CI).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_addr, Proc};
use tandem_discovery::testing::EtcdServer;
use tandem_discovery::{Keys, Registry, ViewState, DEFAULT_TTL};
use tandem_proto::v1::generation_client::GenerationClient;
use tandem_proto::v1::{
    generate_request, FinishReason, GenerateRequest, ListModelsRequest, StoppingCriteria,
};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};
use tonic::transport::Channel;

/// A bound on waits that should take far less; only there so a broken build fails, not hangs.
const PATIENCE: Duration = Duration::from_secs(60);

/// etcd, a log folder and a model shared by the processes of one test.
struct Env {
    etcd: EtcdServer,
    logs: tempfile::TempDir,
    model: TinyModel,
    cluster: String,
}

struct Node {
    proc: Proc,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Env {
    fn start(model: TinyModel) -> Option<Env> {
        let etcd = EtcdServer::start_on(free_addr(), free_addr())?;
        let logs = tempfile::Builder::new()
            .prefix("tandem-discovery-")
            .tempdir()
            .unwrap();
        Some(Env {
            etcd,
            logs,
            model,
            cluster: "e2e".into(),
        })
    }

    fn worker(&self, name: &str, extra: &[&str]) -> Node {
        let (addr, metrics) = (free_addr(), free_addr());
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--model".into(),
            self.model.dir.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--etcd-endpoints".into(),
            self.etcd.endpoint(),
            "--cluster".into(),
            self.cluster.clone(),
            "--advertise-address".into(),
            addr.to_string(),
            // Only a bound on hangs: a draining group's streams must finish in it when loaded.
            "--drain-grace".into(),
            "120s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Node {
            proc: Proc::start(name, self.logs.path(), &args),
            addr,
            metrics,
        }
    }

    fn router(&self, name: &str) -> Node {
        let (addr, metrics) = (free_addr(), free_addr());
        let args: Vec<String> = vec![
            "router".into(),
            "--listen".into(),
            addr.to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--etcd-endpoints".into(),
            self.etcd.endpoint(),
            "--cluster".into(),
            self.cluster.clone(),
        ];
        Node {
            proc: Proc::start(name, self.logs.path(), &args),
            addr,
            metrics,
        }
    }

    /// A view of the groups registered in etcd, for checks from outside.
    async fn groups(&self) -> tandem_discovery::View {
        let keys = Keys::new(&self.cluster).unwrap();
        Registry::etcd(&self.etcd.endpoints())
            .await
            .unwrap()
            .view(&keys.groups())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.etcd.log_text();
            eprintln!("---- etcd log (last lines) ----");
            for l in log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{l}");
            }
        }
    }
}

async fn until_view(view: &mut tandem_discovery::View, what: &str, f: impl Fn(&ViewState) -> bool) {
    let wait = async {
        loop {
            if f(&view.current()) {
                return;
            }
            view.changed().await;
        }
    };
    if tokio::time::timeout(PATIENCE, wait).await.is_err() {
        panic!("{what}: not reached; etcd has {:?}", view.current());
    }
}

/// Polls `f` every 50 ms until it holds.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: not reached in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// The value of the first sample named `name` whose labels contain `needle`.
fn sample(metrics: &str, name: &str, needle: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name) && l.contains(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Generation attempts router `r` sent to the worker at `w`.
async fn sent_to(r: &Node, w: &Node) -> f64 {
    let m = scrape(r.metrics).await;
    sample(
        &m,
        "tandem_router_worker_requests_total",
        &format!("\"http://{}\"", w.addr),
    )
    .unwrap_or(0.0)
}

async fn router_gauge(r: &Node, name: &str) -> Option<f64> {
    sample(&scrape(r.metrics).await, name, "")
}

async fn client(addr: SocketAddr) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn replicas(addr: SocketAddr) -> Option<u32> {
    let mut c = GenerationClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let models = c.list_models(ListModelsRequest {}).await.ok()?.into_inner();
    Some(models.models.first().map_or(0, |m| m.replicas))
}

async fn wait_replicas(addr: SocketAddr, n: u32) {
    until(&format!("router reports {n} replicas"), || async {
        replicas(addr).await == Some(n)
    })
    .await;
}

async fn discovery_health(r: &Node) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let ch = Channel::from_shared(format!("http://{}", r.addr))
        .unwrap()
        .connect()
        .await
        .ok()?;
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "tandem.discovery".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// Exactly `n` tokens (EOS ignored).
fn long_req(text: &str, n: u32) -> GenerateRequest {
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

/// How one streamed request ended.
#[derive(Debug)]
struct Outcome {
    tokens: usize,
    /// The group leader that took it (the router's response header).
    group: String,
    /// The error, if the stream failed.
    error: Option<tonic::Status>,
}

/// Streams `req` to its end.
async fn stream(c: &mut GenerationClient<Channel>, req: GenerateRequest) -> Outcome {
    let want = req.stopping.as_ref().and_then(|s| s.max_new_tokens);
    let mut o = Outcome {
        tokens: 0,
        group: String::new(),
        error: None,
    };
    let mut s = match c.generate_stream(req).await {
        Ok(s) => {
            o.group = s
                .metadata()
                .get(tandem_router::GROUP_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            s.into_inner()
        }
        Err(e) => {
            o.error = Some(e);
            return o;
        }
    };
    loop {
        match s.message().await {
            Ok(Some(chunk)) => {
                o.tokens += chunk.token_ids.len();
                if chunk.finish_reason != 0 {
                    assert_eq!(chunk.finish_reason, FinishReason::Length as i32);
                    assert_eq!(Some(o.tokens as u32), want);
                    return o;
                }
            }
            Ok(None) => {
                o.error = Some(tonic::Status::unknown("stream ended without a finish"));
                return o;
            }
            Err(e) => {
                o.error = Some(e);
                return o;
            }
        }
    }
}

/// `loops` clients each streaming requests back to back through `router` until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(router: SocketAddr, loops: usize, tokens: u32) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..loops)
            .map(|i| {
                let (stop, outcomes) = (stop.clone(), outcomes.clone());
                tokio::spawn(async move {
                    let mut c = GenerationClient::connect(format!("http://{router}"))
                        .await
                        .unwrap();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let o =
                            stream(&mut c, long_req(&format!("client {i} request {n}"), tokens))
                                .await;
                        outcomes.lock().unwrap().push(o);
                        n += 1;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            outcomes,
            tasks,
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------

/// 1 router, 3 groups; a 4th group takes traffic soon after registering; a SIGKILLed group
/// stops getting traffic; no request fails before its first token.
#[tokio::test(flavor = "multi_thread")]
async fn groups_join_and_leave_without_restarting_the_router() {
    let Some(env) = Env::start(tiny_model(&TinyConfig::llama()).unwrap()) else {
        return;
    };
    let mut workers: Vec<Node> = (0..3)
        .map(|i| env.worker(&format!("worker {i}"), &[]))
        .collect();
    let mut router = env.router("router");
    wait_replicas(router.addr, 3).await;
    let mut groups = env.groups().await;
    until_view(&mut groups, "3 groups registered", |s| s.entries.len() == 3).await;

    let traffic = Traffic::start(router.addr, 4, 24);
    until("traffic flows", || async {
        sent_to(&router, &workers[0]).await > 0.0
    })
    .await;

    // A 4th group: its key appears once its model is loaded; from then on, traffic follows (the
    // router watches etcd; the bound only catches a router that never picks the group up).
    workers.push(env.worker("worker 3", &[]));
    until_view(&mut groups, "the 4th group registered", |s| {
        s.entries.len() == 4
    })
    .await;
    let joined = Instant::now();
    until("the 4th group gets traffic", || async {
        sent_to(&router, &workers[3]).await > 0.0
    })
    .await;
    let took = joined.elapsed();
    eprintln!("the new group got traffic {took:?} after registering");
    assert!(
        took < Duration::from_secs(30),
        "the new group took {took:?} to get traffic"
    );

    // SIGKILL one group: once its lease expired and the router has taken it out, nothing more
    // is sent to it.
    workers[1].proc.kill();
    let killed = Instant::now();
    until_view(&mut groups, "the dead group's key expired", |s| {
        s.entries.len() == 3
    })
    .await;
    eprintln!(
        "the dead group's key expired {:?} after the kill (TTL {DEFAULT_TTL:?})",
        killed.elapsed()
    );
    until("the router dropped the dead group", || async {
        router_gauge(&router, "tandem_router_member_groups").await == Some(3.0)
            && replicas(router.addr).await == Some(3)
    })
    .await;
    let sent = sent_to(&router, &workers[1]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sent_to(&router, &workers[1]).await,
        sent,
        "the router still sent requests to the killed group"
    );
    for i in [0, 2, 3] {
        let before = sent_to(&router, &workers[i]).await;
        until(&format!("worker {i} still gets traffic"), || async {
            sent_to(&router, &workers[i]).await > before
        })
        .await;
    }

    let outcomes = traffic.finish().await;
    let ok = outcomes.iter().filter(|o| o.error.is_none()).count();
    let before_first_token: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.error.is_some() && o.tokens == 0)
        .collect();
    assert!(
        before_first_token.is_empty(),
        "requests failed before their first token: {before_first_token:?}"
    );
    // Only streams running on the killed group may fail, mid-stream.
    let mid_stream = outcomes.len() - ok;
    assert!(mid_stream <= 4, "{mid_stream} streams failed mid-stream");
    assert!(ok >= 20, "only {ok} requests completed");
    assert!(
        router.proc.is_running(),
        "the router must survive a group's crash"
    );
}

/// Two routers follow one etcd and agree on the membership; etcd stops for 20 s: both keep
/// serving (and say so in health and metrics); a group killed and one started meanwhile are
/// reflected once etcd is back.
#[tokio::test(flavor = "multi_thread")]
async fn two_routers_ride_out_an_etcd_outage_and_converge() {
    let Some(mut env) = Env::start(tiny_model(&TinyConfig::llama()).unwrap()) else {
        return;
    };
    let a = env.worker("worker a", &[]);
    let mut b = env.worker("worker b", &[]);
    let routers = [env.router("router 1"), env.router("router 2")];
    for r in &routers {
        wait_replicas(r.addr, 2).await;
        // Health is set just after the gauge: wait for both.
        until("registry connected", || async {
            router_gauge(r, "tandem_router_registry_connected").await == Some(1.0)
                && discovery_health(r).await == Some(1) // SERVING
        })
        .await;
        assert_eq!(
            router_gauge(r, "tandem_router_member_groups").await,
            Some(2.0)
        );
    }

    env.etcd.stop();
    let outage = Instant::now();
    for r in &routers {
        until("the router notices the outage", || async {
            router_gauge(r, "tandem_router_registry_connected").await == Some(0.0)
                && discovery_health(r).await == Some(2) // NOT_SERVING
        })
        .await;
        // The last known membership stays.
        assert_eq!(
            router_gauge(r, "tandem_router_member_groups").await,
            Some(2.0)
        );
    }
    // Meanwhile b dies and c starts (it cannot register yet).
    b.proc.kill();
    let c = env.worker("worker c", &[]);
    let mut clients = [client(routers[0].addr).await, client(routers[1].addr).await];
    let mut served = 0;
    while outage.elapsed() < Duration::from_secs(20) {
        for cl in &mut clients {
            let o = stream(cl, long_req("during the outage", 8)).await;
            assert!(o.error.is_none(), "failed during the etcd outage: {o:?}");
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served >= 20);
    for r in &routers {
        assert!(
            sent_to(r, &c).await == 0.0,
            "c is not known before etcd is back"
        );
    }

    env.etcd.resume();
    for r in &routers {
        until("the router reconnects", || async {
            router_gauge(r, "tandem_router_registry_connected").await == Some(1.0)
                && discovery_health(r).await == Some(1)
        })
        .await;
        // Converged: a and c; b's lease expired.
        until("membership converges to a and c", || async {
            router_gauge(r, "tandem_router_member_groups").await == Some(2.0)
                && replicas(r.addr).await == Some(2)
        })
        .await;
    }
    for r in &routers {
        let mut cl = client(r.addr).await;
        let start = Instant::now();
        while sent_to(r, &c).await == 0.0 {
            assert!(
                start.elapsed() < PATIENCE,
                "c got no traffic after the outage"
            );
            let o = stream(&mut cl, long_req("after the outage", 4)).await;
            assert!(o.error.is_none(), "{o:?}");
        }
        let m = scrape(r.metrics).await;
        assert!(
            !m.contains(&format!("\"http://{}\"", b.addr))
                || sample(
                    &m,
                    "tandem_router_worker_usable",
                    &format!("\"http://{}\"", b.addr)
                ) == Some(0.0),
        );
    }
    let mut groups = env.groups().await;
    until_view(&mut groups, "etcd has a and c", |s| {
        s.entries.len() == 2
            && s.entries.values().any(|v| v.contains(&c.addr.to_string()))
            && s.entries.values().any(|v| v.contains(&a.addr.to_string()))
    })
    .await;
}

/// SIGTERM to a busy group: it leaves etcd at once, its running streams complete, new requests
/// go to the others, and no request fails.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_busy_group_with_zero_errors() {
    let slow = tiny_model(&TinyConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 4,
        max_position_embeddings: 4096,
        ..TinyConfig::llama()
    })
    .unwrap();
    let Some(env) = Env::start(slow) else {
        return;
    };
    let mut workers: Vec<Node> = (0..3)
        .map(|i| env.worker(&format!("worker {i}"), &[]))
        .collect();
    let router = env.router("router");
    wait_replicas(router.addr, 3).await;
    let mut groups = env.groups().await;
    until_view(&mut groups, "3 groups registered", |s| s.entries.len() == 3).await;

    // Long streams on every group (least-loaded spreads 6 over 3).
    let mut c = client(router.addr).await;
    let long: Vec<_> = (0..6)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { stream(&mut c, long_req(&format!("long {i}"), 600)).await })
        })
        .collect();
    let draining = &workers[0];
    until("the group to drain is busy", || async {
        let m = scrape(draining.metrics).await;
        sample(&m, "tandem_worker_running_sequences", "").unwrap_or(0.0) > 0.0
    })
    .await;

    draining.proc.sigterm();
    // New requests during the drain all succeed, elsewhere: once the router has seen the key
    // go (a watch event) it sends nothing there. It sets the membership gauge just before it
    // publishes the membership without the group, and the replica count on the poll round
    // right after: wait for both.
    until_view(&mut groups, "the draining group left etcd", |s| {
        s.entries.len() == 2
    })
    .await;
    until("the router dropped the draining group", || async {
        router_gauge(&router, "tandem_router_member_groups").await == Some(2.0)
            && replicas(router.addr).await == Some(2)
    })
    .await;
    let sent = sent_to(&router, draining).await;
    for i in 0..6 {
        let o = stream(&mut c, long_req(&format!("new {i}"), 8)).await;
        assert!(
            o.error.is_none(),
            "new request failed during the drain: {o:?}"
        );
        assert_ne!(o.group, format!("http://{}", draining.addr), "{o:?}");
    }
    assert_eq!(
        sent_to(&router, draining).await,
        sent,
        "new requests reached the draining group"
    );

    for t in long {
        let o = t.await.unwrap();
        assert!(o.error.is_none(), "a running stream failed: {o:?}");
        assert_eq!(o.tokens, 600);
    }
    let status = workers[0].proc.wait_exit(PATIENCE).await;
    assert!(status.success(), "drained worker exit: {status}");
    assert!(workers[0].proc.output().contains("deregistered from etcd"));
}

/// `tandem up --etcd`: a local etcd, groups that register there, a router that follows it.
#[tokio::test(flavor = "multi_thread")]
async fn up_with_etcd_runs_the_cluster_through_a_local_etcd() {
    // Same rule as the other tests: skip (or fail under TANDEM_REQUIRE_ETCD=1) without etcd.
    let Some(probe) = EtcdServer::start_on(free_addr(), free_addr()) else {
        return;
    };
    drop(probe);
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let mut up = Proc::start(
        "up",
        logs.path(),
        &[
            "up".into(),
            "--etcd".into(),
            "--model".into(),
            tiny.dir.display().to_string(),
            "--workers".into(),
            "2".into(),
            "--tp".into(),
            "1".into(),
            "--listen".into(),
            listen.to_string(),
        ],
    );
    let start = Instant::now();
    while !up.output().contains("Tandem is up") {
        assert!(up.is_running(), "tandem up exited:\n{}", up.output());
        // Starts etcd, then loads the model in each worker: generous.
        assert!(start.elapsed() < 3 * PATIENCE, "{}", up.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let banner = up.output();
    let etcd = banner
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("etcd (groups under /tandem/v1/default/groups/): ")
        })
        .unwrap_or_else(|| panic!("no etcd line in the banner:\n{banner}"))
        .to_owned();
    // Both groups registered in that etcd, and the router serves both.
    let mut groups = Registry::etcd(&[etcd])
        .await
        .unwrap()
        .view(&Keys::new("default").unwrap().groups());
    until_view(&mut groups, "2 groups in up's etcd", |s| {
        s.entries.len() == 2
    })
    .await;
    wait_replicas(listen, 2).await;
    let mut c = client(listen).await;
    let o = stream(&mut c, long_req("hello", 8)).await;
    assert!(o.error.is_none(), "{o:?}");
    assert!(up.output().contains("following group membership in etcd"));

    up.sigterm();
    let status = up.wait_exit(PATIENCE).await;
    assert!(status.success(), "up exit: {status}\n{}", up.output());
    assert!(
        up.output().contains("deregistered from etcd"),
        "{}",
        up.output()
    );
}

/// A tensor-parallel group whose ranks meet through etcd (no --group-peers): it registers with
/// its tp size and generates what a single-rank group does.
#[tokio::test(flavor = "multi_thread")]
async fn tp_ranks_meet_through_etcd_and_match_one_rank() {
    // 6 heads / 6 KV heads: divides by 2.
    let tiny = tiny_model(&TinyConfig {
        hidden_size: 96,
        intermediate_size: 192,
        num_heads: 6,
        num_kv_heads: 6,
        ..TinyConfig::llama()
    })
    .unwrap();
    let Some(env) = Env::start(tiny) else {
        return;
    };
    let mut single = env.worker("tp1", &[]);
    let router = env.router("router");
    wait_replicas(router.addr, 1).await;
    let prompts = ["hello", "tensor parallel groups", "1 2 3 4 5 6 7 8"];
    let mut c = client(router.addr).await;
    let mut want = Vec::new();
    for p in prompts {
        let o = c.generate(greedy(p)).await.unwrap().into_inner();
        want.push(o.token_ids);
    }

    // Ranks started in reverse order: each waits in etcd for the others.
    let _rank1 = env.worker(
        "tp2 rank 1",
        &["--rank", "1", "--world-size", "2", "--group", "tp2"],
    );
    let rank0 = env.worker(
        "tp2 rank 0",
        &["--rank", "0", "--world-size", "2", "--group", "tp2"],
    );
    wait_replicas(router.addr, 2).await;
    let mut groups = env.groups().await;
    until_view(
        &mut groups,
        "the tp2 group registered with tp_size 2",
        |s| {
            s.entries.iter().any(|(k, v)| {
                k.ends_with("/tp2")
                    && v.contains("\"tp_size\":2")
                    && v.contains(&format!("\"leader\":\"http://{}\"", rank0.addr))
            })
        },
    )
    .await;
    let keys = Keys::new(&env.cluster).unwrap();
    let rendezvous = Registry::etcd(&env.etcd.endpoints())
        .await
        .unwrap()
        .list(&keys.rendezvous("tp2"))
        .await
        .unwrap();
    assert_eq!(rendezvous.len(), 2, "{rendezvous:?}");

    // Only the tp2 group left: same greedy tokens.
    single.proc.kill();
    wait_replicas(router.addr, 1).await;
    until_view(&mut groups, "the single group's key expired", |s| {
        s.entries.len() == 1
    })
    .await;
    for (p, w) in prompts.iter().zip(&want) {
        let o = c.generate(greedy(p)).await.unwrap().into_inner();
        assert_eq!(&o.token_ids, w, "{p}");
    }
}

fn greedy(text: &str) -> GenerateRequest {
    long_req(text, 24)
}

/// A draft service registers under drafts/<model>/<id> once it serves (with its address and
/// tokenizer hash, for verifiers to pair with) and deregisters on SIGTERM before draining.
#[tokio::test(flavor = "multi_thread")]
async fn draft_registers_while_it_serves() {
    let Some(env) = Env::start(tiny_model(&TinyConfig::qwen2()).unwrap()) else {
        return;
    };
    let addr = free_addr();
    let mut draft = Proc::start(
        "draft",
        env.logs.path(),
        &[
            "draft".into(),
            "--model".into(),
            env.model.dir.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--etcd-endpoints".into(),
            env.etcd.endpoint(),
            "--cluster".into(),
            env.cluster.clone(),
            "--advertise-address".into(),
            addr.to_string(),
        ],
    );
    let keys = Keys::new(&env.cluster).unwrap();
    let mut drafts = Registry::etcd(&env.etcd.endpoints())
        .await
        .unwrap()
        .view(&keys.drafts());
    until_view(&mut drafts, "the draft registered", |s| {
        s.entries.len() == 1
    })
    .await;
    let (key, value) = drafts
        .current()
        .entries
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    assert!(key.starts_with(&keys.drafts()), "{key}");
    let record: tandem_discovery::DraftRecord = tandem_discovery::parse_record(&value).unwrap();
    assert_eq!(record.address, format!("http://{addr}"));
    assert!(!record.tokenizer_hash.is_empty());
    assert_eq!(record.version, tandem_discovery::RECORD_VERSION);
    draft.sigterm();
    until_view(&mut drafts, "the draft deregistered", |s| {
        s.entries.is_empty()
    })
    .await;
    assert!(draft.wait_exit(PATIENCE).await.success());
}
