//! The draft's Prometheus metrics. Handlers record call outcomes and latency; the core thread
//! records what each batch did and the sequences it holds.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tandem_runtime::{latency_buckets, MetricsRegistry};
use tonic::Code;

use crate::core::CallStats;

type CodeLabel = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub(crate) struct DraftMetrics {
    proposals: Family<CodeLabel, Counter>,
    propose_latency: Histogram,
    sequences_proposed: Counter,
    tokens_drafted: Counter,
    unknown_sequences: Counter,
    evictions: Counter,
    released: Counter,
    merged_calls: Counter,
    forwards_per_call: Histogram,
    sequences_held: Gauge,
    kv_tokens: Gauge,
    model_loaded: Gauge,
}

impl DraftMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self {
            proposals: Family::default(),
            propose_latency: Histogram::new(latency_buckets()),
            sequences_proposed: Counter::default(),
            tokens_drafted: Counter::default(),
            unknown_sequences: Counter::default(),
            evictions: Counter::default(),
            released: Counter::default(),
            merged_calls: Counter::default(),
            forwards_per_call: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 8),
            ),
            sequences_held: Gauge::default(),
            kv_tokens: Gauge::default(),
            model_loaded: Gauge::default(),
        };
        let r = registry;
        r.register(
            "tandem_draft_proposals",
            "Propose calls by final gRPC status code.",
            m.proposals.clone(),
        );
        r.register(
            "tandem_draft_propose_latency_seconds",
            "Time from receiving a Propose call to its answer (queueing included).",
            m.propose_latency.clone(),
        );
        r.register(
            "tandem_draft_sequences_proposed",
            "Sequences named in valid Propose calls.",
            m.sequences_proposed.clone(),
        );
        r.register(
            "tandem_draft_tokens_drafted",
            "Tokens drafted over all sequences.",
            m.tokens_drafted.clone(),
        );
        r.register(
            "tandem_draft_unknown_sequences",
            "Sequences answered `unknown` (never seen, evicted, released or restarted).",
            m.unknown_sequences.clone(),
        );
        r.register(
            "tandem_draft_evictions",
            "Sequences evicted: idle past the TTL, or least recently used when full.",
            m.evictions.clone(),
        );
        r.register(
            "tandem_draft_released_sequences",
            "Sequences ended by Release.",
            m.released.clone(),
        );
        r.register(
            "tandem_draft_merged_calls",
            "Propose calls that shared their forwards with another concurrent call.",
            m.merged_calls.clone(),
        );
        r.register(
            "tandem_draft_forwards_per_call",
            "Model forwards run per batch of Propose calls.",
            m.forwards_per_call.clone(),
        );
        r.register(
            "tandem_draft_sequences_held",
            "Sequences whose KV the draft holds.",
            m.sequences_held.clone(),
        );
        r.register(
            "tandem_draft_kv_tokens",
            "Cached positions over all sequences.",
            m.kv_tokens.clone(),
        );
        r.register(
            "tandem_draft_model_loaded",
            "1 once the model has loaded and the draft serves.",
            m.model_loaded.clone(),
        );
        m
    }

    pub fn propose_done(&self, code: Code, latency: Duration) {
        self.proposals
            .get_or_create(&[("code", tandem_runtime::grpc_code_name(code))])
            .inc();
        self.propose_latency.observe(latency.as_secs_f64());
    }

    pub fn batch(&self, s: &CallStats, calls: usize) {
        self.sequences_proposed.inc_by(s.sequences as u64);
        self.tokens_drafted.inc_by(s.tokens_drafted as u64);
        self.unknown_sequences.inc_by(s.unknown as u64);
        self.evictions.inc_by(s.evicted as u64);
        if calls > 1 {
            self.merged_calls.inc_by(calls as u64);
        }
        if s.sequences > 0 {
            self.forwards_per_call.observe(s.forwards as f64);
        }
    }

    pub fn evicted(&self, n: usize) {
        self.evictions.inc_by(n as u64);
    }

    pub fn released(&self, n: usize) {
        self.released.inc_by(n as u64);
    }

    pub fn held(&self, sequences: usize, kv_tokens: usize) {
        self.sequences_held.set(sequences as i64);
        self.kv_tokens.set(kv_tokens as i64);
    }

    pub fn loaded(&self) {
        self.model_loaded.set(1);
    }
}
