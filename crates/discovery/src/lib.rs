//! Service discovery: a [`Registry`] where instances register a key under a lease and others
//! watch a key prefix. Two backends, chosen at construction; callers never know which:
//!
//! - [`Registry::in_memory`]: one process's map (the static default of `tandem up`, and tests);
//! - [`Registry::etcd`]: etcd v3. A registration holds a lease (TTL [`DEFAULT_TTL`]) kept alive
//!   by its own task and put back under a new lease if etcd reports the lease gone; a watch lists
//!   the prefix, then follows it from the next revision and, after losing etcd, resumes from the
//!   last revision it saw (re-listing only if etcd compacted that revision away).
//!
//! Neither [`Registry::register`] nor [`Registry::watch`] waits for etcd: both start a task that
//! retries until etcd answers, so a service starts (and keeps serving) while etcd is down.
//!
//! Registering an instance (a draft service, say) and following a prefix:
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_discovery::DiscoveryError> {
//! use tandem_discovery::{Keys, Registry};
//!
//! let registry = Registry::etcd(&["http://127.0.0.1:2379".to_owned()]).await?;
//! let keys = Keys::new("default")?;
//! // Any serde value; by convention a JSON object with a `version` field.
//! let me = registry.register(
//!     &keys.draft("qwen-0.5b", "draft-0"),
//!     &serde_json::json!({"version": 1, "address": "http://10.0.0.5:50071"}),
//! )?;
//! me.registered().await; // optional: wait until etcd has it
//!
//! let mut drafts = registry.view(&keys.drafts_of("qwen-0.5b"));
//! loop {
//!     let state = drafts.current();
//!     for (key, value) in &state.entries { /* ... */ }
//!     if !state.connected { /* serving from the last known set */ }
//!     drafts.changed().await;
//! }
//! # }
//! ```
//!
//! Dropping a [`Registration`] deletes its key in the background (etcd would expire it after
//! the TTL anyway); [`Registration::deregister`] deletes it and waits.

mod etcd;
mod keys;
mod memory;
mod records;
mod rendezvous;
pub mod testing;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use keys::{group_id_from_address, Keys, DEFAULT_CLUSTER};
pub use records::{parse_record, DraftRecord, GroupRecord, RendezvousRecord, RECORD_VERSION};
pub use rendezvous::{rendezvous, Rendezvous};

/// Lease TTL of registrations: an instance that dies silently disappears after this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid {what} name '{value}': {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "no etcd endpoints: pass --etcd-endpoints http://HOST:2379[,...] (or leave it unset for \
         the static list)"
    )]
    NoEndpoints,
    #[error("serializing the value of {key}: {source}")]
    Serialize {
        key: String,
        source: serde_json::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("TLS to etcd: {0}")]
    Tls(String),
    #[error("registration task ended unexpectedly: {0}")]
    TaskFailed(String),
    #[error(
        "rendezvous of group '{group}': not every one of its {world_size} ranks registered within \
         {timeout:?} (present: [{present}]); start every rank with the same --group and \
         --world-size"
    )]
    Rendezvous {
        group: String,
        world_size: usize,
        timeout: Duration,
        present: String,
    },
}

/// Options of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Lease TTL of registrations.
    pub ttl: Duration,
    /// Bound on each etcd call, and on the time to notice a dead connection.
    pub request_timeout: Duration,
    /// TLS to etcd (`--etcd-ca`, and a client certificate for etcd's `--client-cert-auth`).
    /// `None`: plaintext.
    pub tls: Option<EtcdTls>,
}

/// PEM files for a TLS connection to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA etcd's server certificate chains to.
    pub ca: std::path::PathBuf,
    /// This client's certificate and key (etcd with `--client-cert-auth`).
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            request_timeout: Duration::from_secs(3),
            tls: None,
        }
    }
}

/// Where instances register and watchers look. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Registry {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<memory::Memory>),
    Etcd(Arc<etcd::Etcd>),
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backend", &self.kind())
            .finish()
    }
}

impl Registry {
    /// A registry local to this process: registrations are visible to this process's watchers
    /// only, and never expire.
    pub fn in_memory() -> Self {
        Self {
            backend: Backend::Memory(Arc::new(memory::Memory::default())),
        }
    }

    /// An etcd registry with the default options. Returns without contacting etcd.
    pub async fn etcd(endpoints: &[String]) -> Result<Self, DiscoveryError> {
        Self::etcd_with(endpoints, EtcdOptions::default()).await
    }

    /// An etcd registry with the default options, over TLS when `tls` is set.
    pub async fn etcd_tls(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
    ) -> Result<Self, DiscoveryError> {
        let options = EtcdOptions {
            tls: tls.cloned(),
            ..Default::default()
        };
        Self::etcd_with(endpoints, options).await
    }

    pub async fn etcd_with(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, DiscoveryError> {
        Ok(Self {
            backend: Backend::Etcd(Arc::new(etcd::Etcd::connect(endpoints, options).await?)),
        })
    }

    /// `"memory"` or `"etcd"`, for logs.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::Etcd(_) => "etcd",
        }
    }

    /// Puts `key` = `value` (as JSON) for as long as the returned handle lives, under a lease
    /// with etcd. Returns at once; a task registers (retrying while etcd is unreachable), keeps
    /// the lease alive, and registers again under a new lease if the old one was lost. Must be
    /// called inside a Tokio runtime.
    pub fn register<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Registration, DiscoveryError> {
        let value = serde_json::to_string(value).map_err(|source| DiscoveryError::Serialize {
            key: key.to_owned(),
            source,
        })?;
        let (state_tx, state) = watch::channel(RegistrationState::Pending);
        let (stop, stop_rx) = watch::channel(false);
        let task = match &self.backend {
            Backend::Memory(m) => tokio::spawn(memory::register(
                m.clone(),
                key.to_owned(),
                value,
                state_tx,
                stop_rx,
            )),
            Backend::Etcd(e) => tokio::spawn(etcd::register(
                e.clone(),
                key.to_owned(),
                value,
                state_tx,
                stop_rx,
            )),
        };
        Ok(Registration {
            key: key.to_owned(),
            state,
            stop,
            task: Some(task),
        })
    }

    /// Follows every key under `prefix`: first a `Put` per existing key and `Connected`, then
    /// changes as they happen. See [`WatchEvent`]. The watch stops when dropped.
    pub fn watch(&self, prefix: &str) -> Watch {
        let (tx, rx) = mpsc::channel(1024);
        let task = match &self.backend {
            Backend::Memory(m) => tokio::spawn(memory::watch(m.clone(), prefix.to_owned(), tx)),
            Backend::Etcd(e) => tokio::spawn(etcd::watch(e.clone(), prefix.to_owned(), tx)),
        };
        Watch { rx, task }
    }

    /// The keys under `prefix` and their values, once (no watch).
    pub async fn list(&self, prefix: &str) -> Result<BTreeMap<String, String>, DiscoveryError> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.list(prefix)),
            Backend::Etcd(e) => e.list(prefix).await.map(|(entries, _)| entries),
        }
    }

    /// The current set under `prefix`, kept up to date by a task that follows [`Self::watch`].
    pub fn view(&self, prefix: &str) -> View {
        let (tx, rx) = watch::channel(Arc::new(ViewState::default()));
        let mut events = self.watch(prefix);
        let task = tokio::spawn(async move {
            let mut state = ViewState::default();
            while let Some(ev) = events.next().await {
                match ev {
                    WatchEvent::Put { key, value } => {
                        state.entries.insert(key, value);
                    }
                    WatchEvent::Delete { key } => {
                        state.entries.remove(&key);
                    }
                    WatchEvent::Connected => {
                        state.connected = true;
                        state.synced = true;
                        state.error = None;
                    }
                    WatchEvent::Disconnected { error } => {
                        state.connected = false;
                        state.error = Some(error);
                    }
                }
                tx.send_replace(Arc::new(state.clone()));
            }
        });
        View { rx, task }
    }
}

/// What a watch reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `key` was created or changed.
    Put { key: String, value: String },
    /// `key` was deleted, or its lease expired.
    Delete { key: String },
    /// The watch is following the registry (after the initial listing, and again after each
    /// reconnection; events missed meanwhile come as Put/Delete).
    Connected,
    /// The registry is unreachable; the watch retries. Keys reported so far are the last known
    /// state.
    Disconnected { error: String },
}

/// A stream of [`WatchEvent`]s; stops its task when dropped.
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

impl Watch {
    /// The next event; `None` only if the watch task ended (it runs until dropped).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A prefix's last known contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewState {
    /// Full key → value (JSON text).
    pub entries: BTreeMap<String, String>,
    /// Following the registry now. False before the first listing and while it is unreachable.
    pub connected: bool,
    /// The first listing arrived (`entries` is meaningful, if perhaps stale).
    pub synced: bool,
    /// Why it is disconnected.
    pub error: Option<String>,
}

/// See [`Registry::view`].
pub struct View {
    rx: watch::Receiver<Arc<ViewState>>,
    task: JoinHandle<()>,
}

impl View {
    pub fn current(&self) -> Arc<ViewState> {
        self.rx.borrow().clone()
    }

    /// Waits for the next change after the last [`View::current`] or `changed` call.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The task ended (runtime shutting down): nothing will change any more.
            std::future::pending::<()>().await;
        }
        self.rx.borrow_and_update();
    }

    /// A receiver of the state, for callers that select over several sources.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ViewState>> {
        self.rx.clone()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered yet (first attempt under way).
    Pending,
    /// The key is in the registry (under lease `lease`; 0 for the in-memory backend).
    Registered { lease: i64 },
    /// The registry is unreachable or refused; retrying. The key may still be there (its lease
    /// not expired yet) or not.
    Retrying { error: String },
    /// Deregistered (or stopping).
    Deregistered,
}

/// A registered key. Dropping it deletes the key in the background; [`Self::deregister`]
/// deletes it and waits.
pub struct Registration {
    key: String,
    state: watch::Receiver<RegistrationState>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), DiscoveryError>>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Registration {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// Waits until the key is in the registry (returns at once if it is).
    pub async fn registered(&self) {
        let mut rx = self.state.clone();
        let _ = rx
            .wait_for(|s| matches!(s, RegistrationState::Registered { .. }))
            .await;
    }

    /// Deletes the key (revokes its lease) and waits for that, up to the request timeout; when
    /// etcd is unreachable the key expires with its lease instead.
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        self.stop.send_replace(true);
        match self.task.take() {
            Some(t) => t
                .await
                .map_err(|e| DiscoveryError::TaskFailed(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // The task sees this and revokes the lease on its own.
        self.stop.send_replace(true);
    }
}

/// Retry delays: 100 ms doubling to 2 s, so a registry that comes back is used within ~2 s.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

/// Sleeps `d` unless `stop` turns true first; returns true when stopped.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_register_watch_view() {
        let r = Registry::in_memory();
        let a = r.register("/p/a", &1).unwrap();
        a.registered().await;
        let mut w = r.watch("/p/");
        assert_eq!(
            w.next().await,
            Some(WatchEvent::Put {
                key: "/p/a".into(),
                value: "1".into()
            })
        );
        assert_eq!(w.next().await, Some(WatchEvent::Connected));
        let mut view = r.view("/p/");
        let _outside = r.register("/q/x", &0).unwrap();
        let b = r.register("/p/b", &2).unwrap();
        assert_eq!(
            w.next().await,
            Some(WatchEvent::Put {
                key: "/p/b".into(),
                value: "2".into()
            })
        );
        b.deregister().await.unwrap();
        assert_eq!(
            w.next().await,
            Some(WatchEvent::Delete { key: "/p/b".into() })
        );
        drop(a);
        assert_eq!(
            w.next().await,
            Some(WatchEvent::Delete { key: "/p/a".into() })
        );
        while !view.current().entries.is_empty() || !view.current().connected {
            view.changed().await;
        }
        assert!(r.list("/p/").await.unwrap().is_empty());
        assert_eq!(r.list("/q/").await.unwrap().len(), 1);
    }
}
