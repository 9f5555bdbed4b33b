//! NCCL backend (feature `nccl`), through cudarc with the CUDA driver and NCCL loaded at run time.
//!
//! This implementation of [`Communicator`] works on host buffers: it copies them to the device,
//! runs the NCCL collective there and copies the result back. That serves the engine's control
//! traffic and tests; the GPU model path will all-reduce its device tensors directly with the
//! same NCCL communicator, without the host round trip.
//!
//! NCCL computes each element's sum once and distributes it (ring or tree), so all ranks get the
//! same bits, as with the TCP backend.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::{result::NcclError, Comm, Id, ReduceOp};

use crate::{CollectiveError, Communicator};

/// Size of an NCCL unique id (`ncclUniqueId`), as shipped through the rendezvous.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: `Comm` is not `Send` only because it holds NCCL's raw `ncclComm_t` pointer. NCCL allows a
// communicator to be used from any thread as long as calls on it are not concurrent; `Inner` only
// lives inside the `Mutex` of `NcclCommunicator`, which serializes every use.
#[allow(unsafe_code)]
unsafe impl Send for Inner {}

/// [`Communicator`] over NCCL, one rank per GPU.
pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    device_ordinal: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device_ordinal", &self.device_ordinal)
            .finish_non_exhaustive()
    }
}

fn nccl_err(what: &str, e: NcclError) -> CollectiveError {
    // `NcclError`'s own Debug prints only "NcclError"; the wrapped result code says which.
    CollectiveError::Nccl(format!("{what}: {:?}", e.0))
}

fn cuda_err(what: &str, e: DriverError) -> CollectiveError {
    CollectiveError::Nccl(format!("{what}: {e}"))
}

/// cudarc's dynamic loader panics when a library is missing; probing first turns a host without
/// CUDA or NCCL into an error.
fn ensure_libraries() -> Result<(), CollectiveError> {
    // SAFETY: these only try to dlopen the libraries by name; loading runs the libraries'
    // initializers, which is what using them requires anyway.
    #[allow(unsafe_code)]
    let (cuda, nccl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    };
    match (cuda, nccl) {
        (true, true) => Ok(()),
        (false, _) => Err(CollectiveError::Nccl(
            "the CUDA driver library (libcuda) cannot be loaded".into(),
        )),
        (true, false) => Err(CollectiveError::Nccl(
            "the NCCL library (libnccl.so) cannot be loaded; check LD_LIBRARY_PATH".into(),
        )),
    }
}

/// Runs FFI-backed set-up code, turning a panic inside cudarc (a missing symbol in an older
/// library, say) into an error: callers are promised errors, never panics.
fn guarded<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, CollectiveError>,
) -> Result<T, CollectiveError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(CollectiveError::Nccl(format!("{what}: cudarc panicked"))))
}

impl NcclCommunicator {
    /// A new NCCL unique id. Rank 0 creates it and publishes it through the rendezvous; every rank
    /// (rank 0 included) then passes it to [`NcclCommunicator::new`].
    pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
        guarded("ncclGetUniqueId", || {
            ensure_libraries()?;
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            // c_char is i8 or u8 depending on the target; the bytes are opaque either way.
            #[allow(clippy::unnecessary_cast)]
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        })
    }

    /// Joins the group identified by `unique_id` as `rank` of `world_size`, on GPU
    /// `device_ordinal`. Blocks until every rank has joined (NCCL's own rendezvous).
    pub fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        device_ordinal: usize,
    ) -> Result<Self, CollectiveError> {
        if world_size == 0 || world_size > i32::MAX as usize || rank >= world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} / world size {world_size} out of range"
            )));
        }
        let raw: [u8; NCCL_UNIQUE_ID_BYTES] = unique_id.try_into().map_err(|_| {
            CollectiveError::InvalidArgument(format!(
                "an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {}",
                unique_id.len()
            ))
        })?;
        #[allow(clippy::unnecessary_cast)]
        let internal: [c_char; NCCL_UNIQUE_ID_BYTES] = raw.map(|b| b as c_char);
        let inner = guarded("ncclCommInitRank", || {
            ensure_libraries()?;
            let ctx = CudaContext::new(device_ordinal)
                .map_err(|e| cuda_err(&format!("opening GPU {device_ordinal}"), e))?;
            // A stream of its own, so the host-buffer collectives do not serialize with the
            // model's work on the default stream.
            let stream = ctx
                .new_stream()
                .map_err(|e| cuda_err("creating a stream", e))?;
            let comm = Comm::from_rank(stream.clone(), rank, world_size, Id::uninit(internal))
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Inner { comm, stream })
        })?;
        Ok(Self {
            rank,
            world_size,
            device_ordinal,
            inner: Mutex::new(inner),
        })
    }

    /// The GPU this rank runs on.
    pub fn device_ordinal(&self) -> usize {
        self.device_ordinal
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() || self.world_size == 1 {
            return Ok(());
        }
        let g = self.lock();
        let mut dev = g
            .stream
            .clone_htod(&*buf)
            .map_err(|e| cuda_err("copy to device", e))?;
        g.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        g.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| cuda_err("copy to host", e))?;
        g.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} out of range for world size {}",
                self.world_size
            )));
        }
        if self.world_size == 1 {
            return Ok(());
        }
        let g = self.lock();
        let root_i32 = root as i32; // < world_size <= i32::MAX, checked in new()
                                    // NCCL broadcasts fixed-size buffers: the length first, then the bytes.
        let mut len = g
            .stream
            .clone_htod(&[data.len() as u64])
            .map_err(|e| cuda_err("copy to device", e))?;
        g.comm
            .broadcast_in_place(&mut len, root_i32)
            .map_err(|e| nccl_err("ncclBroadcast", e))?;
        let len = g
            .stream
            .clone_dtoh(&len)
            .map_err(|e| cuda_err("copy to host", e))?;
        let len = len.first().copied().unwrap_or(0);
        let len = usize::try_from(len).map_err(|_| {
            CollectiveError::Nccl(format!("broadcast length {len} does not fit in memory"))
        })?;
        if self.rank != root {
            data.clear();
            data.try_reserve_exact(len).map_err(|_| {
                CollectiveError::Nccl(format!("cannot allocate a {len}-byte broadcast"))
            })?;
            data.resize(len, 0);
        }
        if len == 0 {
            return Ok(());
        }
        let mut dev = g
            .stream
            .clone_htod(&data[..])
            .map_err(|e| cuda_err("copy to device", e))?;
        g.comm
            .broadcast_in_place(&mut dev, root_i32)
            .map_err(|e| nccl_err("ncclBroadcast", e))?;
        g.stream
            .memcpy_dtoh(&dev, &mut data[..])
            .map_err(|e| cuda_err("copy to host", e))?;
        g.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        // NCCL has no barrier; a one-element all-reduce completes only once every rank joined it.
        if self.world_size == 1 {
            return Ok(());
        }
        self.all_reduce_sum(&mut [0.0])
    }
}
