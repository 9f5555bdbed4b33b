//! The etcd backend. Every call is bounded by `request_timeout`; HTTP/2 keep-alive pings find a
//! dead connection within about two timeouts, so watches and keep-alives notice a lost etcd even
//! when no packet comes back.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchResponse,
};
use tokio::sync::{mpsc, watch};

use crate::{
    memory::diff, sleep_or_stop, Backoff, DiscoveryError, EtcdOptions, RegistrationState,
    WatchEvent,
};

pub struct Etcd {
    client: Client,
    options: EtcdOptions,
    endpoints: Vec<String>,
}

impl Etcd {
    pub async fn connect(
        endpoints: &[String],
        options: EtcdOptions,
    ) -> Result<Self, DiscoveryError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| {
                let scheme = if options.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                match e.split_once("://") {
                    // With TLS every endpoint is dialled over https, whatever it was written as.
                    Some((_, rest)) if options.tls.is_some() => format!("https://{rest}"),
                    Some(_) => e.to_owned(),
                    None => format!("{scheme}://{e}"),
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(DiscoveryError::NoEndpoints);
        }
        let t = options.request_timeout;
        // Lazy: nothing is dialed here, so a service starts while etcd is down.
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_keep_alive(t, t)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls_options(tls)?);
        }
        let client = Client::connect(&endpoints, Some(connect)).await?;
        Ok(Self {
            client,
            options,
            endpoints,
        })
    }

    /// Runs one etcd call under the request timeout.
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DiscoveryError> {
        let t = self.options.request_timeout;
        match tokio::time::timeout(t, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(DiscoveryError::Timeout(t)),
        }
    }

    /// The keys under `prefix` and the store revision they were read at.
    pub async fn list(
        &self,
        prefix: &str,
    ) -> Result<(BTreeMap<String, String>, i64), DiscoveryError> {
        let mut c = self.client.clone();
        let resp = self
            .call(c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect();
        Ok((entries, revision))
    }

    async fn put_under_new_lease(&self, key: &str, value: &str) -> Result<i64, DiscoveryError> {
        let mut c = self.client.clone();
        let ttl = self.options.ttl.as_secs().max(1) as i64;
        let lease = self.call(c.lease_grant(ttl, None)).await?.id();
        self.call(c.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(lease)
    }
}

/// The registration task: put under a lease, keep it alive, put again under a new lease when
/// etcd says the lease is gone; on stop, revoke.
pub async fn register(
    etcd: Arc<Etcd>,
    key: String,
    value: String,
    state: watch::Sender<RegistrationState>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), DiscoveryError> {
    let mut backoff = Backoff::new();
    let mut lease: Option<i64> = None;
    while !*stop.borrow() {
        let id = match lease {
            Some(id) => id,
            None => {
                let attempt = tokio::select! {
                    r = etcd.put_under_new_lease(&key, &value) => r,
                    _ = stop.wait_for(|s| *s) => break,
                };
                match attempt {
                    Ok(id) => {
                        tracing::info!(%key, lease = id, "registered");
                        backoff.reset();
                        lease = Some(id);
                        state.send_replace(RegistrationState::Registered { lease: id });
                        id
                    }
                    Err(e) => {
                        let error = e.to_string();
                        if !matches!(&*state.borrow(), RegistrationState::Retrying { .. }) {
                            tracing::warn!(%key, endpoints = ?etcd.endpoints, %error,
                                "cannot register in etcd; retrying");
                        }
                        state.send_replace(RegistrationState::Retrying { error });
                        if sleep_or_stop(backoff.next(), &mut stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        match keep_alive(&etcd, id, &state, &mut stop).await {
            KeepAlive::Stopped => break,
            KeepAlive::Lost => {
                tracing::warn!(%key, lease = id, "etcd lost the lease; registering again");
                lease = None;
                // Not registered until the key is put back under a new lease.
                state.send_replace(RegistrationState::Pending);
            }
        }
    }
    state.send_replace(RegistrationState::Deregistered);
    if let Some(id) = lease {
        let mut c = etcd.client.clone();
        // Revoking deletes the key at once; if etcd is unreachable it expires with the lease.
        match etcd.call(c.lease_revoke(id)).await {
            Ok(_) => tracing::info!(%key, "deregistered"),
            Err(e) => {
                tracing::warn!(%key, error = %e, "could not revoke the lease; the key expires with it");
                return Err(e);
            }
        }
    }
    Ok(())
}

enum KeepAlive {
    Stopped,
    /// etcd answered that the lease does not exist (expired or revoked).
    Lost,
}

/// Refreshes lease `id` every TTL/3 until stopped or etcd says it is gone. Unreachable etcd is
/// not a loss: the lease may outlive the outage (etcd restores leases with a fresh TTL when it
/// restarts), so this keeps trying the same lease and only reports `Retrying`.
async fn keep_alive(
    etcd: &Etcd,
    id: i64,
    state: &watch::Sender<RegistrationState>,
    stop: &mut watch::Receiver<bool>,
) -> KeepAlive {
    let ttl = etcd.options.ttl;
    let interval = ttl / 3;
    let mut last_ok = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        let mut c = etcd.client.clone();
        let error = match etcd.call(c.lease_keep_alive(id)).await {
            Ok((mut keeper, mut stream)) => loop {
                if let Err(e) = etcd.call(keeper.keep_alive()).await {
                    break e.to_string();
                }
                match etcd.call(stream.message()).await {
                    Ok(Some(resp)) if resp.ttl() > 0 => {
                        last_ok = Instant::now();
                        backoff.reset();
                        if !matches!(&*state.borrow(), RegistrationState::Registered { .. }) {
                            tracing::info!(lease = id, "etcd reachable again; lease kept");
                            state.send_replace(RegistrationState::Registered { lease: id });
                        }
                    }
                    Ok(Some(_)) => return KeepAlive::Lost,
                    Ok(None) => break "keep-alive stream closed".to_owned(),
                    Err(e) => break e.to_string(),
                }
                if sleep_or_stop(interval, stop).await {
                    return KeepAlive::Stopped;
                }
            },
            Err(e) => e.to_string(),
        };
        if last_ok.elapsed() >= ttl
            && !matches!(&*state.borrow(), RegistrationState::Retrying { .. })
        {
            tracing::warn!(lease = id, %error, "no keep-alive answer for a whole TTL; retrying");
            state.send_replace(RegistrationState::Retrying { error });
        }
        if sleep_or_stop(backoff.next(), stop).await {
            return KeepAlive::Stopped;
        }
    }
}

/// The watch task: list, then follow from the next revision; on a lost connection report
/// `Disconnected` and resume from the last revision seen; re-list only when that revision has
/// been compacted (reporting the difference to what was already reported).
pub async fn watch(etcd: Arc<Etcd>, prefix: String, tx: mpsc::Sender<WatchEvent>) {
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    // The revision up to which `known` is complete; None: list first.
    let mut revision: Option<i64> = None;
    let mut connected = false;
    // Disconnected was reported and not followed by Connected yet: don't repeat it per retry.
    let mut reported_down = false;
    let mut backoff = Backoff::new();
    loop {
        let error = match follow(
            &etcd,
            &prefix,
            &tx,
            &mut known,
            &mut revision,
            &mut connected,
        )
        .await
        {
            Ok(()) => return, // the consumer is gone
            Err(e) => e,
        };
        let was_connected = std::mem::replace(&mut connected, false);
        if was_connected {
            backoff.reset();
        }
        if was_connected || !reported_down {
            reported_down = true;
            tracing::warn!(%prefix, endpoints = ?etcd.endpoints, %error,
                "etcd watch lost; serving the last known state and retrying");
            if tx.send(WatchEvent::Disconnected { error }).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// One connection's worth of watching. Returns `Ok` when the consumer went away, `Err` with the
/// reason when etcd did.
async fn follow(
    etcd: &Etcd,
    prefix: &str,
    tx: &mpsc::Sender<WatchEvent>,
    known: &mut BTreeMap<String, String>,
    revision: &mut Option<i64>,
    connected: &mut bool,
) -> Result<(), String> {
    if revision.is_none() {
        let (now, rev) = etcd.list(prefix).await.map_err(|e| e.to_string())?;
        for ev in diff(known, &now) {
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
        }
        *known = now;
        *revision = Some(rev);
    }
    let start = revision.map_or(0, |r| r + 1);
    let mut c = etcd.client.clone();
    let mut stream = etcd
        .call(
            c.watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start)
                        .with_progress_notify(),
                ),
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("etcd closed the watch stream".to_owned()),
            Err(e) => return Err(e.to_string()),
        };
        if msg.compact_revision() > 0 || msg.canceled() {
            // Our revision is gone from etcd's history: list again and report the difference.
            tracing::info!(%prefix, compact = msg.compact_revision(), reason = msg.cancel_reason(),
                "watch revision compacted or canceled; re-listing");
            *revision = None;
            return Err(format!(
                "watch canceled (compacted at {}): re-listing",
                msg.compact_revision()
            ));
        }
        if msg.created() && !*connected {
            *connected = true;
            tracing::info!(%prefix, from_revision = start, "following etcd");
            if tx.send(WatchEvent::Connected).await.is_err() {
                return Ok(());
            }
        }
        if apply(msg, known, revision, tx).await.is_err() {
            return Ok(());
        }
    }
}

async fn apply(
    msg: WatchResponse,
    known: &mut BTreeMap<String, String>,
    revision: &mut Option<i64>,
    tx: &mpsc::Sender<WatchEvent>,
) -> Result<(), ()> {
    for ev in msg.events() {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let out = match ev.event_type() {
            EventType::Put => {
                let value = String::from_utf8_lossy(kv.value()).into_owned();
                known.insert(key.clone(), value.clone());
                WatchEvent::Put { key, value }
            }
            EventType::Delete => {
                known.remove(&key);
                WatchEvent::Delete { key }
            }
        };
        *revision = Some(revision.unwrap_or(0).max(kv.mod_revision()));
        tx.send(out).await.map_err(|_| ())?;
    }
    Ok(())
}

fn tls_options(tls: &crate::EtcdTls) -> Result<etcd_client::TlsOptions, DiscoveryError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| DiscoveryError::Tls(format!("{}: {e}", p.display())))
    };
    let mut o = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(c), Some(k)) => {
            o = o.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        (None, None) => {}
        _ => {
            return Err(DiscoveryError::Tls(
                "an etcd client certificate needs both --etcd-cert and --etcd-key".into(),
            ))
        }
    }
    Ok(o)
}
