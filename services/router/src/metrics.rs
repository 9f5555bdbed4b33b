//! The router's Prometheus metrics, all prefixed `tandem_router_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The key's name from the key file.
    pub key: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `Generate`, `GenerateStream`, `Tokenize`, `ListModels`.
    pub method: String,
    /// gRPC status code in snake case (`ok`, `invalid_argument`, ...).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone)]
pub struct RouterMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Requests by API key name (never the key) and code, when keys are on.
    pub key_requests: Family<KeyLabels, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub in_flight: Gauge,
    pub generated_tokens: Counter,
    pub prompt_tokens: Counter,
    pub retries: Counter,
    pub worker_outstanding: Family<WorkerLabels, Gauge>,
    pub worker_requests: Family<WorkerLabels, Counter>,
    pub worker_usable: Family<WorkerLabels, Gauge>,
    /// 1 while the membership registry (etcd) is reachable, 0 while serving from the last
    /// known membership; absent with a static list.
    pub registry_connected: Gauge,
    pub member_groups: Gauge,
    /// 1 while a worker's circuit breaker has it ejected.
    pub worker_ejected: Family<WorkerLabels, Gauge>,
    pub ejections: Counter,
    /// Retries refused because the retry budget was spent.
    pub retries_refused: Counter,
}

impl RouterMetrics {
    /// Creates the metrics and registers them in `registry` (which should carry no prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            key_requests: Family::default(),
            // 1 ms .. ~65 s: a first token can wait behind a long queue.
            time_to_first_token: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 0.5 ms .. ~4 s.
            inter_token_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            request_duration: Histogram::new(exponential_buckets(0.001, 2.0, 19)),
            in_flight: Gauge::default(),
            generated_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            retries: Counter::default(),
            worker_outstanding: Family::default(),
            worker_requests: Family::default(),
            worker_usable: Family::default(),
            registry_connected: Gauge::default(),
            member_groups: Gauge::default(),
            worker_ejected: Family::default(),
            ejections: Counter::default(),
            retries_refused: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("tandem_router");
        r.register(
            "requests",
            "Public API requests by method and final gRPC status",
            m.requests.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request arrival to the first generated token sent to the client",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between generated tokens as the client sees them",
            m.inter_token_latency.clone(),
        );
        r.register(
            "request_duration_seconds",
            "End-to-end latency of generation requests",
            m.request_duration.clone(),
        );
        r.register(
            "in_flight_requests",
            "Generation requests being served now",
            m.in_flight.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens streamed back to clients",
            m.generated_tokens.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of forwarded requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "retries",
            "Requests retried on another worker before their first token",
            m.retries.clone(),
        );
        r.register(
            "worker_outstanding_requests",
            "Requests this router has in flight on each worker",
            m.worker_outstanding.clone(),
        );
        r.register(
            "worker_requests",
            "Generation attempts forwarded to each worker",
            m.worker_requests.clone(),
        );
        r.register(
            "worker_usable",
            "1 when the worker is in rotation (healthy, answering, tokenizer known)",
            m.worker_usable.clone(),
        );
        r.register(
            "worker_ejected",
            "1 while the worker is ejected by its circuit breaker (repeated request failures)",
            m.worker_ejected.clone(),
        );
        r.register(
            "ejections",
            "Times a worker was ejected by its circuit breaker",
            m.ejections.clone(),
        );
        r.register(
            "api_key_requests",
            "Public API requests by API key name and gRPC code (with --api-keys)",
            m.key_requests.clone(),
        );
        r.register(
            "retries_refused",
            "Failures before the first token not retried because the retry budget was spent",
            m.retries_refused.clone(),
        );
        r.register(
            "member_groups",
            "Group leaders in the membership (registry or static list), usable or not",
            m.member_groups.clone(),
        );
        m
    }

    /// Registered only when membership comes from a registry, so a static router does not
    /// report a registry it does not have.
    pub fn register_registry_metrics(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("tandem_router").register(
            "registry_connected",
            "1 while the membership registry (etcd) is reachable; 0 while the router serves from \
             the last known membership",
            self.registry_connected.clone(),
        );
    }

    pub fn request_done(&self, method: &str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: code_label(code).to_owned(),
            })
            .inc();
    }

    pub fn worker(&self, url: &str) -> WorkerLabels {
        WorkerLabels {
            worker: url.to_owned(),
        }
    }
}

pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
