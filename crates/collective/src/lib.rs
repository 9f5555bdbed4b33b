//! Collective communication for Tandem's tensor-parallel ranks.
//!
//! A tensor-parallel group runs one rank per device (or process). Row-parallel layers end with an
//! all-reduce (sum) of partial activations, the leader broadcasts each step's work, and the group
//! meets at barriers. [`Communicator`] is that small surface; backends:
//!
//! - [`TcpCommunicator`] (always built): blocking `std::net`, one TCP connection per pair of ranks.
//!   CPU inference and CI use it.
//! - `NcclCommunicator` (feature `nccl`): NCCL on GPU tensors, on candle's CUDA stream, with a
//!   watchdog that aborts a collective whose peer died; `DeviceGroupCommunicator` pairs it with
//!   the TCP backend, which keeps carrying the step plans.
//! - [`LocalCommunicator`]: a group of one (TP=1), where every collective is a no-op.
//!
//! Every rank must call the same collectives in the same order with the same buffer lengths
//! (broadcast lengths excepted: non-root ranks take the root's). Results of `all_reduce_sum` are
//! bit-identical on every rank, because each element's sum is computed in one fixed order and then
//! copied, never re-summed per rank: ranks compute identical activations from it.

mod error;
#[cfg(feature = "nccl")]
mod nccl;
pub mod tcp;

use candle_core::{DType, Tensor};

pub use error::CollectiveError;
#[cfg(feature = "nccl")]
pub use nccl::{nccl_version, new_unique_id, DeviceGroupCommunicator, NcclCommunicator};
pub use tcp::{TcpCommunicator, TcpOptions};

/// The collectives a tensor-parallel rank needs. Calls block until every rank took part, a peer
/// failed, or a timeout passed; they never panic.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum over all ranks of an f32 buffer (every rank ends with the same sum).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Rank `root`'s bytes to every rank (variable length: non-root ranks get the root's length).
    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;

    /// Sum over all ranks of an f32 tensor of any shape, returned on the same device. By default
    /// through the host and `all_reduce_sum`; NCCL keeps device tensors on the device.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        host_all_reduce_tensor(self, t)
    }

    /// An error if a failure outside any call (NCCL's watchdog aborting an overdue collective)
    /// means results already returned cannot be trusted. Checked once results reach the host.
    fn check_healthy(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// [`Communicator::all_reduce_tensor`] of `comm`.
pub fn all_reduce_tensor(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor, CollectiveError> {
    comm.all_reduce_tensor(t)
}

/// All-reduce (sum) an f32 tensor through `comm`'s host buffers: copied to the host, reduced,
/// and returned with the same shape on the same device.
pub fn host_all_reduce_tensor<C: Communicator + ?Sized>(
    comm: &C,
    t: &Tensor,
) -> Result<Tensor, CollectiveError> {
    if t.dtype() != DType::F32 {
        return Err(CollectiveError::InvalidArgument(format!(
            "all_reduce_tensor takes f32 tensors, got {:?}",
            t.dtype()
        )));
    }
    if comm.world_size() == 1 {
        return Ok(t.clone());
    }
    let mut values = t.flatten_all()?.to_vec1::<f32>()?;
    comm.all_reduce_sum(&mut values)?;
    Ok(Tensor::from_vec(values, t.shape(), t.device())?)
}

/// A group of one rank: TP=1 runs the same code path with no communication.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCommunicator;

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, root: usize, _data: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if root != 0 {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} out of range for world size 1"
            )));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Size of an NCCL unique id (`ncclUniqueId`), as it travels through the rendezvous.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Rank 0's NCCL unique id, handed to every rank over `control` (the TCP group, which is the
/// rendezvous of groups started with `--group-peers`). Rank 0 calls `make` (NCCL's
/// `ncclGetUniqueId`); if that fails it still broadcasts (an empty id), so the other ranks fail
/// at once instead of waiting for a timeout.
pub fn share_unique_id(
    control: &dyn Communicator,
    make: impl FnOnce() -> Result<Vec<u8>, CollectiveError>,
) -> Result<Vec<u8>, CollectiveError> {
    let mut id = Vec::new();
    let mut made = Ok(());
    if control.rank() == 0 {
        match make() {
            Ok(bytes) if bytes.len() == NCCL_UNIQUE_ID_BYTES => id = bytes,
            Ok(bytes) => {
                made = Err(CollectiveError::InvalidArgument(format!(
                    "an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {}",
                    bytes.len()
                )))
            }
            Err(e) => made = Err(e),
        }
    }
    control.broadcast(0, &mut id)?;
    made?;
    if id.len() != NCCL_UNIQUE_ID_BYTES {
        return Err(CollectiveError::Nccl(format!(
            "rank 0 sent no NCCL unique id ({} bytes): it could not create one, see its log",
            id.len()
        )));
    }
    Ok(id)
}

/// An NCCL unique id as the etcd rendezvous record carries it (lower-case hex).
pub fn encode_unique_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The id back from [`encode_unique_id`]'s text; anything but 256 hex digits is an error.
pub fn decode_unique_id(hex: &str) -> Result<Vec<u8>, CollectiveError> {
    let bad = || {
        CollectiveError::InvalidArgument(format!(
            "an NCCL unique id is {} hex digits, got {:?}",
            2 * NCCL_UNIQUE_ID_BYTES,
            hex.chars().take(16).collect::<String>()
        ))
    };
    if hex.len() != 2 * NCCL_UNIQUE_ID_BYTES || !hex.is_ascii() {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unique_id_hex_round_trips_and_rejects_bad_text() {
        let id: Vec<u8> = (0..NCCL_UNIQUE_ID_BYTES).map(|i| (i * 37) as u8).collect();
        let hex = encode_unique_id(&id);
        assert_eq!(hex.len(), 256);
        assert_eq!(decode_unique_id(&hex).unwrap(), id);
        assert_eq!(decode_unique_id(&hex.to_uppercase()).unwrap(), id);
        for bad in [
            String::new(),
            "ab".repeat(127),
            "ab".repeat(129),
            format!("{}zz", "ab".repeat(127)),
            format!("{}\u{e9}", "a".repeat(254)),
        ] {
            let e = decode_unique_id(&bad).unwrap_err().to_string();
            assert!(e.contains("256 hex digits"), "{e}");
        }
    }
}
