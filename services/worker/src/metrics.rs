//! The worker's Prometheus metrics. Request outcomes and latencies are recorded by the handlers;
//! queue, batch and KV numbers are read from the engine's atomics at scrape time, so they are
//! never stale and nothing polls the engine in between.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use tandem_runtime::{latency_buckets, token_count_buckets, MetricsRegistry};
use tonic::Code;

use crate::draft_client::DraftClientStats;
use crate::Loaded;

type CodeLabel = [(&'static str, &'static str); 1];

#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    requests: Family<CodeLabel, Counter>,
    cancelled: Counter,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    request_duration: Histogram,
    output_tokens: Histogram,
}

impl WorkerMetrics {
    pub fn new(registry: &MetricsRegistry, loaded: Arc<OnceLock<Loaded>>) -> Self {
        let m = Self {
            requests: Family::default(),
            cancelled: Counter::default(),
            time_to_first_token: Histogram::new(latency_buckets()),
            inter_token_latency: Histogram::new(latency_buckets()),
            request_duration: Histogram::new(latency_buckets()),
            output_tokens: Histogram::new(token_count_buckets()),
        };
        registry.register(
            "tandem_worker_requests",
            "Generate requests by final gRPC status code.",
            m.requests.clone(),
        );
        registry.register(
            "tandem_worker_cancelled_sequences",
            "Sequences dropped before they finished (client gone, deadline, Abort, drain expiry); \
             each freed its KV at once.",
            m.cancelled.clone(),
        );
        registry.register(
            "tandem_worker_time_to_first_token_seconds",
            "From receiving a Generate request to its first token.",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "tandem_worker_inter_token_latency_seconds",
            "Time between consecutive output tokens of a sequence.",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "tandem_worker_request_duration_seconds",
            "End-to-end time of Generate requests that completed.",
            m.request_duration.clone(),
        );
        registry.register(
            "tandem_worker_output_tokens",
            "Output tokens per completed Generate request.",
            m.output_tokens.clone(),
        );
        registry.register_collector(Box::new(EngineCollector { loaded }));
        m
    }

    pub fn request_done(&self, code: Code) {
        self.requests
            .get_or_create(&[("code", tandem_runtime::grpc_code_name(code))])
            .inc();
    }

    pub fn cancelled(&self) {
        self.cancelled.inc();
    }

    pub fn first_token(&self, d: Duration) {
        self.time_to_first_token.observe(d.as_secs_f64());
    }

    pub fn inter_token(&self, d: Duration) {
        self.inter_token_latency.observe(d.as_secs_f64());
    }

    pub fn completed(&self, d: Duration, output_tokens: u32) {
        self.request_duration.observe(d.as_secs_f64());
        self.output_tokens.observe(f64::from(output_tokens));
    }
}

/// Reads the engine's counters on each scrape; zeros until the model has loaded, so every
/// series exists from the first scrape.
struct EngineCollector {
    loaded: Arc<OnceLock<Loaded>>,
}

impl std::fmt::Debug for EngineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCollector")
            .field("loaded", &self.loaded.get().is_some())
            .finish()
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let engine = self.loaded.get().map(|l| &l.engine);
        let stats = engine.map(|e| e.stats());
        let gauge = |v: Option<usize>| ConstGauge::new(v.unwrap_or(0) as i64);
        let gauges = [
            (
                "tandem_worker_model_loaded",
                "1 once the model has loaded and the worker serves.",
                gauge(engine.map(|_| 1)),
            ),
            (
                "tandem_worker_waiting_sequences",
                "Requests queued, not yet running.",
                gauge(stats.map(|s| s.waiting.load(Relaxed))),
            ),
            (
                "tandem_worker_running_sequences",
                "Sequences in the running batch (each holds a KV slot).",
                gauge(stats.map(|s| s.running.load(Relaxed))),
            ),
            (
                "tandem_worker_max_running_sequences",
                "Most sequences the engine runs at once.",
                gauge(engine.map(|e| e.config().max_running)),
            ),
            (
                "tandem_worker_kv_tokens",
                "Cached positions over all sequences.",
                gauge(stats.map(|s| s.kv_tokens.load(Relaxed))),
            ),
            (
                "tandem_worker_kv_bytes",
                "Bytes reserved for the KV cache.",
                gauge(stats.map(|s| s.kv_bytes.load(Relaxed))),
            ),
        ];
        for (name, help, g) in gauges {
            let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)?;
        }
        let counter = |v: Option<u64>| ConstCounter::new(v.unwrap_or(0));
        let counters = [
            (
                "tandem_worker_generated_tokens",
                "Tokens generated (all sequences).",
                counter(stats.map(|s| s.generated_tokens.load(Relaxed))),
            ),
            (
                "tandem_worker_prompt_tokens",
                "Prompt tokens prefilled.",
                counter(stats.map(|s| s.prompt_tokens.load(Relaxed))),
            ),
            (
                "tandem_worker_engine_steps",
                "Batched forward passes run.",
                counter(stats.map(|s| s.steps.load(Relaxed))),
            ),
            (
                "tandem_worker_spec_drafts",
                "Drafts verified (one per sequence per step with drafted tokens).",
                counter(stats.map(|s| s.drafts.load(Relaxed))),
            ),
            (
                "tandem_worker_spec_drafted_tokens",
                "Tokens drafted and verified.",
                counter(stats.map(|s| s.draft_tokens.load(Relaxed))),
            ),
            (
                "tandem_worker_spec_accepted_tokens",
                "Drafted tokens the verifier accepted.",
                counter(stats.map(|s| s.accepted_draft_tokens.load(Relaxed))),
            ),
            (
                "tandem_worker_spec_skipped_steps",
                "Steps where sequences asked for speculation and the cost model drafted nothing \
                 because no draft length was expected to pay.",
                counter(stats.map(|s| s.spec_skipped_steps.load(Relaxed))),
            ),
        ];
        for (name, help, c) in counters {
            let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        // Per draft position: drafted there and accepted there (acceptance per position).
        for (name, help, pick) in [
            (
                "tandem_worker_spec_drafted_at_position",
                "Drafted tokens by position in the draft (0 = first).",
                0,
            ),
            (
                "tandem_worker_spec_accepted_at_position",
                "Accepted drafted tokens by position in the draft (0 = first).",
                1,
            ),
        ] {
            let mut m =
                enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            let Some(s) = stats else { continue };
            let arr = if pick == 0 {
                &s.drafted_at
            } else {
                &s.accepted_at
            };
            for (pos, v) in arr.iter().enumerate() {
                let label = [("position", pos.to_string())];
                let fam = m.encode_family(&label)?;
                ConstCounter::new(v.load(Relaxed)).encode(fam)?;
            }
        }
        let predicted = stats.map_or(0.0, |s| {
            s.spec_predicted_speedup_milli.load(Relaxed) as f64 / 1000.0
        });
        let g = ConstGauge::new(predicted);
        let m = enc.encode_descriptor(
            "tandem_worker_spec_predicted_speedup",
            "Tokens per second with the chosen draft lengths over plain decoding, as the cost model \
             predicted for the last step that drafted.",
            None,
            g.metric_type(),
        )?;
        g.encode(m)?;
        let draft = self.loaded.get().and_then(|l| l.draft_stats.clone());
        let dc = |f: fn(&DraftClientStats) -> u64| ConstCounter::new(draft.as_deref().map_or(0, f));
        for (name, help, c) in [
            (
                "tandem_worker_draft_calls",
                "Propose calls to the draft service.",
                dc(|d| d.calls.load(Relaxed)),
            ),
            (
                "tandem_worker_draft_failures",
                "Draft calls that failed or passed their deadline; those steps decoded without \
                 drafts (same output, slower).",
                dc(|d| d.failures.load(Relaxed)),
            ),
            (
                "tandem_worker_draft_resent_sequences",
                "Sequences the draft service did not hold (restart, eviction), resent whole.",
                dc(|d| d.resent.load(Relaxed)),
            ),
            (
                "tandem_worker_draft_backoff_steps",
                "Steps decoded without asking the draft, which was backing off after failures.",
                dc(|d| d.skipped.load(Relaxed)),
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        let g = ConstGauge::new(i64::from(
            draft.as_deref().is_some_and(|d| d.paired.load(Relaxed)),
        ));
        let m = enc.encode_descriptor(
            "tandem_worker_draft_paired",
            "1 while a draft service is paired (reachable, same tokenizer).",
            None,
            g.metric_type(),
        )?;
        g.encode(m)?;
        Ok(())
    }
}
