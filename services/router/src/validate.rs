//! Parse, don't validate: a wire `GenerateRequest` goes in, a [`ValidRequest`] comes out, and
//! nothing after this module re-checks a field. Every failure is one [`RequestError`] variant,
//! mapped to a gRPC status once, in `From<RequestError> for Status`.

use tandem_engine::request::{
    MAX_STOP_STRINGS, MAX_STOP_STRING_LEN, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS,
};
use tandem_model::{ChatMessage, TextModel};
use tandem_proto::v1::{
    generate_request, speculation, tokenize_request, GenerateRequest, SamplingParameters,
    Speculation, StoppingCriteria,
};
use tonic::Status;

use crate::pool::ModelView;

/// max_new_tokens when the request leaves it unset (the public API's documented default).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;
/// Longest request_id / session_id accepted; they end up in logs.
pub const MAX_ID_LEN: usize = 256;
/// Longest model name accepted (names are file stems or configured names).
pub const MAX_MODEL_NAME_LEN: usize = 256;
/// Error messages quote at most this much of a client's input: a status message travels in
/// HTTP/2 headers, which clients cap (a 1 MB name once came back whole).
const QUOTE_LEN: usize = 64;
/// Chat roles the public API documents.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Everything that can make the router refuse or fail a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{field}: {msg}")]
    Invalid { field: String, msg: String },
    #[error(
        "{field}: prompt has {prompt} tokens; this model's context is {context} (max_new_tokens {max_new_tokens} included): shorten the prompt or lower max_new_tokens"
    )]
    ContextExceeded {
        field: &'static str,
        prompt: usize,
        max_new_tokens: usize,
        context: usize,
    },
    #[error("model: unknown model '{}'; this cluster serves: {served}", quote(.name))]
    UnknownModel { name: String, served: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("every worker serving '{model}' has a full queue; retry with backoff ({detail})")]
    QueueFull { model: String, detail: String },
    #[error("deadline exceeded after {elapsed_ms} ms; the sequence was aborted")]
    DeadlineExceeded { elapsed_ms: u128 },
    /// A worker refused the request for a reason that another worker would share.
    #[error("worker: {}", .0.message())]
    Worker(Status),
    #[error("internal error: {0}")]
    Internal(String),
    /// API key checks (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED with RetryInfo).
    #[error("{}", .0.message())]
    Auth(Status),
}

impl RequestError {
    pub fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Invalid { .. } | Self::ContextExceeded { .. } => Code::InvalidArgument,
            Self::UnknownModel { .. } => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::QueueFull { .. } => Code::ResourceExhausted,
            Self::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Self::Worker(s) => s.code(),
            Self::Internal(_) => Code::Internal,
            Self::Auth(s) => s.code(),
        }
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        match e {
            // Keeps its details (RetryInfo).
            RequestError::Auth(s) => s,
            e => Status::new(e.code(), e.to_string()),
        }
    }
}

/// A request that passed every check: what the router forwards to a worker.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request_id: String,
    pub session_id: String,
    pub model: ModelView,
    pub prompt: Vec<u32>,
    /// Every field set explicitly, so the worker applies no defaults of its own.
    pub sampling: SamplingParameters,
    pub stopping: StoppingCriteria,
    /// Return per-token logprobs to the client.
    pub logprobs: bool,
    pub speculation: Option<Speculation>,
}

/// What to tokenize: the three inputs of `GenerateRequest` (`Tokenize` takes two of them).
pub enum Input {
    Text(String),
    TokenIds(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

impl Input {
    fn field(&self) -> &'static str {
        match self {
            Input::Text(_) => "text",
            Input::TokenIds(_) => "token_ids",
            Input::Chat(_) => "chat",
        }
    }
}

/// Parses the parts of a request that need no tokenizer, then tokenizes (on a blocking thread)
/// and checks the prompt against the model's limits. `router_limit` is the router's own cap
/// on max_new_tokens.
pub async fn parse_generate(
    req: GenerateRequest,
    model: ModelView,
    router_limit: usize,
) -> Result<ValidRequest, RequestError> {
    let request_id = parse_id("request_id", req.request_id)?.unwrap_or_else(new_request_id);
    let session_id = parse_id("session_id", req.session_id)?.unwrap_or_default();
    let sampling = parse_sampling(req.sampling.unwrap_or_default())?;
    let logprobs = sampling.logprobs || sampling.top_logprobs > 0;
    let stopping = req.stopping.unwrap_or_default();
    let speculation = req.speculation.map(parse_speculation).transpose()?;
    let limit = effective_limit(router_limit, model.max_new_tokens_limit);
    if let Some(n) = stopping.max_new_tokens {
        check_max_new_tokens(n as usize, limit)?;
    }
    check_stops(&stopping, model.vocab_size)?;
    let input = match req.input {
        None => {
            return Err(RequestError::invalid(
                "input",
                "no input: set one of text, token_ids or chat",
            ))
        }
        Some(generate_request::Input::Text(t)) => Input::Text(t),
        Some(generate_request::Input::TokenIds(ids)) => Input::TokenIds(ids.ids),
        Some(generate_request::Input::Chat(c)) => Input::Chat(parse_chat(c.messages)?),
    };
    let field = input.field();
    let prompt = tokenize(&model.text, input, model.vocab_size).await?;
    let context = model.context_length;
    let max_new_tokens = match stopping.max_new_tokens {
        Some(n) => n as usize,
        // Unset: the documented default, shortened to what the context leaves.
        None => DEFAULT_MAX_NEW_TOKENS
            .min(limit)
            .min(context.saturating_sub(prompt.len()))
            .max(1),
    };
    if prompt.len() + max_new_tokens > context {
        return Err(RequestError::ContextExceeded {
            field,
            prompt: prompt.len(),
            max_new_tokens,
            context,
        });
    }
    Ok(ValidRequest {
        request_id,
        session_id,
        prompt,
        sampling,
        stopping: StoppingCriteria {
            max_new_tokens: Some(max_new_tokens as u32),
            ..stopping
        },
        logprobs,
        speculation,
        model,
    })
}

/// Most tokens a request may ask to draft per step (the worker's cost model may draft fewer).
pub const MAX_DRAFT_TOKENS: u32 = 16;
/// Most candidate drafts a request may ask for per step.
pub const MAX_DRAFT_CANDIDATES: u32 = 8;

fn parse_speculation(s: Speculation) -> Result<Speculation, RequestError> {
    if speculation::Mode::try_from(s.mode).is_err() {
        return Err(RequestError::invalid(
            "speculation.mode",
            format!(
                "unknown mode {}: use 0 (server default), 1 (off), 2 (draft model) or 3 (ngram)",
                s.mode
            ),
        ));
    }
    if s.max_draft_tokens > MAX_DRAFT_TOKENS {
        return Err(RequestError::invalid(
            "speculation.max_draft_tokens",
            format!(
                "{} is over the limit of {MAX_DRAFT_TOKENS}",
                s.max_draft_tokens
            ),
        ));
    }
    if s.candidates > MAX_DRAFT_CANDIDATES {
        return Err(RequestError::invalid(
            "speculation.candidates",
            format!(
                "{} is over the limit of {MAX_DRAFT_CANDIDATES}",
                s.candidates
            ),
        ));
    }
    Ok(s)
}

/// The `Tokenize` RPC's input, parsed.
pub fn parse_tokenize_input(input: Option<tokenize_request::Input>) -> Result<Input, RequestError> {
    match input {
        None => Err(RequestError::invalid(
            "input",
            "no input: set one of text or chat",
        )),
        Some(tokenize_request::Input::Text(t)) => Ok(Input::Text(t)),
        Some(tokenize_request::Input::Chat(c)) => Ok(Input::Chat(parse_chat(c.messages)?)),
    }
}

/// The largest max_new_tokens accepted: the router's cap and the workers' (0 = none).
pub fn effective_limit(router_limit: usize, worker_limit: usize) -> usize {
    if worker_limit == 0 {
        router_limit
    } else {
        router_limit.min(worker_limit)
    }
}

/// Token ids exactly as `Generate` would send them to a worker. Text gets the special tokens
/// its tokenizer's post-processor requires (a BOS, for some models); a rendered chat template
/// already contains its special tokens, so none are added to it.
pub async fn tokenize(
    text: &TextModel,
    input: Input,
    vocab_size: usize,
) -> Result<Vec<u32>, RequestError> {
    let field = input.field();
    let ids = match input {
        Input::TokenIds(ids) => ids,
        Input::Text(t) if t.is_empty() => {
            return Err(RequestError::invalid("text", "must not be empty"))
        }
        Input::Text(t) => {
            let text = text.clone();
            blocking(move || text.encode(&t, true))
                .await?
                .map_err(|e| RequestError::invalid("text", format!("cannot tokenize: {e}")))?
        }
        Input::Chat(messages) => {
            let text = text.clone();
            blocking(move || {
                let rendered = text.apply_chat_template(&messages).map_err(|e| {
                    RequestError::invalid(
                        "chat",
                        format!("the model's chat template rejected the messages: {e}"),
                    )
                })?;
                text.encode(&rendered, false)
                    .map_err(|e| RequestError::invalid("chat", format!("cannot tokenize: {e}")))
            })
            .await??
        }
    };
    if ids.is_empty() {
        return Err(RequestError::invalid(
            field,
            "the prompt is empty (no tokens): send at least one token",
        ));
    }
    if let Some((i, bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        return Err(RequestError::invalid(
            field,
            format!(
                "token id {bad} at index {i} is outside the vocabulary (ids are 0..{vocab_size})"
            ),
        ));
    }
    Ok(ids)
}

/// Runs tokenizer work on the blocking pool: it is CPU work, and a long prompt or a large
/// chat template must not stall the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RequestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RequestError::Internal(format!("tokenizer task failed: {e}")))
}

/// The model name a request gives, refused when longer than any real name.
pub fn check_model_name(name: &str) -> Result<(), RequestError> {
    if name.len() > MAX_MODEL_NAME_LEN {
        return Err(RequestError::invalid(
            "model",
            format!(
                "must be at most {MAX_MODEL_NAME_LEN} bytes, got {}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The first `QUOTE_LEN` bytes of `s` (on a char boundary), marked when cut.
fn quote(s: &str) -> String {
    if s.len() <= QUOTE_LEN {
        return s.to_owned();
    }
    let mut end = QUOTE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

fn parse_id(field: &'static str, id: String) -> Result<Option<String>, RequestError> {
    if id.len() > MAX_ID_LEN {
        return Err(RequestError::invalid(
            field,
            format!("must be at most {MAX_ID_LEN} bytes, got {}", id.len()),
        ));
    }
    Ok((!id.is_empty()).then_some(id))
}

pub fn new_request_id() -> String {
    format!("req-{:016x}", rand::random::<u64>())
}

fn parse_chat(
    messages: Vec<tandem_proto::v1::ChatMessage>,
) -> Result<Vec<ChatMessage>, RequestError> {
    if messages.is_empty() {
        return Err(RequestError::invalid(
            "chat.messages",
            "must hold at least one message",
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(RequestError::invalid(
                    format!("chat.messages[{i}].role"),
                    format!("must be one of {ROLES:?}, got {:?}", m.role),
                ));
            }
            Ok(ChatMessage {
                role: m.role,
                content: m.content,
            })
        })
        .collect()
}

fn check_max_new_tokens(n: usize, limit: usize) -> Result<(), RequestError> {
    if n == 0 {
        return Err(RequestError::invalid(
            "max_new_tokens",
            "must be at least 1",
        ));
    }
    if n > limit {
        return Err(RequestError::invalid(
            "max_new_tokens",
            format!("must be <= {limit}, got {n}"),
        ));
    }
    Ok(())
}

fn check_stops(s: &StoppingCriteria, vocab_size: usize) -> Result<(), RequestError> {
    if s.stop.len() > MAX_STOP_STRINGS {
        return Err(RequestError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings, got {}",
                s.stop.len()
            ),
        ));
    }
    for (i, stop) in s.stop.iter().enumerate() {
        if stop.is_empty() {
            return Err(RequestError::invalid(
                format!("stop[{i}]"),
                "must not be empty",
            ));
        }
        if stop.len() > MAX_STOP_STRING_LEN {
            return Err(RequestError::invalid(
                format!("stop[{i}]"),
                format!(
                    "each stop string must be at most {MAX_STOP_STRING_LEN} bytes, got {}",
                    stop.len()
                ),
            ));
        }
    }
    if s.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(RequestError::invalid(
            "stop_token_ids",
            format!(
                "at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}",
                s.stop_token_ids.len()
            ),
        ));
    }
    if let Some(bad) = s.stop_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(RequestError::invalid(
            "stop_token_ids",
            format!("token id {bad} is outside the vocabulary (ids are 0..{vocab_size})"),
        ));
    }
    Ok(())
}

fn parse_sampling(s: SamplingParameters) -> Result<SamplingParameters, RequestError> {
    let temperature = s.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(RequestError::invalid(
            "temperature",
            format!("must be a finite number >= 0, got {temperature}"),
        ));
    }
    if s.top_k < 0 {
        return Err(RequestError::invalid(
            "top_k",
            format!("must be >= 0 (0 = off), got {}", s.top_k),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestError::invalid(
            "top_p",
            format!("must be in (0, 1], got {top_p}"),
        ));
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return Err(RequestError::invalid(
            "min_p",
            format!("must be in [0, 1], got {}", s.min_p),
        ));
    }
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(RequestError::invalid(
            "repetition_penalty",
            format!("must be a finite number > 0, got {repetition_penalty}"),
        ));
    }
    for (field, v) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            return Err(RequestError::invalid(
                field,
                format!("must be in [-2, 2], got {v}"),
            ));
        }
    }
    if s.top_logprobs as usize > MAX_TOP_LOGPROBS {
        return Err(RequestError::invalid(
            "top_logprobs",
            format!("must be <= {MAX_TOP_LOGPROBS}, got {}", s.top_logprobs),
        ));
    }
    Ok(SamplingParameters {
        temperature: Some(temperature),
        top_p: Some(top_p),
        repetition_penalty: Some(repetition_penalty),
        ..s
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sampling_errors_name_the_field_and_limit() {
        let bad = |s: SamplingParameters| parse_sampling(s).unwrap_err().to_string();
        let e = bad(SamplingParameters {
            temperature: Some(f32::NAN),
            ..Default::default()
        });
        assert!(e.starts_with("temperature:") && e.contains(">= 0"), "{e}");
        let e = bad(SamplingParameters {
            temperature: Some(-1.0),
            ..Default::default()
        });
        assert!(e.starts_with("temperature:"), "{e}");
        let e = bad(SamplingParameters {
            top_p: Some(0.0),
            ..Default::default()
        });
        assert!(e.starts_with("top_p:") && e.contains("(0, 1]"), "{e}");
        let e = bad(SamplingParameters {
            top_p: Some(1.5),
            ..Default::default()
        });
        assert!(e.starts_with("top_p:"), "{e}");
        let e = bad(SamplingParameters {
            top_k: -1,
            ..Default::default()
        });
        assert!(e.starts_with("top_k:"), "{e}");
        let e = bad(SamplingParameters {
            top_logprobs: 21,
            ..Default::default()
        });
        assert!(e.starts_with("top_logprobs:") && e.contains("20"), "{e}");
    }

    #[test]
    fn sampling_defaults_are_explicit() {
        let s = parse_sampling(SamplingParameters::default()).expect("defaults are valid");
        assert_eq!(s.temperature, Some(0.0));
        assert_eq!(s.top_p, Some(1.0));
        assert_eq!(s.repetition_penalty, Some(1.0));
    }

    #[test]
    fn stop_limits() {
        let many = StoppingCriteria {
            stop: vec!["x".into(); 9],
            ..Default::default()
        };
        let e = check_stops(&many, 10).unwrap_err().to_string();
        assert!(e.starts_with("stop:") && e.contains('8'), "{e}");
        let long = StoppingCriteria {
            stop: vec!["x".repeat(257)],
            ..Default::default()
        };
        let e = check_stops(&long, 10).unwrap_err().to_string();
        assert!(e.starts_with("stop[0]:") && e.contains("256"), "{e}");
        let ids = StoppingCriteria {
            stop_token_ids: vec![10],
            ..Default::default()
        };
        let e = check_stops(&ids, 10).unwrap_err().to_string();
        assert!(e.starts_with("stop_token_ids:"), "{e}");
        let many_ids = StoppingCriteria {
            stop_token_ids: vec![1; 65],
            ..Default::default()
        };
        let e = check_stops(&many_ids, 10).unwrap_err().to_string();
        assert!(e.starts_with("stop_token_ids:") && e.contains("64"), "{e}");
        let enough = StoppingCriteria {
            stop_token_ids: vec![1; 64],
            ..Default::default()
        };
        assert!(check_stops(&enough, 10).is_ok());
    }

    #[test]
    fn model_names_are_capped_and_quoted_short() {
        let e = check_model_name(&"m".repeat(257)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = e.to_string();
        assert!(
            e.starts_with("model:") && e.contains("256") && e.len() < 200,
            "{e}"
        );
        assert!(check_model_name(&"m".repeat(256)).is_ok());
        // An unknown name (under the cap) is echoed at most QUOTE_LEN bytes.
        let e = RequestError::UnknownModel {
            name: "é".repeat(100),
            served: "qwen".into(),
        }
        .to_string();
        assert!(e.len() < 160 && e.contains("(200 bytes)"), "{e}");
    }

    #[test]
    fn max_new_tokens_limits() {
        let e = check_max_new_tokens(0, 10).unwrap_err().to_string();
        assert!(e.starts_with("max_new_tokens:"), "{e}");
        let e = check_max_new_tokens(11, 10).unwrap_err().to_string();
        assert!(e.contains("<= 10") && e.contains("11"), "{e}");
        assert!(check_max_new_tokens(10, 10).is_ok());
        assert_eq!(effective_limit(100, 0), 100);
        assert_eq!(effective_limit(100, 50), 50);
    }

    #[test]
    fn chat_roles() {
        let m = |role: &str| tandem_proto::v1::ChatMessage {
            role: role.into(),
            content: "hi".into(),
        };
        assert!(parse_chat(vec![m("user")]).is_ok());
        let e = parse_chat(vec![m("user"), m("robot")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("chat.messages[1].role:"), "{e}");
        assert!(parse_chat(vec![]).is_err());
    }
}
