//! Configuration layers: flags, then `TANDEM_*` environment variables (both through clap), then
//! a TOML file (`--config` / `TANDEM_CONFIG`), then built-in defaults. Each subcommand's
//! arguments are one struct that is both the clap `Args` and the file's section, every field an
//! `Option`, so "unset" is visible at every layer and merging is a field-by-field `or`.
//!
//! ```toml
//! log_json = true
//!
//! [worker]
//! model = "/models/qwen2.5-coder-1.5b-instruct.gguf"
//! listen = "0.0.0.0:50061"
//! max_running = 16
//!
//! [router]
//! listen = "0.0.0.0:50051"
//! workers = ["http://worker-0:50061", "http://worker-1:50061"]
//! drain_grace = "20s"
//!
//! [draft]
//! model = "/models/qwen2.5-coder-0.5b-instruct.gguf"
//! idle_ttl = "60s"
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use crate::{DraftArgs, RouterArgs, UpArgs, WorkerArgs};

/// The config file: one optional section per subcommand.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub log_json: Option<bool>,
    #[serde(default)]
    pub worker: WorkerArgs,
    #[serde(default)]
    pub router: RouterArgs,
    #[serde(default)]
    pub up: UpArgs,
    #[serde(default)]
    pub draft: DraftArgs,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

/// Fills every field of `$flags` that is `None` from `$file`.
macro_rules! layer {
    ($flags:expr, $file:expr, [$($field:ident),* $(,)?]) => {
        $( if $flags.$field.is_none() { $flags.$field = $file.$field.take(); } )*
    };
}
pub(crate) use layer;

/// A duration written as `30s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 500ms, 2m)"))?;
        let secs = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            u => return Err(format!("'{s}': unknown unit '{u}' (use ms, s, m or h)")),
        };
        Duration::try_from_secs_f64(secs)
            .map(Dur)
            .map_err(|e| format!("'{s}': {e}"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Duration::try_from_secs_f64(s)
                .map(Dur)
                .map_err(serde::de::Error::custom),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `cpu`, `cuda` or `cuda:N`, as a flag and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceArg(pub tandem_model::DeviceKind);

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(DeviceArg)
    }
}

impl<'de> Deserialize<'de> for DeviceArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a GPU group's ranks sum activations (`--collective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveArg {
    /// NCCL when the ranks are on GPUs and the binary has it, else TCP.
    Auto,
    /// TCP through the host (also ranks that share one GPU, which NCCL refuses).
    Tcp,
    /// NCCL on device tensors (GPU binary, one GPU per rank).
    Nccl,
}

impl From<CollectiveArg> for tandem_worker::CollectiveBackend {
    fn from(c: CollectiveArg) -> Self {
        match c {
            CollectiveArg::Auto => Self::Auto,
            CollectiveArg::Tcp => Self::Tcp,
            CollectiveArg::Nccl => Self::Nccl,
        }
    }
}

/// `quantized` or `dequantized`, as a flag and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// Keep GGUF weights block-quantized (fast on CPU).
    Quantized,
    /// Dequantize GGUF weights to f32 at load.
    Dequantized,
}

/// Default speculation of a worker (`--speculation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpeculationArg {
    /// Plain decoding unless a request asks.
    Off,
    /// Prompt lookup (model-free): proposes what followed earlier occurrences of the last tokens.
    Ngram,
    /// The paired draft service (--draft-endpoint).
    DraftModel,
}

impl From<SpeculationArg> for tandem_engine::SpecMode {
    fn from(s: SpeculationArg) -> Self {
        match s {
            SpeculationArg::Off => Self::Off,
            SpeculationArg::Ngram => Self::Ngram,
            SpeculationArg::DraftModel => Self::DraftModel,
        }
    }
}

/// How draft lengths are chosen (`--draft-length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftLength {
    /// The cost model picks per step from measured costs and acceptance (none when none pays).
    Adaptive,
    /// Always the most allowed (as fixed-k implementations do); for comparison.
    Fixed,
}

/// How a sequence's context first reaches the draft (`--draft-catch-up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftCatchUp {
    /// In the background; steps decode without drafts until it is in.
    Background,
    /// In the step's draft call, which waits for the draft's prefill.
    Inline,
}

impl From<DraftCatchUp> for tandem_worker::CatchUp {
    fn from(c: DraftCatchUp) -> Self {
        match c {
            DraftCatchUp::Background => Self::Background,
            DraftCatchUp::Inline => Self::Inline,
        }
    }
}

impl From<Quant> for tandem_model::QuantMode {
    fn from(q: Quant) -> Self {
        match q {
            Quant::Quantized => tandem_model::QuantMode::Quantized,
            Quant::Dequantized => tandem_model::QuantMode::Dequantized,
        }
    }
}

/// The model cache folder: `TANDEM_MODEL_CACHE`, else `~/.cache/tandem/models`.
pub fn model_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_MODEL_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/tandem/models")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("30s".parse::<Dur>().unwrap().0, Duration::from_secs(30));
        assert_eq!(
            "500ms".parse::<Dur>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("2m".parse::<Dur>().unwrap().0, Duration::from_secs(120));
        assert_eq!("1.5".parse::<Dur>().unwrap().0, Duration::from_millis(1500));
        assert!("5 parsecs".parse::<Dur>().is_err());
        assert!("".parse::<Dur>().is_err());
    }

    #[test]
    fn file_sections() {
        let f: FileConfig = toml::from_str(
            r#"
            log_json = true
            [router]
            listen = "127.0.0.1:1"
            workers = ["http://a:1", "http://b:2"]
            drain_grace = "5s"
            request_timeout = 2.5
            [worker]
            model = "/m.gguf"
            quant = "dequantized"
            max_running = 4
            "#,
        )
        .unwrap();
        assert_eq!(f.log_json, Some(true));
        assert_eq!(f.router.workers.as_ref().unwrap().len(), 2);
        assert_eq!(f.router.drain_grace, Some(Dur(Duration::from_secs(5))));
        assert_eq!(
            f.router.request_timeout,
            Some(Dur(Duration::from_millis(2500)))
        );
        assert_eq!(f.worker.quant, Some(Quant::Dequantized));
        assert_eq!(f.worker.max_running, Some(4));
        let bad = toml::from_str::<FileConfig>("[router]\nlisten_typo = 1\n");
        assert!(bad.is_err());
    }
}
