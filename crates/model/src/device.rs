//! Where a model runs: `cpu`, `cuda` or `cuda:N`, as given on the command line, and opening it
//! with an error that says what is missing (a build without CUDA, no driver, no such GPU)
//! instead of a panic deep inside the CUDA bindings.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{ModelError, Result};

/// A device as configured. `Cuda(None)` is "a GPU, which one decided by the caller": a rank of a
/// tensor-parallel group takes GPU `rank % count` (see [`DeviceKind::for_rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda(Option<usize>),
}

impl DeviceKind {
    pub fn is_cuda(&self) -> bool {
        matches!(self, DeviceKind::Cuda(_))
    }

    /// The device rank `rank` of a group uses: `cuda` becomes `cuda:<rank % GPUs>`, so ranks of a
    /// group on one node spread over its GPUs, and a pod that sees one GPU uses it. An explicit
    /// `cuda:N` or `cpu` is kept.
    pub fn for_rank(self, rank: usize) -> Result<Self> {
        match self {
            DeviceKind::Cuda(None) => {
                let count = cuda_device_count()?;
                Ok(DeviceKind::Cuda(Some(rank % count.max(1))))
            }
            other => Ok(other),
        }
    }

    /// Opens the device. CUDA devices get a stream of their own, which the NCCL all-reduce of
    /// tensor parallelism shares, so kernels and collectives are ordered on one stream.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda(n) => open_cuda(n.unwrap_or(0)),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(None) => f.write_str("cuda"),
            DeviceKind::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("unknown device '{s}': use cpu, cuda or cuda:N (N = GPU index)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda(None)),
            other => {
                let n = other
                    .strip_prefix("cuda:")
                    .or_else(|| other.strip_prefix("gpu:"))
                    .ok_or_else(bad)?;
                n.parse::<usize>()
                    .map(|n| DeviceKind::Cuda(Some(n)))
                    .map_err(|_| bad())
            }
        }
    }
}

/// True when this binary was built with CUDA support (`--features cuda`).
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(not(feature = "cuda"))]
fn no_cuda_build() -> ModelError {
    ModelError::Device(
        "this tandem binary was built without CUDA; build the GPU binary with scripts/build-cuda \
         (cargo features cuda,nccl) or run with --device cpu"
            .into(),
    )
}

/// How many CUDA devices the driver sees.
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    // `device_count` runs cuInit first: its failure is the driver's own reason (no device, a
    // driver too old for CUDA 13, a stub library), which is what the user needs to see.
    let n = CudaContext::device_count().map_err(|e| {
        ModelError::Device(format!(
            "the CUDA driver cannot be used: {e} (is the NVIDIA driver >= 580 installed and a \
             GPU visible to this process?)"
        ))
    })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Result<usize> {
    Err(no_cuda_build())
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let count = cuda_device_count()?;
    if count == 0 {
        return Err(ModelError::Device(
            "no CUDA device: the driver sees no GPU (check CUDA_VISIBLE_DEVICES and the \
             container's GPU request)"
                .into(),
        ));
    }
    if ordinal >= count {
        return Err(ModelError::Device(format!(
            "no CUDA device {ordinal}: this machine has {count} (cuda:0..cuda:{})",
            count - 1
        )));
    }
    // One device (one stream) per GPU per process: the model, its KV cache and the NCCL
    // communicator of tensor parallelism must share it to stay ordered without events.
    static OPENED: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut opened = OPENED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, d)) = opened.iter().find(|(n, _)| *n == ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda_with_stream(ordinal)
        .map_err(|e| ModelError::Device(format!("opening CUDA device {ordinal}: {e}")))?;
    opened.push((ordinal, d.clone()));
    Ok(d)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<Device> {
    Err(no_cuda_build())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for (s, want) in [
            ("cpu", DeviceKind::Cpu),
            ("CPU", DeviceKind::Cpu),
            ("cuda", DeviceKind::Cuda(None)),
            ("cuda:0", DeviceKind::Cuda(Some(0))),
            ("cuda:7", DeviceKind::Cuda(Some(7))),
        ] {
            assert_eq!(s.parse::<DeviceKind>(), Ok(want), "{s}");
        }
        assert_eq!(DeviceKind::Cuda(Some(3)).to_string(), "cuda:3");
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x", "cuda0"] {
            let e = bad.parse::<DeviceKind>().unwrap_err();
            assert!(e.contains("cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn cpu_is_kept_for_every_rank() {
        assert_eq!(DeviceKind::Cpu.for_rank(3).unwrap(), DeviceKind::Cpu);
        assert_eq!(
            DeviceKind::Cuda(Some(1)).for_rank(0).unwrap(),
            DeviceKind::Cuda(Some(1))
        );
    }

    /// Without the `cuda` feature (the default build, CI), asking for a GPU is an error that
    /// says how to get a GPU build, never a panic.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_a_cuda_build_says_how_to_get_one() {
        for d in [DeviceKind::Cuda(None), DeviceKind::Cuda(Some(1))] {
            let e = d.open().unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
            assert!(e.contains("scripts/build-cuda"), "{e}");
        }
        assert!(DeviceKind::Cuda(None).for_rank(1).is_err());
    }
}
