//! The draft service of speculative decoding (DESIGN.md, "Speculative decoding, exactly"): a
//! small model sharing the target's tokenizer proposes a few tokens per sequence, with the
//! distribution q each was drawn from, keeping a KV cache per sequence so each call sends only
//! what changed (`tandem.draft.v1.Drafter`).
//!
//! [`DraftCore`] is the model and its sequences, synchronous and testable without gRPC.

mod core;
mod error;
mod sample;

pub use crate::core::{
    CallStats, CoreConfig, DraftCore, DEFAULT_MAX_Q_TOKENS, MAX_DRAFT_TOKENS, MAX_Q_TOKENS_LIMIT,
};
pub use crate::error::DraftError;
