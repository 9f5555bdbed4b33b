//! API keys on the public API: who may call, which models, how much.
//!
//! Keys come from a TOML file (`--api-keys`, a Kubernetes secret in the chart) that holds only
//! SHA-256 digests of the keys, re-read when it changes. Clients send `authorization: Bearer
//! <key>`. A missing or unknown key is UNAUTHENTICATED; a key not allowed the model is
//! PERMISSION_DENIED; over its requests-per-second or tokens-per-minute budget (token buckets)
//! RESOURCE_EXHAUSTED, with the delay before a retry would pass in the message and in the
//! standard `google.rpc.RetryInfo` detail. Metrics carry the key's name, never the key.
//!
//! ```toml
//! [[key]]
//! name = "search-service"                 # shown in metrics and logs
//! sha256 = "9f86d08188..."                # `tandem api-key` prints a new key and this line
//! models = ["qwen2.5-coder-1.5b"]         # optional: every model when absent
//! requests_per_second = 20                # optional
//! tokens_per_minute = 200000              # optional: prompt + max_new_tokens of each request
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// How often the key file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    #[serde(default)]
    models: Vec<String>,
    requests_per_second: Option<f64>,
    tokens_per_minute: Option<f64>,
}

/// A token bucket: `capacity` tokens, refilled at `per_second`.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_second: f64) -> Self {
        Self {
            capacity,
            per_second,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens now, or says how long until they would be there.
    fn take(&mut self, n: f64) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.capacity);
        self.last = now;
        if n > self.capacity {
            // Never fits: wait for a full bucket, then the caller must ask for less.
            return Err(Duration::from_secs_f64(
                (self.capacity - self.tokens).max(0.0) / self.per_second,
            ));
        }
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.per_second))
        }
    }
}

/// One key's limits and their live buckets (kept across reloads while the limits stay).
#[derive(Debug)]
struct Limits {
    requests_per_second: Option<f64>,
    tokens_per_minute: Option<f64>,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

impl Limits {
    fn new(rps: Option<f64>, tpm: Option<f64>) -> Self {
        Self {
            requests_per_second: rps,
            tokens_per_minute: tpm,
            // A second's worth of requests may come at once; a minute's worth of tokens.
            requests: rps.map(|r| Mutex::new(Bucket::new(r.max(1.0), r))),
            tokens: tpm.map(|t| Mutex::new(Bucket::new(t, t / 60.0))),
        }
    }
}

/// Who called: the key's name and what it may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    models: Vec<String>,
    limits: Arc<Limits>,
}

fn exhausted(name: &str, what: &str, wait: Duration) -> Status {
    let secs = wait.as_secs_f64().max(0.001);
    let details =
        tonic_types::ErrorDetails::with_retry_info(Some(wait.max(Duration::from_millis(1))));
    <Status as tonic_types::StatusExt>::with_error_details(
        Code::ResourceExhausted,
        format!("api key '{name}': over its {what}; retry in {secs:.3} s"),
        details,
    )
}

impl Caller {
    /// PERMISSION_DENIED unless the key may use `model`.
    pub fn allow_model(&self, model: &str) -> Result<(), Status> {
        if self.models.is_empty() || self.models.iter().any(|m| m == model) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "api key '{}' may not use model '{}' (allowed: {})",
            self.name,
            model.chars().take(64).collect::<String>(),
            self.models.join(", ")
        )))
    }

    /// One request against the requests-per-second budget.
    pub fn take_request(&self) -> Result<(), Status> {
        match &self.limits.requests {
            Some(b) => b
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(1.0)
                .map_err(|w| {
                    exhausted(
                        &self.name,
                        &format!(
                            "limit of {} requests per second",
                            self.limits.requests_per_second.unwrap_or_default()
                        ),
                        w,
                    )
                }),
            None => Ok(()),
        }
    }

    /// `n` tokens (prompt + max_new_tokens) against the tokens-per-minute budget.
    pub fn take_tokens(&self, n: usize) -> Result<(), Status> {
        match &self.limits.tokens {
            Some(b) => b
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(n as f64)
                .map_err(|w| {
                    exhausted(
                        &self.name,
                        &format!(
                            "limit of {} tokens per minute ({n} asked: prompt + max_new_tokens)",
                            self.limits.tokens_per_minute.unwrap_or_default()
                        ),
                        w,
                    )
                }),
            None => Ok(()),
        }
    }
}

struct Key {
    digest: [u8; 32],
    caller: Caller,
}

/// The key file, loaded and watched.
pub struct ApiKeys {
    path: PathBuf,
    keys: RwLock<Vec<Key>>,
    seen: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Equal without an early exit: how long a comparison takes says nothing about how much of a
/// digest matched. (`subtle` would do the same for these 32 bytes; not worth a dependency.)
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse(path: &Path, old: &[Key]) -> Result<Vec<Key>, AuthError> {
    let bad = |reason: String| AuthError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let file: KeyFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut names = HashMap::new();
    let mut keys = Vec::with_capacity(file.key.len());
    for (i, e) in file.key.into_iter().enumerate() {
        if e.name.trim().is_empty() {
            return Err(bad(format!("key {}: empty name", i + 1)));
        }
        if names.insert(e.name.clone(), ()).is_some() {
            return Err(bad(format!("key '{}' appears twice", e.name)));
        }
        let hex = e.sha256.trim().to_ascii_lowercase();
        let mut digest = [0u8; 32];
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad(format!(
                "key '{}': sha256 must be 64 hex digits (tandem api-key prints one)",
                e.name
            )));
        }
        for (j, d) in digest.iter_mut().enumerate() {
            *d = u8::from_str_radix(&hex[2 * j..2 * j + 2], 16)
                .map_err(|_| bad(format!("key '{}': sha256 must be 64 hex digits", e.name)))?;
        }
        for (what, v) in [
            ("requests_per_second", e.requests_per_second),
            ("tokens_per_minute", e.tokens_per_minute),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(bad(format!("key '{}': {what} must be above 0", e.name)));
            }
        }
        // Same limits: keep the live buckets, so a reload is not a free refill.
        let limits = old
            .iter()
            .find(|k| {
                k.caller.name == e.name
                    && k.caller.limits.requests_per_second == e.requests_per_second
                    && k.caller.limits.tokens_per_minute == e.tokens_per_minute
            })
            .map(|k| k.caller.limits.clone())
            .unwrap_or_else(|| Arc::new(Limits::new(e.requests_per_second, e.tokens_per_minute)));
        keys.push(Key {
            digest,
            caller: Caller {
                name: e.name,
                models: e.models,
                limits,
            },
        });
    }
    Ok(keys)
}

impl ApiKeys {
    /// Loads the file now: a bad file fails the router's start, naming the file and the key.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let keys = parse(path, &[])?;
        Ok(Self {
            path: path.to_owned(),
            keys: RwLock::new(keys),
            seen: Mutex::new(stamp(path)),
        })
    }

    /// Re-reads the file if it changed; a broken edit keeps the previous keys (logged).
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.path);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if now == *seen {
            return;
        }
        let old = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        match parse(&self.path, &old) {
            Ok(keys) => {
                drop(old);
                let n = keys.len();
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
                *seen = now;
                tracing::info!(path = %self.path.display(), keys = n, "API keys reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "API key file changed but does not load; keeping the previous keys")
            }
        }
    }

    /// Reloads on change, every [`RELOAD_EVERY`], for as long as `self` lives.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                match weak.upgrade() {
                    Some(k) => k.reload_if_changed(),
                    None => return,
                }
            }
        })
    }

    /// The caller of a request, from `authorization: Bearer <key>`.
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Caller, Status> {
        let Some(v) = md.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing api key: send the metadata `authorization: Bearer <key>`",
            ));
        };
        let key = v
            .to_str()
            .ok()
            .and_then(|s| {
                s.strip_prefix("Bearer ")
                    .or_else(|| s.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("authorization must be `Bearer <key>` (an api key)")
            })?;
        let d = digest(key.as_bytes());
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Every entry is compared (no early exit), so timing tells nothing about which matched.
        let mut found = None;
        for k in keys.iter() {
            if same(&k.digest, &d) && found.is_none() {
                found = Some(k.caller.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("unknown api key"))
    }
}

/// A new random key and its file entry, for `tandem api-key`.
pub fn new_key(name: &str) -> (String, String) {
    use rand::Rng as _;
    let mut bytes = [0u8; 24];
    rand::rng().fill(&mut bytes);
    let key: String = format!(
        "tdm_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let hex: String = digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let entry = format!("[[key]]\nname = {name:?}\nsha256 = \"{hex}\"\n");
    (key, entry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[test]
    fn keys_models_and_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (key, entry) = new_key("svc");
        std::fs::write(
            &path,
            format!("{entry}models = [\"m\"]\nrequests_per_second = 2\n"),
        )
        .unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        let c = keys.authenticate(&md(&format!("Bearer {key}"))).unwrap();
        assert_eq!(c.name, "svc");
        assert!(c.allow_model("m").is_ok());
        assert_eq!(
            c.allow_model("other").unwrap_err().code(),
            Code::PermissionDenied
        );
        assert!(c.take_request().is_ok() && c.take_request().is_ok());
        let e = c.take_request().unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("retry in"), "{}", e.message());
        let info = tonic_types::StatusExt::get_details_retry_info(&e).unwrap();
        assert!(info.retry_delay.unwrap() > Duration::ZERO);
        for bad in ["", "Bearer ", "Basic abc", "Bearer wrong"] {
            let e = keys.authenticate(&md(bad)).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad}");
        }
        assert_eq!(
            keys.authenticate(&MetadataMap::new()).unwrap_err().code(),
            Code::Unauthenticated
        );
        for bad in [
            "[[key]]\nname = \"a\"\nsha256 = \"zz\"\n",
            "[[key]]\nname = \"a\"\nsha256 = \"00\"\nrate = 1\n",
            &format!("{entry}{entry}"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = ApiKeys::load(&path).unwrap_err().to_string();
            assert!(e.contains("keys.toml"), "{e}");
        }
    }

    #[test]
    fn a_token_bucket_refills_and_says_when() {
        let mut b = Bucket::new(60.0, 1.0);
        assert!(b.take(60.0).is_ok());
        let wait = b.take(2.0).unwrap_err();
        assert!(wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2));
        assert!(b.take(61.0).is_err(), "more than the capacity never fits");
    }
}
