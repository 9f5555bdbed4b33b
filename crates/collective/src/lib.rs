//! Collective communication for Tandem's tensor-parallel ranks.
//!
//! A tensor-parallel group runs one rank per device (or process). Row-parallel layers end with an
//! all-reduce (sum) of partial activations, the leader broadcasts each step's work, and the group
//! meets at barriers. [`Communicator`] is that small surface; backends:
//!
//! - [`TcpCommunicator`] (always built): blocking `std::net`, one TCP connection per pair of ranks.
//!   CPU inference and CI use it.
//! - `NcclCommunicator` (feature `nccl`): NCCL through cudarc, loaded at run time.
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
pub use nccl::{NcclCommunicator, NCCL_UNIQUE_ID_BYTES};
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
}

/// All-reduce (sum) an f32 tensor of any shape and device through `comm`: copied to the host,
/// reduced, and returned with the same shape on the same device.
pub fn all_reduce_tensor(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor, CollectiveError> {
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
