//! One error type for a `Propose` call, mapped once to a gRPC status at the service edge.

use tonic::{Code, Status};

/// Why a `Propose` call failed. Validation errors name the field (with its index in the request)
/// and the limit; nothing is changed by a call that fails validation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DraftError {
    #[error(
        "sequences: {got} in one call; this draft takes at most {limit} (split the call or raise --max-sequences)"
    )]
    TooManySequences { got: usize, limit: usize },
    #[error("sequences[{index}].max_tokens is {got}; this draft drafts at most {limit}")]
    TooManyTokens {
        index: usize,
        got: u32,
        limit: usize,
    },
    #[error(
        "sequences[{index}].append[{position}] is token id {token}, outside the draft's vocabulary (size {vocab})"
    )]
    TokenOutOfRange {
        index: usize,
        position: usize,
        token: u32,
        vocab: usize,
    },
    #[error(
        "sequences[{index}]: rollback_to {rollback_to} + {append} appended tokens = {total} tokens; the draft's context is {limit}"
    )]
    ContextExceeded {
        index: usize,
        rollback_to: u32,
        append: usize,
        total: usize,
        limit: usize,
    },
    #[error(
        "sequences[{index}].sequence_id {id} repeats sequences[{first}].sequence_id: each sequence at most once per call"
    )]
    DuplicateSequence { index: usize, first: usize, id: u64 },
    #[error("sequences[{index}].{field} is {got}; {expected}")]
    InvalidValue {
        index: usize,
        field: &'static str,
        got: String,
        expected: &'static str,
    },
    #[error(
        "draft model forward failed (the call's sequences were dropped; resend them from 0): {0}"
    )]
    Forward(String),
    #[error(
        "this call may hold up to {need} KV positions; the draft's KV budget is {budget} (--max-kv-tokens): send fewer or shorter sequences"
    )]
    KvBudget { need: usize, budget: usize },
    #[error("the draft model is still loading")]
    Loading,
    #[error("the draft is busy: {0} calls already queued")]
    QueueFull(usize),
    #[error("the draft stopped")]
    Stopped,
}

impl DraftError {
    pub fn code(&self) -> Code {
        match self {
            DraftError::TooManySequences { .. }
            | DraftError::TooManyTokens { .. }
            | DraftError::TokenOutOfRange { .. }
            | DraftError::ContextExceeded { .. }
            | DraftError::DuplicateSequence { .. }
            | DraftError::InvalidValue { .. } => Code::InvalidArgument,
            DraftError::Forward(_) => Code::Internal,
            DraftError::Loading | DraftError::Stopped => Code::Unavailable,
            DraftError::QueueFull(_) | DraftError::KvBudget { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<DraftError> for Status {
    fn from(e: DraftError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
