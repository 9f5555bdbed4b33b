//! The in-memory backend: a map and a broadcast of changes, inside one process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, watch};

use crate::{DiscoveryError, RegistrationState, WatchEvent};

pub struct Memory {
    state: Mutex<BTreeMap<String, String>>,
    changes: broadcast::Sender<WatchEvent>,
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            state: Mutex::new(BTreeMap::new()),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl Memory {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // A panic while holding the lock leaves a consistent map (each change is one call).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self, prefix: &str) -> BTreeMap<String, String> {
        self.map()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn put(&self, key: &str, value: &str) {
        let mut map = self.map();
        map.insert(key.to_owned(), value.to_owned());
        // Sent under the lock, so watchers see changes in map order. No receivers is fine.
        let _ = self.changes.send(WatchEvent::Put {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }

    fn delete(&self, key: &str) {
        let mut map = self.map();
        if map.remove(key).is_some() {
            let _ = self.changes.send(WatchEvent::Delete {
                key: key.to_owned(),
            });
        }
    }
}

pub async fn register(
    m: Arc<Memory>,
    key: String,
    value: String,
    state: watch::Sender<RegistrationState>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), DiscoveryError> {
    m.put(&key, &value);
    state.send_replace(RegistrationState::Registered { lease: 0 });
    let _ = stop.wait_for(|s| *s).await;
    m.delete(&key);
    state.send_replace(RegistrationState::Deregistered);
    Ok(())
}

pub async fn watch(m: Arc<Memory>, prefix: String, tx: mpsc::Sender<WatchEvent>) {
    // Subscribe before listing, so nothing between the two is missed (a change seen twice is
    // harmless: Put and Delete are idempotent for a consumer keeping a map).
    let mut rx = m.changes.subscribe();
    let mut known = m.list(&prefix);
    for (key, value) in &known {
        let ev = WatchEvent::Put {
            key: key.clone(),
            value: value.clone(),
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
    if tx.send(WatchEvent::Connected).await.is_err() {
        return;
    }
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed changes: report the difference to what we told the consumer.
                let now = m.list(&prefix);
                for ev in diff(&known, &now) {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                known = now;
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let key = match &ev {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
            _ => continue,
        };
        if !key.starts_with(&prefix) {
            continue;
        }
        match &ev {
            WatchEvent::Put { key, value } => {
                known.insert(key.clone(), value.clone());
            }
            WatchEvent::Delete { key } => {
                known.remove(key);
            }
            _ => {}
        }
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// Events that turn `old` into `new`.
pub fn diff(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            out.push(WatchEvent::Delete { key: key.clone() });
        }
    }
    for (key, value) in new {
        if old.get(key) != Some(value) {
            out.push(WatchEvent::Put {
                key: key.clone(),
                value: value.clone(),
            });
        }
    }
    out
}
