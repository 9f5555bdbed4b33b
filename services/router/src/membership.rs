//! Which worker groups exist. The router asks on every poll, so a backend that watches a
//! registry (etcd, Kubernetes) only has to keep its answer current; callers never know which
//! backend they have.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tandem_discovery::{parse_record, GroupRecord, Keys, Registry, View};
use tokio::sync::Notify;

/// The set of group leaders (their `http://host:port` shard endpoints) the router may use.
/// Health is not the backend's concern: the router polls every endpoint itself.
pub trait Membership: Send + Sync + 'static {
    /// The current endpoints. Called about once a second; must not block.
    fn endpoints(&self) -> Vec<String>;

    /// Whether the backend follows a registry, and whether it can reach it now.
    fn status(&self) -> MembershipStatus {
        MembershipStatus::Static
    }

    /// Notified when the endpoints change, so the router polls at once instead of at its next
    /// interval; `None`: the set never changes by itself.
    fn changes(&self) -> Option<Arc<Notify>> {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipStatus {
    /// A fixed list.
    Static,
    /// Following a registry. While `connected` is false the endpoints are the last known set.
    Registry {
        connected: bool,
        error: Option<String>,
    },
}

/// A fixed list from configuration (`--workers`), the default of `tandem up`.
#[derive(Debug, Clone, Default)]
pub struct StaticMembership {
    endpoints: Vec<String>,
}

impl StaticMembership {
    /// Normalizes each entry: surrounding space is trimmed, empty entries are dropped, and a
    /// bare `host:port` gets `http://`, so `--workers 127.0.0.1:50061` works.
    pub fn new(endpoints: impl IntoIterator<Item = String>) -> Self {
        let mut out: Vec<String> = Vec::new();
        for e in endpoints {
            let e = e.trim();
            if e.is_empty() {
                continue;
            }
            let url = if e.contains("://") {
                e.to_owned()
            } else {
                format!("http://{e}")
            };
            if !out.contains(&url) {
                out.push(url);
            }
        }
        Self { endpoints: out }
    }
}

impl Membership for StaticMembership {
    fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }
}

/// Groups from a registry (`groups/` under the cluster's keys, every model), plus an optional
/// fixed list. The view task keeps the last known set while the registry is unreachable.
pub struct RegistryMembership {
    view: View,
    fixed: StaticMembership,
    changes: Arc<Notify>,
    /// Keys whose value could not be parsed, warned about once.
    warned: Mutex<HashSet<String>>,
    _forward: tokio::task::JoinHandle<()>,
}

impl RegistryMembership {
    /// Starts following the registry (must run inside a Tokio runtime).
    pub fn new(registry: &Registry, keys: &Keys, fixed: StaticMembership) -> Self {
        let view = registry.view(&keys.groups());
        let changes = Arc::new(Notify::new());
        let mut rx = view.subscribe();
        let notify = changes.clone();
        let forward = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                notify.notify_one();
            }
        });
        Self {
            view,
            fixed,
            changes,
            warned: Mutex::new(HashSet::new()),
            _forward: forward,
        }
    }
}

impl Drop for RegistryMembership {
    fn drop(&mut self) {
        self._forward.abort();
    }
}

impl Membership for RegistryMembership {
    fn endpoints(&self) -> Vec<String> {
        let state = self.view.current();
        let mut out = self.fixed.endpoints();
        for (key, value) in &state.entries {
            match parse_record::<GroupRecord>(value) {
                Ok(r) => {
                    for url in StaticMembership::new([r.leader]).endpoints {
                        if !out.contains(&url) {
                            out.push(url);
                        }
                    }
                }
                Err(e) => {
                    let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
                    if warned.insert(key.clone()) {
                        tracing::warn!(%key, error = %e, "ignoring a group record");
                    }
                }
            }
        }
        out
    }

    fn status(&self) -> MembershipStatus {
        let state = self.view.current();
        MembershipStatus::Registry {
            connected: state.connected,
            error: state.error.clone(),
        }
    }

    fn changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn static_membership_normalizes() {
        let m = StaticMembership::new(
            [" 127.0.0.1:1 ", "", "http://h:2", "127.0.0.1:1"].map(String::from),
        );
        assert_eq!(m.endpoints(), vec!["http://127.0.0.1:1", "http://h:2"]);
    }

    #[tokio::test]
    async fn registry_membership_follows_group_records() {
        let registry = Registry::in_memory();
        let keys = Keys::new("c").unwrap();
        let m = RegistryMembership::new(
            &registry,
            &keys,
            StaticMembership::new(["fixed:1".to_owned()]),
        );
        let changes = m.changes().unwrap();
        let record = |leader: &str| GroupRecord {
            version: tandem_discovery::RECORD_VERSION,
            model: "m".into(),
            group: "g".into(),
            leader: leader.into(),
            tp_size: 1,
            tokenizer_hash: "h".into(),
            capacity: 4,
        };
        let a = registry
            .register(&keys.group("m", "a"), &record("127.0.0.1:5"))
            .unwrap();
        let _bad = registry
            .register(&keys.group("m", "bad"), &serde_json::json!({"version": 9}))
            .unwrap();
        while m.endpoints().len() < 2 {
            changes.notified().await;
        }
        assert_eq!(m.endpoints(), vec!["http://fixed:1", "http://127.0.0.1:5"]);
        assert_eq!(
            m.status(),
            MembershipStatus::Registry {
                connected: true,
                error: None
            }
        );
        drop(a);
        while m.endpoints().len() > 1 {
            changes.notified().await;
        }
        assert_eq!(m.endpoints(), vec!["http://fixed:1"]);
    }
}
