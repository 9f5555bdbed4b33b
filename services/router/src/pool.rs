//! The worker table. One poller task owns it: every interval it asks the membership backend for
//! endpoints, polls each worker's health, `Info` and `Load`, fetches a model's tokenizer the first
//! time it sees the model, and publishes an immutable [`Snapshot`] through a watch channel.
//! Request handlers only read snapshots; the one thing they write is a worker's outstanding
//! count and its "failed" flag, both atomics, so no lock is ever held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::TextModel;
use tandem_proto::shard::v1::shard_client::ShardClient;
use tandem_proto::shard::v1::{
    InfoRequest, InfoResponse, LoadRequest, LoadResponse, TokenizerRequest,
};
use tandem_runtime::HealthReporter;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::membership::{Membership, MembershipStatus};
use crate::metrics::RouterMetrics;
use crate::routing::{self, Breaker, BreakerChange, Candidate, Policy, RetryBudget, RouteKey};

/// Health, Info and Load of one worker must answer within this; a worker that misses it twice
/// in a row (or fails outright once) leaves the rotation.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
const POLL_TIMED_OUT: &str = "no answer to health/Info/Load within the poll timeout";
/// A 150k vocabulary is ~7 MB of JSON; building the tokenizer takes a moment too.
const TOKENIZER_TIMEOUT: Duration = Duration::from_secs(60);
/// The `Tokenizer` reply is large: raise tonic's 4 MiB default.
const MAX_TOKENIZER_MESSAGE: usize = 64 << 20;
/// The service name a worker reports health for; "" (the whole server) is the fallback.
const SHARD_SERVICE: &str = "tandem.shard.v1.Shard";

/// One worker (group leader) endpoint. Lives as long as the endpoint stays in the membership,
/// across snapshots, so its outstanding count is continuous.
pub struct Worker {
    pub url: String,
    pub shard: ShardClient<Channel>,
    health: HealthClient<Channel>,
    outstanding: AtomicU32,
    /// Prompt + remaining max_new_tokens of this router's requests there.
    outstanding_tokens: AtomicU64,
    /// Prompt + generated tokens of this router's requests there: what the leader's
    /// `Load.kv_tokens` holds for them.
    cached_tokens: AtomicU64,
    /// Set when a request to it failed at the transport level; the next good poll clears it.
    failed: AtomicBool,
    /// Ejects it after repeated request failures, whatever its health says.
    pub breaker: Breaker,
}

impl Worker {
    fn new(
        url: &str,
        max_message_bytes: usize,
        tls: Option<&tandem_runtime::tls::ClientTls>,
    ) -> Result<Self, String> {
        let endpoint = tandem_runtime::tls::endpoint(url, tls)
            .map_err(|e| format!("worker {url}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        // Lazy: a worker that is down now is retried on every poll, and tonic reconnects.
        let channel = endpoint.connect_lazy();
        Ok(Self {
            url: url.to_owned(),
            shard: ShardClient::new(channel.clone())
                .max_decoding_message_size(MAX_TOKENIZER_MESSAGE.max(max_message_bytes))
                .max_encoding_message_size(max_message_bytes),
            health: HealthClient::new(channel),
            outstanding: AtomicU32::new(0),
            outstanding_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            breaker: Breaker::default(),
        })
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// The router's claim on a worker for one request: counted while alive.
pub struct Lease {
    pub worker: Arc<Worker>,
    metrics: RouterMetrics,
    /// Tokens still counted against the worker.
    tokens: u64,
    /// Prompt + generated so far, counted in the worker's `cached_tokens`.
    cached: u64,
    /// This request is the worker's circuit-breaker probe.
    probe: bool,
    /// Success or failure was recorded with the breaker.
    resolved: bool,
}

impl Lease {
    /// Claims `worker` for a request of `prompt` tokens and up to `max_new` more.
    pub fn new(worker: Arc<Worker>, metrics: &RouterMetrics, prompt: u64, max_new: u64) -> Self {
        let tokens = prompt + max_new;
        worker.outstanding.fetch_add(1, Ordering::Relaxed);
        worker
            .outstanding_tokens
            .fetch_add(tokens, Ordering::Relaxed);
        worker.cached_tokens.fetch_add(prompt, Ordering::Relaxed);
        let probe = worker.breaker.picked(Instant::now());
        let labels = metrics.worker(&worker.url);
        metrics.worker_outstanding.get_or_create(&labels).inc();
        metrics.worker_requests.get_or_create(&labels).inc();
        Self {
            worker,
            metrics: metrics.clone(),
            tokens,
            cached: prompt,
            probe,
            resolved: false,
        }
    }

    /// `n` tokens were generated: that much less work is left there.
    pub fn progress(&mut self, n: u64) {
        self.cached += n;
        self.worker.cached_tokens.fetch_add(n, Ordering::Relaxed);
        let n = n.min(self.tokens);
        self.tokens -= n;
        self.worker
            .outstanding_tokens
            .fetch_sub(n, Ordering::Relaxed);
    }

    /// The worker served (its first token arrived).
    pub fn succeeded(&mut self) {
        if std::mem::replace(&mut self.resolved, true) {
            return;
        }
        if self.worker.breaker.success() == BreakerChange::Closed {
            tracing::info!(worker = %self.worker.url, "probe succeeded; worker back in rotation");
            self.metrics
                .worker_ejected
                .get_or_create(&self.metrics.worker(&self.worker.url))
                .set(0);
        }
    }

    /// The worker failed this request (down, internal error, broken stream).
    pub fn failed(&mut self) {
        if std::mem::replace(&mut self.resolved, true) {
            return;
        }
        if let BreakerChange::Ejected(d) = self.worker.breaker.failure(Instant::now()) {
            tracing::warn!(worker = %self.worker.url, for_s = d.as_secs_f64(),
                "worker failed repeatedly; ejected (circuit breaker), then probed");
            let labels = self.metrics.worker(&self.worker.url);
            self.metrics.worker_ejected.get_or_create(&labels).set(1);
            self.metrics.ejections.inc();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.probe && !self.resolved {
            self.worker.breaker.probe_abandoned();
        }
        self.worker
            .outstanding_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        self.worker
            .cached_tokens
            .fetch_sub(self.cached, Ordering::Relaxed);
        self.worker.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .worker_outstanding
            .get_or_create(&self.metrics.worker(&self.worker.url))
            .dec();
    }
}

/// A model as the router knows it: its tokenizer (fetched once) and the limits its workers
/// reported.
#[derive(Clone, Debug)]
pub struct ModelView {
    pub name: String,
    pub text: TextModel,
    pub tokenizer_hash: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// The workers' own limit on max_new_tokens; 0 = none reported.
    pub max_new_tokens_limit: usize,
    /// Usable workers serving it now.
    pub replicas: usize,
}

#[derive(Clone)]
pub struct WorkerView {
    pub worker: Arc<Worker>,
    /// Model name from its last good `Info`.
    pub model: Option<String>,
    pub load: LoadResponse,
    /// The last poll succeeded and its tokenizer is known and matches its model's.
    pub polled_ok: bool,
    /// Load at the last poll that was not ours (other routers'): `Load` minus what this router
    /// had there at that moment. Our own share is counted live instead, so a request that just
    /// finished stops counting at once rather than at the next poll.
    pub others: OthersLoad,
}

/// See [`WorkerView::others`].
#[derive(Clone, Copy, Debug, Default)]
pub struct OthersLoad {
    pub requests: u64,
    pub tokens: u64,
}

impl WorkerView {
    pub fn usable(&self) -> bool {
        self.polled_ok
            && !self.worker.failed.load(Ordering::Relaxed)
            && self.worker.breaker.available(Instant::now())
    }

    /// Outstanding tokens: ours now (prompt + remaining max_new_tokens) plus other routers'
    /// cached tokens at the last poll.
    fn tokens(&self) -> u64 {
        self.worker.outstanding_tokens.load(Ordering::Relaxed) + self.others.tokens
    }

    /// Requests ahead of a new one: ours in flight now plus other routers' at the last poll.
    fn score(&self) -> u64 {
        u64::from(self.worker.outstanding()) + self.others.requests
    }

    fn has_room(&self) -> bool {
        self.load.max_waiting == 0 || self.load.waiting < self.load.max_waiting
    }
}

#[derive(Default)]
pub struct Snapshot {
    pub workers: Vec<WorkerView>,
    pub models: BTreeMap<String, ModelView>,
    /// True once the first poll round finished (before that, "no models" means "not yet").
    pub polled: bool,
}

/// Read side of the worker table, shared by request handlers.
pub struct Pool {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    poke: Arc<Notify>,
    rr: AtomicUsize,
    policy: Policy,
    /// Retries before the first token, across all requests.
    pub retry_budget: RetryBudget,
}

impl Pool {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Waits until the first poll round has been published (startup).
    pub async fn wait_polled(&self) {
        let mut rx = self.snapshot.clone();
        // An error means the poller is gone; nothing to wait for then.
        let _ = rx.wait_for(|s| s.polled).await;
    }

    /// Takes `worker` out of rotation until its next good poll, and polls soon.
    pub fn mark_failed(&self, worker: &Worker) {
        worker.failed.store(true, Ordering::Relaxed);
        self.poke.notify_one();
    }

    /// A usable worker serving `model`, not in `exclude` (URLs already tried), chosen by the
    /// routing policy. Workers whose queue had room at the last poll come first; when none had,
    /// the policy still picks among the full ones, since a queue may have drained since.
    pub fn pick(
        &self,
        snap: &Snapshot,
        model: &str,
        exclude: &[String],
        key: RouteKey,
    ) -> Option<Arc<Worker>> {
        let candidates: Vec<&WorkerView> = snap
            .workers
            .iter()
            .filter(|v| {
                v.usable() && v.model.as_deref() == Some(model) && !exclude.contains(&v.worker.url)
            })
            .collect();
        let with_room: Vec<&WorkerView> = candidates
            .iter()
            .copied()
            .filter(|v| v.has_room())
            .collect();
        let pool = if with_room.is_empty() {
            candidates
        } else {
            with_room
        };
        let cands: Vec<Candidate<'_>> = pool
            .iter()
            .map(|v| Candidate {
                url: &v.worker.url,
                requests: v.score(),
                tokens: v.tokens(),
            })
            .collect();
        let rr = self.rr.fetch_add(1, Ordering::Relaxed);
        routing::choose(self.policy, &cands, key, rr).map(|i| pool[i].worker.clone())
    }
}

/// Everything the poller needs; consumed by [`Poller::run`].
pub struct Poller {
    membership: Arc<dyn Membership>,
    tx: watch::Sender<Arc<Snapshot>>,
    poke: Arc<Notify>,
    health: HealthReporter,
    metrics: RouterMetrics,
    interval: Duration,
    max_message_bytes: usize,
    /// TLS (and a client certificate) for the connections to workers.
    tls: Option<tandem_runtime::tls::ClientTls>,
    workers: HashMap<String, Arc<Worker>>,
    /// Tokenizers by model name, fetched once (again only if a worker reports another hash).
    texts: HashMap<String, (String, TextModel)>,
    /// Last usable state per worker, to log transitions once.
    was_usable: HashMap<String, bool>,
    /// Consecutive polls that timed out, per worker.
    slow_polls: HashMap<String, u32>,
    serving: Option<bool>,
    /// Last reported registry reachability (None: not reported yet, or static).
    registry_connected: Option<bool>,
}

/// A worker's answer to one poll.
struct PollResult {
    info: InfoResponse,
    load: LoadResponse,
    /// Not ours, at the moment `Load` answered.
    others: OthersLoad,
}

#[allow(clippy::too_many_arguments)]
pub fn pool(
    membership: Arc<dyn Membership>,
    policy: Policy,
    health: HealthReporter,
    metrics: RouterMetrics,
    interval: Duration,
    max_message_bytes: usize,
    tls: Option<tandem_runtime::tls::ClientTls>,
) -> (Pool, Poller) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let poke = Arc::new(Notify::new());
    let pool = Pool {
        snapshot: rx,
        poke: poke.clone(),
        rr: AtomicUsize::new(0),
        policy,
        retry_budget: RetryBudget::default(),
    };
    let poller = Poller {
        membership,
        tx,
        poke,
        health,
        metrics,
        interval,
        max_message_bytes,
        tls,
        workers: HashMap::new(),
        texts: HashMap::new(),
        was_usable: HashMap::new(),
        slow_polls: HashMap::new(),
        serving: None,
        registry_connected: None,
    };
    (pool, poller)
}

impl Poller {
    /// Polls forever; the server aborts this task when it shuts down.
    pub async fn run(mut self) {
        let changes = self.membership.changes();
        loop {
            self.round().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                // A request saw a worker fail: find out soon whether it is really gone.
                _ = self.poke.notified() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Groups joined or left the registry: act now, not at the next interval.
                _ = async { changes.as_ref()?.notified().await; Some(()) }, if changes.is_some() => {}
            }
        }
    }

    /// Metrics, health (`tandem.discovery`) and logs for the registry's reachability.
    async fn report_membership(&mut self, n: usize) {
        self.metrics.member_groups.set(n as i64);
        let MembershipStatus::Registry { connected, error } = self.membership.status() else {
            return;
        };
        self.metrics.registry_connected.set(i64::from(connected));
        if self.registry_connected == Some(connected) {
            return;
        }
        self.registry_connected = Some(connected);
        let status = if connected {
            tracing::info!(groups = n, "membership registry reachable");
            tandem_runtime::ServingStatus::Serving
        } else {
            tracing::warn!(
                groups = n,
                error = error.as_deref().unwrap_or("not connected yet"),
                "membership registry unreachable: serving from the last known membership"
            );
            tandem_runtime::ServingStatus::NotServing
        };
        tandem_runtime::set_health(&self.health, &[crate::DISCOVERY_HEALTH], status).await;
    }

    async fn round(&mut self) {
        let endpoints = self.membership.endpoints();
        self.report_membership(endpoints.len()).await;
        let before = self.workers.len();
        self.workers.retain(|url, _| endpoints.contains(url));
        if self.workers.len() < before {
            // Groups left (deregistered, draining): out of rotation now, before this round's
            // polls, so no new request goes there meanwhile.
            let prev = self.tx.borrow().clone();
            self.tx.send_replace(Arc::new(Snapshot {
                workers: prev
                    .workers
                    .iter()
                    .filter(|v| endpoints.contains(&v.worker.url))
                    .cloned()
                    .collect(),
                models: prev.models.clone(),
                polled: prev.polled,
            }));
        }
        for url in &endpoints {
            if self.workers.contains_key(url) {
                continue;
            }
            match Worker::new(url, self.max_message_bytes, self.tls.as_ref()) {
                Ok(w) => {
                    self.workers.insert(url.clone(), Arc::new(w));
                }
                Err(e) => {
                    if self.was_usable.insert(url.clone(), false).is_none() {
                        tracing::error!(worker = %url, "{e}");
                    }
                }
            }
        }
        let workers: Vec<Arc<Worker>> = endpoints
            .iter()
            .filter_map(|u| self.workers.get(u).cloned())
            .collect();
        let results: Vec<Result<PollResult, String>> =
            futures::future::join_all(workers.iter().map(|w| poll_worker(w.clone()))).await;

        let model_errors = self.ensure_texts(&workers, &results).await;
        let prev_views = self.tx.borrow().workers.clone();

        let mut views = Vec::with_capacity(workers.len());
        // Per model, over its usable workers: the strictest limits and the replica count.
        let mut limits: HashMap<String, ModelLimits> = HashMap::new();
        for (worker, result) in workers.iter().zip(results) {
            let (model, load, others, error) = match result {
                Ok(r) => {
                    let name = model_name(&r.info);
                    let error = match self.texts.get(&name) {
                        None => Some(
                            model_errors
                                .get(&name)
                                .cloned()
                                .unwrap_or_else(|| "tokenizer not fetched yet".to_owned()),
                        ),
                        Some((hash, _))
                            if !r.info.tokenizer_hash.is_empty()
                                && *hash != r.info.tokenizer_hash =>
                        {
                            // Token ids would mean something else on this worker.
                            Some(format!(
                                "tokenizer hash {} differs from {hash}, which the router uses for model '{name}'",
                                r.info.tokenizer_hash
                            ))
                        }
                        Some(_) => None,
                    };
                    self.slow_polls.remove(&worker.url);
                    if error.is_none() {
                        worker.failed.store(false, Ordering::Relaxed);
                        limits.entry(name.clone()).or_default().add(&r.info);
                    }
                    (Some(name), r.load, r.others, error)
                }
                Err(e) => {
                    let slow = self.slow_polls.entry(worker.url.clone()).or_default();
                    *slow += 1;
                    let previous = prev_views
                        .iter()
                        .find(|v| Arc::ptr_eq(&v.worker, worker) && v.polled_ok);
                    match previous {
                        // One slow answer from a busy worker (a long prefill on few cores) is
                        // not a failure yet: keep it on its last known state for one round.
                        Some(v) if e == POLL_TIMED_OUT && *slow < 2 => {
                            tracing::debug!(worker = %worker.url, "slow poll; keeping the last state");
                            (v.model.clone(), v.load, v.others, None)
                        }
                        _ => (
                            None,
                            LoadResponse::default(),
                            OthersLoad::default(),
                            Some(e),
                        ),
                    }
                }
            };
            let view = WorkerView {
                worker: worker.clone(),
                model,
                load,
                polled_ok: error.is_none(),
                others,
            };
            self.log_transition(&worker.url, view.usable(), error.as_deref());
            self.metrics
                .worker_usable
                .get_or_create(&self.metrics.worker(&worker.url))
                .set(i64::from(view.usable()));
            views.push(view);
        }

        let prev = self.tx.borrow().clone();
        let mut models = BTreeMap::new();
        for (name, (hash, text)) in &self.texts {
            let view = match limits.get(name) {
                Some(l) => ModelView {
                    name: name.clone(),
                    text: text.clone(),
                    tokenizer_hash: hash.clone(),
                    context_length: l.context_length,
                    vocab_size: l.vocab_size,
                    max_new_tokens_limit: l.max_new_tokens_limit,
                    replicas: l.replicas,
                },
                // No usable worker now: keep the last known limits, so requests are still
                // validated and then answered UNAVAILABLE rather than NOT_FOUND.
                None => match prev.models.get(name) {
                    Some(m) => ModelView {
                        replicas: 0,
                        ..m.clone()
                    },
                    None => continue,
                },
            };
            models.insert(name.clone(), view);
        }
        let serving = views.iter().any(WorkerView::usable);
        self.tx.send_replace(Arc::new(Snapshot {
            workers: views,
            models,
            polled: true,
        }));
        if self.serving != Some(serving) {
            self.serving = Some(serving);
            let status = if serving {
                tandem_runtime::ServingStatus::Serving
            } else {
                tandem_runtime::ServingStatus::NotServing
            };
            tandem_runtime::set_health(&self.health, &[crate::GENERATION_SERVICE], status).await;
            tracing::info!(serving, "router health changed");
        }
    }

    /// Fetches the tokenizer of every model that answering workers serve and the router does
    /// not know yet, once per model. When no worker reports the known tokenizer any more (the
    /// model was replaced under the same name), the new one is fetched. Returns fetch errors by
    /// model.
    async fn ensure_texts(
        &mut self,
        workers: &[Arc<Worker>],
        results: &[Result<PollResult, String>],
    ) -> HashMap<String, String> {
        let mut errors = HashMap::new();
        let mut wanted: Vec<(String, String, Arc<Worker>)> = Vec::new();
        for (worker, result) in workers.iter().zip(results) {
            let Ok(r) = result else { continue };
            let name = model_name(&r.info);
            let hash = &r.info.tokenizer_hash;
            let known = self.texts.get(&name).is_some_and(|(h, _)| {
                hash.is_empty()
                    || h == hash
                    // Another worker still reports the known tokenizer: keep it.
                    || results.iter().flatten().any(|o| {
                        model_name(&o.info) == name && o.info.tokenizer_hash == *h
                    })
            });
            if !known && !wanted.iter().any(|(n, _, _)| *n == name) {
                wanted.push((name, hash.clone(), worker.clone()));
            }
        }
        for (name, hash, worker) in wanted {
            match fetch_text(&worker).await {
                Ok(text) => {
                    tracing::info!(
                        model = %name,
                        worker = %worker.url,
                        vocab = text.tokenizer.get_vocab_size(true),
                        tokenizer_hash = %hash,
                        "fetched tokenizer"
                    );
                    self.texts.insert(name, (hash, text));
                }
                Err(e) => {
                    errors.insert(name, e);
                }
            }
        }
        errors
    }

    fn log_transition(&mut self, url: &str, usable: bool, reason: Option<&str>) {
        let before = self.was_usable.insert(url.to_owned(), usable);
        if before == Some(usable) {
            return;
        }
        if usable {
            tracing::info!(worker = %url, "worker in rotation");
        } else if before.is_none() {
            // First sight: usually a worker still loading its model.
            tracing::info!(
                worker = %url,
                reason = reason.unwrap_or("unknown"),
                "worker not ready yet"
            );
        } else {
            tracing::warn!(
                worker = %url,
                reason = reason.unwrap_or("a request to it failed"),
                "worker out of rotation"
            );
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ModelLimits {
    context_length: usize,
    vocab_size: usize,
    /// 0 = no worker reported a limit.
    max_new_tokens_limit: usize,
    replicas: usize,
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self {
            context_length: usize::MAX,
            vocab_size: usize::MAX,
            max_new_tokens_limit: 0,
            replicas: 0,
        }
    }
}

impl ModelLimits {
    fn add(&mut self, info: &InfoResponse) {
        self.context_length = self.context_length.min(info.context_length as usize);
        self.vocab_size = self.vocab_size.min(info.vocab_size as usize);
        let l = info.max_new_tokens_limit as usize;
        if l > 0 && (self.max_new_tokens_limit == 0 || l < self.max_new_tokens_limit) {
            self.max_new_tokens_limit = l;
        }
        self.replicas += 1;
    }
}

fn model_name(info: &InfoResponse) -> String {
    if info.model.is_empty() {
        "default".to_owned()
    } else {
        info.model.clone()
    }
}

async fn poll_worker(w: Arc<Worker>) -> Result<PollResult, String> {
    let answer = async {
        let mut health = w.health.clone();
        let status = match health
            .check(HealthCheckRequest {
                service: SHARD_SERVICE.to_owned(),
            })
            .await
        {
            Ok(r) => r.into_inner().status,
            // The worker does not report per service: ask about the whole server.
            Err(s) if s.code() == tonic::Code::NotFound => {
                health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|s| format!("health: {}", s.message()))?
                    .into_inner()
                    .status
            }
            Err(s) => return Err(format!("health: {}: {}", s.code(), s.message())),
        };
        if status != ServingStatus::Serving as i32 {
            return Err("health: not serving".to_owned());
        }
        let mut shard = w.shard.clone();
        let info = shard
            .info(InfoRequest {})
            .await
            .map_err(|s| format!("Info: {}: {}", s.code(), s.message()))?
            .into_inner();
        let load = shard
            .load(LoadRequest {})
            .await
            .map_err(|s| format!("Load: {}: {}", s.code(), s.message()))?
            .into_inner();
        let ours_requests = u64::from(w.outstanding());
        let ours_tokens = w.cached_tokens.load(Ordering::Relaxed);
        let requests =
            (u64::from(load.running) + u64::from(load.waiting)).saturating_sub(ours_requests);
        // Only when the leader holds sequences beyond ours are there others' tokens: with one
        // router, a request of ours that ended between the leader's answer and this read would
        // otherwise count as someone else's until the next poll.
        let tokens = if requests > 0 {
            load.kv_tokens.saturating_sub(ours_tokens)
        } else {
            0
        };
        let others = OthersLoad { requests, tokens };
        Ok(PollResult { info, load, others })
    };
    tokio::time::timeout(POLL_TIMEOUT, answer)
        .await
        .map_err(|_| POLL_TIMED_OUT.to_owned())?
}

async fn fetch_text(w: &Worker) -> Result<TextModel, String> {
    let mut shard = w.shard.clone();
    let resp = tokio::time::timeout(TOKENIZER_TIMEOUT, shard.tokenizer(TokenizerRequest {}))
        .await
        .map_err(|_| format!("Tokenizer: no answer within {TOKENIZER_TIMEOUT:?}"))?
        .map_err(|s| format!("Tokenizer: {}: {}", s.code(), s.message()))?
        .into_inner();
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    // Parsing a large tokenizer.json is CPU work: keep it off the async runtime.
    tokio::task::spawn_blocking(move || {
        TextModel::from_parts(
            &resp.tokenizer_json,
            non_empty(resp.chat_template),
            non_empty(resp.bos_token),
            non_empty(resp.eos_token),
            resp.eos_token_ids,
        )
        .map_err(|e| format!("Tokenizer: {e}"))
    })
    .await
    .map_err(|e| format!("Tokenizer: {e}"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A worker whose last `Load` said `running` sequences (of 100 cached tokens each) and
    /// `waiting` requests, none of them this router's.
    fn view(url: &str, model: &str, running: u32, waiting: u32, max_waiting: u32) -> WorkerView {
        WorkerView {
            worker: Arc::new(Worker::new(url, 1 << 20, None).unwrap()),
            model: Some(model.to_owned()),
            load: LoadResponse {
                running,
                waiting,
                max_waiting,
                kv_tokens: u64::from(running) * 100,
                ..Default::default()
            },
            polled_ok: true,
            others: OthersLoad {
                requests: u64::from(running + waiting),
                tokens: u64::from(running) * 100,
            },
        }
    }

    fn pool_of(policy: Policy, workers: Vec<WorkerView>) -> (Pool, Snapshot) {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let pool = Pool {
            snapshot: rx,
            poke: Arc::new(Notify::new()),
            rr: AtomicUsize::new(0),
            policy,
            retry_budget: RetryBudget::default(),
        };
        let snap = Snapshot {
            workers,
            models: BTreeMap::new(),
            polled: true,
        };
        (pool, snap)
    }

    fn url(w: Option<Arc<Worker>>) -> String {
        w.map(|w| w.url.clone()).unwrap_or_default()
    }

    fn any() -> RouteKey {
        RouteKey::default()
    }

    #[tokio::test]
    async fn least_tokens_prefers_room_and_counts_our_own_requests() {
        let (pool, snap) = pool_of(
            Policy::LeastTokens,
            vec![
                view("http://a:1", "m", 3, 0, 10),
                view("http://b:1", "m", 1, 0, 10),
                view("http://c:1", "other", 0, 0, 10),
            ],
        );
        assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://b:1");
        // Our own outstanding tokens count too (b: 100 + 3 x 80 of ours > a's 300).
        let mut leases: Vec<Lease> = (0..3)
            .map(|_| Lease::new(snap.workers[1].worker.clone(), &test_metrics(), 30, 50))
            .collect();
        assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://a:1");
        // Generated tokens are work done (b: 100 + 3 x 30 < 300).
        for l in &mut leases {
            l.progress(50);
        }
        assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://b:1");
        let b = snap.workers[1].worker.clone();
        assert_eq!(b.cached_tokens.load(Ordering::Relaxed), 3 * 80);
        drop(leases);
        assert_eq!(b.outstanding_tokens.load(Ordering::Relaxed), 0);
        assert_eq!(b.cached_tokens.load(Ordering::Relaxed), 0);
        assert_eq!(
            url(pool.pick(&snap, "m", &["http://b:1".into()], any())),
            "http://a:1"
        );
        assert!(pool.pick(&snap, "nope", &[], any()).is_none());
        // A full queue loses to one with room, even when less loaded.
        let (pool, snap) = pool_of(
            Policy::LeastTokens,
            vec![
                view("http://a:1", "m", 1, 4, 4),
                view("http://b:1", "m", 9, 0, 10),
            ],
        );
        assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://b:1");
        // When every queue is full, the least loaded is still tried.
        let (pool, snap) = pool_of(
            Policy::LeastTokens,
            vec![
                view("http://a:1", "m", 1, 4, 4),
                view("http://b:1", "m", 9, 10, 10),
            ],
        );
        assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://a:1");
    }

    #[tokio::test]
    async fn ties_rotate_and_failed_workers_are_skipped() {
        let (pool, snap) = pool_of(
            Policy::LeastTokens,
            vec![
                view("http://a:1", "m", 0, 0, 10),
                view("http://b:1", "m", 0, 0, 10),
            ],
        );
        let picks: Vec<String> = (0..4)
            .map(|_| url(pool.pick(&snap, "m", &[], any())))
            .collect();
        assert!(picks.contains(&"http://a:1".to_owned()));
        assert!(picks.contains(&"http://b:1".to_owned()));
        pool.mark_failed(&snap.workers[0].worker);
        for _ in 0..4 {
            assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://b:1");
        }
    }

    #[tokio::test]
    async fn repeated_failures_eject_a_worker_until_a_probe_succeeds() {
        let (pool, snap) = pool_of(
            Policy::RoundRobin,
            vec![
                view("http://a:1", "m", 0, 0, 10),
                view("http://b:1", "m", 0, 0, 10),
            ],
        );
        let a = snap.workers[0].worker.clone();
        for _ in 0..routing::BREAKER_THRESHOLD {
            Lease::new(a.clone(), &test_metrics(), 1, 1).failed();
        }
        // Its health is fine (polled_ok), but it is out of rotation.
        for _ in 0..4 {
            assert_eq!(url(pool.pick(&snap, "m", &[], any())), "http://b:1");
        }
        assert!(a.breaker.is_open());
    }

    #[tokio::test]
    async fn sessions_stick_unless_much_busier() {
        let (pool, snap) = pool_of(
            Policy::Session,
            vec![
                view("http://a:1", "m", 0, 0, 10),
                view("http://b:1", "m", 0, 0, 10),
                view("http://c:1", "m", 0, 0, 10),
            ],
        );
        let key = RouteKey::new("session-42", &[1, 2, 3]);
        let first = url(pool.pick(&snap, "m", &[], key));
        for _ in 0..5 {
            assert_eq!(url(pool.pick(&snap, "m", &[], key)), first);
        }
        let busy: Vec<WorkerView> = snap
            .workers
            .iter()
            .map(|v| {
                let mut v = v.clone();
                if v.worker.url == first {
                    v.others.requests = 5;
                }
                v
            })
            .collect();
        let snap = Snapshot {
            workers: busy,
            models: BTreeMap::new(),
            polled: true,
        };
        assert_ne!(url(pool.pick(&snap, "m", &[], key)), first);
    }

    fn test_metrics() -> RouterMetrics {
        RouterMetrics::new(&mut prometheus_client::registry::Registry::default())
    }
}
