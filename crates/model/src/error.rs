use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Each variant names the file,
/// tensor or key involved so an operator can act on the message alone.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unknown architecture '{arch}' (supported: llama, qwen2)")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: missing key '{key}'")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: key '{key}': {reason}")]
    BadKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has shape {got:?}, expected {want:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' uses quantization {dtype}, which Tandem does not support")]
    UnsupportedQuantization {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: file is truncated or corrupt: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: no model found (expected a folder with config.json, or a .gguf file)")]
    NotAModel { path: PathBuf },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("KV slot {0} does not exist")]
    UnknownSlot(usize),
    #[error("sequence in slot {slot} would reach {len} tokens; the model's context is {limit}")]
    ContextExceeded {
        slot: usize,
        len: usize,
        limit: usize,
    },
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    /// The requested device cannot be used (no CUDA in this build, no driver, no such GPU).
    #[error("device: {0}")]
    Device(String),
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    #[error("tensor-parallel collective: {0}")]
    Collective(#[from] tandem_collective::CollectiveError),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
