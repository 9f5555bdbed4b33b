//! Child processes of `tandem up` and `tandem bench`: this same executable with the `worker` or
//! `router` subcommand. Each child gets a pipe as stdin and `--exit-on-stdin-eof`, so it shuts
//! down when this process dies, even by SIGKILL; on our own shutdown each gets SIGTERM (its
//! graceful drain), then SIGKILL after the grace period.

use std::net::{SocketAddr, TcpListener};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, ChildStdin, Command};

pub struct Proc {
    pub name: String,
    child: Child,
    /// Held open: closing it tells the child to exit.
    _stdin: Option<ChildStdin>,
}

#[derive(Default)]
pub struct Children {
    procs: Vec<Proc>,
    env: Vec<(String, String)>,
}

impl Children {
    /// Sets an environment variable for children started from now on.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts `tandem <args>` as a child named `name` (for messages).
    pub fn spawn(&mut self, name: &str, args: &[String]) -> anyhow::Result<u32> {
        self.spawn_with_env(name, args, &[])
    }

    /// `spawn` with extra environment variables for this child only.
    pub fn spawn_with_env(
        &mut self,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let exe = std::env::current_exe().context("locating the tandem executable")?;
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .kill_on_drop(true);
        self.start(name, cmd, args, env)
    }

    /// Starts another program (etcd) as a child. It does not watch its stdin: if this process
    /// is SIGKILLed it stays behind.
    pub fn spawn_program(
        &mut self,
        name: &str,
        program: &std::path::Path,
        args: &[String],
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        self.start(name, cmd, args, &[])
    }

    /// `env` applies last, over the variables set for every child.
    fn start(
        &mut self,
        name: &str,
        mut cmd: Command,
        args: &[String],
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let exe = cmd.as_std().get_program().to_owned();
        // Children get every setting as a flag; inherited TANDEM_* variables (meant for this
        // process) would otherwise apply to all of them, e.g. one metrics port for every worker.
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| {
                k.starts_with("TANDEM_") && k != "TANDEM_MODEL_CACHE" && k != "TANDEM_LOG_JSON"
            }) {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {name}: {} {}",
                exe.to_string_lossy(),
                args.join(" ")
            )
        })?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            _stdin: stdin,
        });
        Ok(pid)
    }

    /// Resolves when the first child exits: its name and exit status.
    pub async fn first_exit(&mut self) -> (String, std::io::Result<ExitStatus>) {
        if self.procs.is_empty() {
            return std::future::pending().await;
        }
        let waits = self
            .procs
            .iter_mut()
            .map(|p| Box::pin(async { (p.name.clone(), p.child.wait().await) }));
        let (out, _, _) = futures::future::select_all(waits).await;
        out
    }

    /// SIGTERM to every child, then SIGKILL to those still running after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        for p in &mut self.procs {
            if let (Ok(None), Some(pid)) = (p.child.try_wait(), p.child.id()) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + grace;
        for p in &mut self.procs {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(child = %p.name, "still running after the grace period; killing it");
                    let _ = p.child.kill().await;
                }
            }
        }
    }
}

/// Ports this process handed out or was told are taken: the OS may offer a just-released port
/// again, and no child may be given a port another child (or the user's --listen) will bind.
static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Marks a port as taken (e.g. the router's configured address) so `free_port` never offers it.
pub fn reserve(port: u16) {
    if let Ok(mut t) = TAKEN.lock() {
        t.push(port);
    }
}

/// A port free on 127.0.0.1 right now and not handed out before. Another process may take it
/// before the child binds it; the child then fails to start and the caller reports which one.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    for _ in 0..64 {
        let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let addr = l.local_addr()?;
        let mut taken = TAKEN
            .lock()
            .map_err(|_| anyhow::anyhow!("port registry poisoned"))?;
        if !taken.contains(&addr.port()) {
            taken.push(addr.port());
            return Ok(addr);
        }
    }
    anyhow::bail!("no free port found that was not handed out already")
}

/// Waits until the router at `addr` reports SERVING on grpc.health.v1, or a child exits, or
/// `timeout` passes.
pub async fn wait_serving(
    children: &mut Children,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(children, addr, timeout, 0).await
}

/// Waits until a router at `addr` would answer a request: it reports SERVING *and* lists a
/// model served by at least `groups` worker groups. A router can be SERVING before it knows
/// any group (through etcd the groups register once loaded), so SERVING alone is not enough.
pub async fn wait_router_ready(
    children: &mut Children,
    addr: SocketAddr,
    groups: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(children, addr, timeout, groups.max(1)).await
}

/// SERVING, and with `groups > 0` a model with that many replicas; fails when a child exits or
/// the timeout passes.
async fn wait_until(
    children: &mut Children,
    addr: SocketAddr,
    timeout: Duration,
    groups: usize,
) -> anyhow::Result<()> {
    let url = format!("http://{addr}");
    let check = async {
        loop {
            if is_serving(&url).await && (groups == 0 || replicas(&url).await >= groups) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let what = if groups == 0 {
        "report SERVING".to_owned()
    } else {
        format!("serve a model on {groups} worker group(s)")
    };
    tokio::select! {
        _ = check => Ok(()),
        (name, status) = children.first_exit() => Err(anyhow::anyhow!(
            "{name} exited during startup ({}); see its log above",
            describe(status)
        )),
        _ = tokio::time::sleep(timeout) => Err(anyhow::anyhow!(
            "the server at {addr} did not {what} within {timeout:?}"
        )),
    }
}

/// The most replicas any model has on the router at `url` (0 when it can't tell).
async fn replicas(url: &str) -> usize {
    use tandem_proto::v1::generation_client::GenerationClient;
    let Some(channel) = connect(url).await else {
        return 0;
    };
    match GenerationClient::new(channel)
        .list_models(tandem_proto::v1::ListModelsRequest {})
        .await
    {
        Ok(r) => r
            .get_ref()
            .models
            .iter()
            .map(|m| m.replicas as usize)
            .max()
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// A channel to `url`, or None when it doesn't answer within a second.
async fn connect(url: &str) -> Option<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()
}

async fn is_serving(url: &str) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let Some(channel) = connect(url).await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    matches!(
        client.check(HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

pub fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}
