//! Parse, don't validate: the wire `GenerateRequest` goes in, an engine `Request` comes out, and
//! every way a request can fail is one variant of [`GenerateError`], mapped to a gRPC status once.
//!
//! The engine's own `Request::validate` (run by `submit`) checks the ranges it knows (prompt,
//! vocabulary, context, temperature, top_p, stop strings, ...); this module checks what only the
//! wire format or this worker's limits can get wrong, and fills in the documented defaults.

use std::time::Duration;

use tandem_engine::speculate::{MAX_DRAFT_CANDIDATES, MAX_DRAFT_TOKENS};
use tandem_engine::{
    EngineError, FinishReason, Request, SamplingParams, SpecMode, Speculation, StopCriteria,
};
use tandem_proto::shard::v1::GenerateRequest;
use tandem_proto::v1 as pb;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

/// Output tokens when the client leaves `max_new_tokens` unset (the proto's documented default).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    #[error("top_k must be >= 0, got {0}")]
    NegativeTopK(i32),
    #[error(
        "max_new_tokens must be <= {limit} (this worker's max_new_tokens_limit), got {got}: lower max_new_tokens"
    )]
    MaxNewTokensOverLimit { got: u32, limit: usize },
    #[error("speculation.mode: unknown mode {0}: use 0 (server default), 1 (off), 2 (draft model) or 3 (ngram)")]
    UnknownSpeculationMode(i32),
    #[error("speculation.candidates must be <= {MAX_DRAFT_CANDIDATES}, got {0}")]
    CandidatesOverLimit(u32),
    #[error("speculation.max_draft_tokens must be <= {MAX_DRAFT_TOKENS}, got {0}")]
    MaxDraftTokensOverLimit(u32),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the model is still loading: retry shortly or on another replica")]
    Loading,
    #[error("server is draining: retry on another replica")]
    Draining,
}

impl GenerateError {
    pub fn code(&self) -> Code {
        match self {
            GenerateError::NegativeTopK(_)
            | GenerateError::MaxNewTokensOverLimit { .. }
            | GenerateError::UnknownSpeculationMode(_)
            | GenerateError::MaxDraftTokensOverLimit(_)
            | GenerateError::CandidatesOverLimit(_) => Code::InvalidArgument,
            GenerateError::Loading | GenerateError::Draining => Code::Unavailable,
            GenerateError::Engine(e) => match e {
                EngineError::Invalid { .. } | EngineError::ContextExceeded { .. } => {
                    Code::InvalidArgument
                }
                EngineError::QueueFull { .. } | EngineError::QueueTimeout { .. } => {
                    Code::ResourceExhausted
                }
                EngineError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
                EngineError::Stopped | EngineError::GroupFailed(_) => Code::Unavailable,
                EngineError::Model(_) | EngineError::Detokenize(_) => Code::Internal,
            },
        }
    }
}

impl From<GenerateError> for Status {
    fn from(e: GenerateError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Converts the wire request into the engine's, with the proto's defaults for unset fields:
/// greedy sampling, top_p 1, repetition_penalty 1, max_new_tokens 256 (lowered to what the
/// context leaves after the prompt, since the client asked for no particular length).
pub fn to_engine_request(
    req: GenerateRequest,
    max_new_tokens_limit: usize,
    max_context: usize,
) -> Result<Request, GenerateError> {
    let s = req.sampling.unwrap_or_default();
    if s.top_k < 0 {
        return Err(GenerateError::NegativeTopK(s.top_k));
    }
    let defaults = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.unsigned_abs() as usize,
        top_p: s.top_p.unwrap_or(defaults.top_p),
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty.unwrap_or(defaults.repetition_penalty),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        top_logprobs: s.top_logprobs as usize,
    };
    let stop = req.stopping.unwrap_or_default();
    let max_new_tokens = match stop.max_new_tokens {
        Some(n) if n as usize > max_new_tokens_limit => {
            return Err(GenerateError::MaxNewTokensOverLimit {
                got: n,
                limit: max_new_tokens_limit,
            })
        }
        Some(n) => n as usize,
        None => DEFAULT_MAX_NEW_TOKENS
            .min(max_new_tokens_limit)
            .min(max_context.saturating_sub(req.prompt.len()))
            // A prompt that fills the context still fails, with the context message.
            .max(1),
    };
    Ok(Request {
        prompt: req.prompt,
        sampling,
        stop: StopCriteria {
            max_new_tokens,
            eos_ids: Vec::new(),
            stop_token_ids: stop.stop_token_ids,
            stop_strings: stop.stop,
        },
        ignore_eos: stop.ignore_eos,
        speculation: parse_speculation(req.speculation)?,
    })
}

fn parse_speculation(s: Option<pb::Speculation>) -> Result<Speculation, GenerateError> {
    let Some(s) = s else {
        return Ok(Speculation::default());
    };
    use pb::speculation::Mode;
    let mode = match Mode::try_from(s.mode) {
        Ok(Mode::Unspecified) => SpecMode::Default,
        Ok(Mode::Off) => SpecMode::Off,
        Ok(Mode::DraftModel) => SpecMode::DraftModel,
        Ok(Mode::Ngram) => SpecMode::Ngram,
        Err(_) => return Err(GenerateError::UnknownSpeculationMode(s.mode)),
    };
    if s.max_draft_tokens as usize > MAX_DRAFT_TOKENS {
        return Err(GenerateError::MaxDraftTokensOverLimit(s.max_draft_tokens));
    }
    if s.candidates as usize > MAX_DRAFT_CANDIDATES {
        return Err(GenerateError::CandidatesOverLimit(s.candidates));
    }
    Ok(Speculation {
        mode,
        max_draft_tokens: s.max_draft_tokens as usize,
        candidates: s.candidates as usize,
    })
}

pub fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::StopToken => pb::FinishReason::StopToken,
        FinishReason::StopString => pb::FinishReason::StopString,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The client's deadline from the `grpc-timeout` header ("<up to 8 digits><H|M|S|m|u|n>").
/// tonic enforces it on the call future only, which for a stream ends at the response headers,
/// so the stream enforces it itself.
pub fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (&unit, digits) = v.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tandem_proto::v1::{SamplingParameters, StoppingCriteria};

    fn req(prompt: Vec<u32>) -> GenerateRequest {
        GenerateRequest {
            prompt,
            ..Default::default()
        }
    }

    #[test]
    fn unset_fields_take_the_documented_defaults() {
        let r = to_engine_request(req(vec![1, 2, 3]), 4096, 2048).unwrap();
        assert_eq!(r.sampling, SamplingParams::default());
        assert_eq!(r.stop.max_new_tokens, 256);
        assert!(!r.ignore_eos);
        // The default shrinks to what the context leaves.
        let r = to_engine_request(req(vec![1; 500]), 4096, 512).unwrap();
        assert_eq!(r.stop.max_new_tokens, 12);
    }

    #[test]
    fn set_fields_pass_through() {
        let mut g = req(vec![1]);
        g.sampling = Some(SamplingParameters {
            temperature: Some(0.7),
            top_k: 5,
            top_p: Some(0.9),
            repetition_penalty: Some(1.1),
            seed: Some(7),
            top_logprobs: 3,
            ..Default::default()
        });
        g.stopping = Some(StoppingCriteria {
            max_new_tokens: Some(9),
            stop: vec!["x".into()],
            stop_token_ids: vec![4],
            ignore_eos: true,
        });
        let r = to_engine_request(g, 4096, 2048).unwrap();
        assert_eq!(r.sampling.temperature, 0.7);
        assert_eq!(r.sampling.top_k, 5);
        assert_eq!(r.sampling.top_p, 0.9);
        assert_eq!(r.sampling.repetition_penalty, 1.1);
        assert_eq!(r.sampling.seed, Some(7));
        assert_eq!(r.sampling.top_logprobs, 3);
        assert_eq!(r.stop.max_new_tokens, 9);
        assert_eq!(r.stop.stop_strings, vec!["x".to_string()]);
        assert_eq!(r.stop.stop_token_ids, vec![4]);
        assert!(r.ignore_eos);
    }

    #[test]
    fn worker_limits_name_the_field_and_the_limit() {
        let mut g = req(vec![1]);
        g.sampling = Some(SamplingParameters {
            top_k: -3,
            ..Default::default()
        });
        let e = to_engine_request(g, 4096, 2048).unwrap_err();
        assert_eq!(e.to_string(), "top_k must be >= 0, got -3");
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);

        let mut g = req(vec![1]);
        g.stopping = Some(StoppingCriteria {
            max_new_tokens: Some(5000),
            ..Default::default()
        });
        let e = to_engine_request(g, 4096, 2048).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("max_new_tokens") && msg.contains("4096") && msg.contains("5000"));
    }

    #[test]
    fn engine_errors_map_to_codes() {
        let code = |e: EngineError| Status::from(GenerateError::from(e)).code();
        assert_eq!(
            code(EngineError::QueueFull { limit: 1 }),
            Code::ResourceExhausted
        );
        assert_eq!(code(EngineError::Stopped), Code::Unavailable);
        assert_eq!(code(EngineError::Model("x".into())), Code::Internal);
        assert_eq!(
            code(EngineError::ContextExceeded {
                prompt: 1,
                max_new_tokens: 1,
                context: 1
            }),
            Code::InvalidArgument
        );
    }

    #[test]
    fn parses_grpc_timeout() {
        let t = |v: &str| {
            let mut md = MetadataMap::new();
            md.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&md)
        };
        assert_eq!(t("200m"), Some(Duration::from_millis(200)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999u"), Some(Duration::from_micros(99999)));
        assert_eq!(t("123456789m"), None);
        assert_eq!(t("m"), None);
        assert_eq!(t("5x"), None);
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
