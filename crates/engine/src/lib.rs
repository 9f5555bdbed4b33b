//! Tandem's engine: sampling, stopping and incremental detokenization per sequence, and the
//! continuous-batching scheduler that runs many sequences through one model.

pub mod detokenize;
pub mod draft;
pub mod group;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod speculate;
pub mod stopping;

pub use group::{Follower, FollowerError};
pub use request::{EngineError, Event, Request, TokenEvent, Usage};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{Engine, EngineConfig, EngineParts, EngineStats, Generation};
pub use speculate::{SpecMode, Speculation};
pub use stopping::{FinishReason, StopCriteria};
