//! What the engine takes and gives: a validated `Request` in, a stream of `Event`s out.

use crate::sampling::SamplingParams;
use crate::speculate::Speculation;
use crate::stopping::{FinishReason, StopCriteria};

/// Limits on what one request may ask for, checked before it is queued.
pub const MAX_STOP_STRINGS: usize = 8;
pub const MAX_STOP_STRING_LEN: usize = 256;
/// Each is checked against every generated token; a few dozen cover every real use.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// `eos_ids` may be empty: the model's own EOS ids are added unless `ignore_eos`.
    pub stop: StopCriteria,
    /// Generate exactly `max_new_tokens` unless a stop token or string matches (benchmarks).
    pub ignore_eos: bool,
    /// Speculative decoding: which drafter and how many tokens at most per step. The output
    /// is the same with it or without (greedy token for token, sampling in distribution).
    pub speculation: Speculation,
}

impl Request {
    /// Checks everything that can be known before running. Each error names the field and the
    /// limit it broke.
    pub fn validate(&self, max_context: usize, vocab_size: usize) -> Result<(), EngineError> {
        let invalid = |field: &'static str, msg: String| Err(EngineError::Invalid { field, msg });
        if self.prompt.is_empty() {
            return invalid("prompt", "must not be empty".into());
        }
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary (ids are 0..{vocab_size})"),
            );
        }
        let max_new = self.stop.max_new_tokens;
        if max_new == 0 {
            return invalid("max_new_tokens", "must be at least 1".into());
        }
        if self.prompt.len() + max_new > max_context {
            return Err(EngineError::ContextExceeded {
                prompt: self.prompt.len(),
                max_new_tokens: max_new,
                context: max_context,
            });
        }
        let s = &self.sampling;
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return invalid(
                "temperature",
                format!("must be a finite number >= 0, got {}", s.temperature),
            );
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return invalid("top_p", format!("must be in (0, 1], got {}", s.top_p));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return invalid("min_p", format!("must be in [0, 1], got {}", s.min_p));
        }
        if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!("must be > 0, got {}", s.repetition_penalty),
            );
        }
        for (field, v) in [
            ("presence_penalty", s.presence_penalty),
            ("frequency_penalty", s.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return invalid(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if s.top_logprobs > MAX_TOP_LOGPROBS {
            return invalid(
                "top_logprobs",
                format!("must be <= {MAX_TOP_LOGPROBS}, got {}", s.top_logprobs),
            );
        }
        if self.stop.stop_strings.len() > MAX_STOP_STRINGS {
            return invalid(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.stop_strings.len()
                ),
            );
        }
        if let Some(s) = self
            .stop
            .stop_strings
            .iter()
            .find(|s| s.len() > MAX_STOP_STRING_LEN)
        {
            return invalid(
                "stop",
                format!(
                    "each stop string must be at most {MAX_STOP_STRING_LEN} bytes, got {}",
                    s.len()
                ),
            );
        }
        if self.stop.stop_strings.iter().any(|s| s.is_empty()) {
            return invalid("stop", "stop strings must not be empty".into());
        }
        if self.stop.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return invalid(
                "stop_token_ids",
                format!(
                    "at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}",
                    self.stop.stop_token_ids.len()
                ),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// Text this token released (may be empty: held back as a possible stop string or a
    /// partial UTF-8 character).
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Drafted tokens the verifier accepted.
    pub accepted_draft_tokens: usize,
    /// From submission to the first token.
    pub queue_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(TokenEvent),
    Finished {
        reason: FinishReason,
        usage: Usage,
        total_ms: f64,
    },
    Error(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{field}: {msg}")]
    Invalid { field: &'static str, msg: String },
    #[error(
        "prompt has {prompt} tokens; this model's context is {context} (max_new_tokens {max_new_tokens} included): shorten the prompt or lower max_new_tokens"
    )]
    ContextExceeded {
        prompt: usize,
        max_new_tokens: usize,
        context: usize,
    },
    #[error("queue full: {limit} requests already waiting; retry later or on another replica")]
    QueueFull { limit: usize },
    #[error(
        "waited {waited_ms} ms in the queue without starting; the limit is {limit_ms} ms \
         (max_queue_time): retry later or on another replica"
    )]
    QueueTimeout { waited_ms: u64, limit_ms: u64 },
    #[error("the client's deadline passed after {waited_ms} ms in the queue; not started")]
    DeadlineExceeded { waited_ms: u64 },
    #[error("model failure: {0}")]
    Model(String),
    #[error("detokenization failure: {0}")]
    Detokenize(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("tensor-parallel group failed ({0}); this replica cannot serve until restarted")]
    GroupFailed(String),
}
