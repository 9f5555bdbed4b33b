//! NCCL backend (feature `nccl`): the all-reduce of tensor parallelism on GPU tensors.
//!
//! The communicator runs on candle's own CUDA stream (`Device::new_cuda_with_stream`), so the
//! all-reduce is ordered with the kernels that produce and consume its tensors: no cross-stream
//! events, no races (a communicator on a stream of its own would need them).
//!
//! NCCL calls are asynchronous: a collective whose peer died spins on the GPU forever and the
//! host blocks in the next synchronization (reading the logits). A watchdog thread, as PyTorch's
//! process groups have, records an event after each collective and aborts the communicator when
//! one is not done within the timeout or NCCL reports an asynchronous error; the blocked kernel
//! then returns, and this rank reports the group failed instead of hanging.
//!
//! Why raw NCCL calls instead of cudarc's safe `Comm`: the watchdog must abort the communicator
//! from another thread while the owner is blocked, and `Comm` hides its handle (its `Drop` also
//! panics if the abort fails). The calls used are the same five: get-unique-id, init-rank,
//! all-reduce, broadcast, abort.

use std::collections::VecDeque;
use std::ffi::c_char;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape};
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};

use crate::{CollectiveError, Communicator, NCCL_UNIQUE_ID_BYTES};

/// How often the watchdog looks at in-flight collectives.
const WATCH_EVERY: Duration = Duration::from_millis(20);

/// A new NCCL unique id (rank 0 creates it; [`crate::share_unique_id`] hands it to the others).
pub fn new_unique_id() -> Result<Vec<u8>, CollectiveError> {
    let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    // c_char is i8 or u8 depending on the target; the bytes are opaque either way.
    #[allow(clippy::unnecessary_cast)]
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The NCCL library's version, e.g. 22809 for 2.28.9.
pub fn nccl_version() -> Result<i32, CollectiveError> {
    nccl::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))
}

fn nccl_err(what: &str, e: nccl::NcclError) -> CollectiveError {
    // `NcclError`'s Debug prints the result code's name (ncclUnhandledCudaError, ...).
    CollectiveError::Nccl(format!("{what}: {:?}", e.0))
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Nccl(format!("{what}: {e}"))
}

/// The communicator handle and what the watchdog needs, shared by the owner and its thread.
struct Shared {
    comm: sys::ncclComm_t,
    rank: usize,
    timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Why the communicator was aborted; every later call fails with it.
    broken: Option<String>,
    /// Events recorded after each collective, oldest first, with when they were enqueued.
    pending: VecDeque<(Instant, CudaEvent)>,
}

// SAFETY: `ncclComm_t` is a raw pointer, hence neither Send nor Sync. NCCL allows a communicator to
// be used from any thread; enqueueing calls are serialized by `state`'s mutex (taken around every
// call), and `ncclCommAbort` is documented as callable while other operations are in flight,
// which is the one thing the watchdog does from its own thread.
#[allow(unsafe_code)]
unsafe impl Send for Shared {}
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Aborts the communicator once: in-flight kernels return, later calls fail with `reason`.
    fn abort(&self, state: &mut State, reason: String) {
        if state.broken.is_some() {
            return;
        }
        tracing::error!(rank = self.rank, %reason, "aborting the NCCL communicator");
        // SAFETY: `comm` is a live communicator (aborted at most once: `broken` is set below and
        // Drop skips aborted ones).
        #[allow(unsafe_code)]
        let _ = unsafe { nccl::comm_abort(self.comm) };
        state.pending.clear();
        state.broken = Some(reason);
    }

    fn check(&self, state: &State) -> Result<(), CollectiveError> {
        match &state.broken {
            Some(reason) => Err(CollectiveError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    /// One watchdog pass: drop finished collectives, abort on an overdue one or an NCCL error.
    fn watch(&self) {
        let mut state = self.lock();
        if state.broken.is_some() {
            return;
        }
        while let Some((_, ev)) = state.pending.front() {
            match ev.try_is_complete() {
                Ok(true) => {
                    state.pending.pop_front();
                }
                Ok(false) => break,
                Err(e) => {
                    let reason = format!("a CUDA error after an NCCL collective: {e}");
                    self.abort(&mut state, reason);
                    return;
                }
            }
        }
        let mut async_error = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live (not aborted: checked above under the same lock).
        #[allow(unsafe_code)]
        let polled = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
        if polled == sys::ncclResult_t::ncclSuccess
            && async_error != sys::ncclResult_t::ncclSuccess
            && async_error != sys::ncclResult_t::ncclInProgress
        {
            let reason =
                format!("NCCL reported {async_error:?} (a peer failed or the network broke)");
            self.abort(&mut state, reason);
            return;
        }
        if let Some((since, _)) = state.pending.front() {
            if since.elapsed() > self.timeout {
                let reason = format!(
                    "an NCCL collective did not complete within {:?}: a rank of the group died \
                     or hangs",
                    self.timeout
                );
                self.abort(&mut state, reason);
            }
        }
    }
}

/// [`Communicator`] over NCCL, one rank per GPU, on candle's stream of that GPU.
pub struct NcclCommunicator {
    rank: usize,
    world_size: usize,
    device: CudaDevice,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device.cuda_stream().context().ordinal())
            .finish_non_exhaustive()
    }
}

impl NcclCommunicator {
    /// Joins the group identified by `unique_id` as `rank` of `world_size`, on `device` (a CUDA
    /// device opened with its own stream, the one the model runs on). Blocks until every rank has
    /// joined (NCCL's own rendezvous). A collective not done within `timeout` aborts the group.
    pub fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        device: &Device,
        timeout: Duration,
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
        let device = match device {
            Device::Cuda(d) => d.clone(),
            other => {
                return Err(CollectiveError::InvalidArgument(format!(
                    "NCCL needs a CUDA device, got {other:?}"
                )))
            }
        };
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))?;
        #[allow(clippy::unnecessary_cast)]
        let id = sys::ncclUniqueId {
            internal: raw.map(|b| b as c_char),
        };
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank on success and only read then; rank and
        // world size were range-checked above.
        #[allow(unsafe_code)]
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world_size as i32, id, rank as i32)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        let shared = Arc::new(Shared {
            comm,
            rank,
            timeout,
            state: Mutex::new(State::default()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (shared, stop, ctx) = (shared.clone(), stop.clone(), stream.context().clone());
            std::thread::Builder::new()
                .name(format!("nccl-watchdog-{rank}"))
                .spawn(move || {
                    // Event queries need the device's context current on this thread.
                    if let Err(e) = ctx.bind_to_thread() {
                        tracing::error!(rank, error = %e, "NCCL watchdog cannot bind the context");
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(WATCH_EVERY);
                        shared.watch();
                    }
                })
                .map_err(|e| cuda_err("starting the NCCL watchdog", e))?
        };
        Ok(Self {
            rank,
            world_size,
            device,
            shared,
            stop,
            watchdog: Some(watchdog),
        })
    }

    /// Aborts the communicator now (a peer is known dead: the control channel failed), so a rank
    /// blocked in a collective returns instead of waiting for the timeout.
    pub fn abort(&self, reason: &str) {
        let mut state = self.shared.lock();
        self.shared.abort(&mut state, reason.to_owned());
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.device.cuda_stream()
    }

    /// Enqueues one collective on the stream under the lock and registers it with the watchdog.
    fn enqueue(
        &self,
        what: &str,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<(), nccl::NcclError>,
    ) -> Result<(), CollectiveError> {
        let stream = self.stream();
        let mut state = self.shared.lock();
        self.shared.check(&state)?;
        call(self.shared.comm, stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_err(what, e))?;
        let ev = stream
            .record_event(None)
            .map_err(|e| cuda_err("recording a CUDA event", e))?;
        state.pending.push_back((Instant::now(), ev));
        Ok(())
    }

    /// Sum of `src` (f32, contiguous) over the group, into a new device buffer.
    fn all_reduce_storage(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<CudaStorage, CollectiveError> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            CollectiveError::InvalidArgument("NCCL all-reduce needs a contiguous tensor".into())
        })?;
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let n = end - start;
        let stream = self.stream();
        // SAFETY: every element of `dst` is written by the all-reduce before anything reads it
        // (both are ordered on `stream`).
        #[allow(unsafe_code)]
        let mut dst = unsafe { stream.alloc::<f32>(n) }.map_err(|e| cuda_err("cudaMalloc", e))?;
        self.enqueue("ncclAllReduce", |comm, s| {
            let (sp, _read) = src.device_ptr(&stream);
            let (dp, _write) = dst.device_ptr_mut(&stream);
            // SAFETY: `sp` and `dp` are `n` f32 on this communicator's device, alive until the
            // guards drop after the call is enqueued on `s`, the stream both are ordered on.
            #[allow(unsafe_code)]
            unsafe {
                nccl::all_reduce(
                    sp as _,
                    dp as _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    s,
                )
            }
            .map(|_| ())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(dst, self.device.clone()))
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let state = self.shared.lock();
        if state.broken.is_none() {
            // SAFETY: the communicator is live and no other user remains (the watchdog joined).
            #[allow(unsafe_code)]
            let _ = unsafe { nccl::comm_abort(self.shared.comm) };
        }
    }
}

/// The all-reduce as a candle op, so it takes and returns device tensors on candle's stream.
struct AllReduce<'a>(&'a NcclCommunicator);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce takes CUDA tensors; host tensors go over TCP")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = self
            .0
            .all_reduce_storage(storage, layout)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((out, layout.shape().clone()))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        if t.dtype() != DType::F32 {
            return Err(CollectiveError::InvalidArgument(format!(
                "all_reduce_tensor takes f32 tensors, got {:?}",
                t.dtype()
            )));
        }
        // World size 1 still goes through NCCL (a device copy): it is how one GPU checks the
        // NCCL path (scripts/gpu-check); groups of one otherwise use no communicator at all.
        if !t.device().is_cuda() {
            return crate::host_all_reduce_tensor(self, t);
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce(self))?)
    }

    fn check_healthy(&self) -> Result<(), CollectiveError> {
        self.shared.check(&self.shared.lock())
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() || self.world_size == 1 {
            return Ok(());
        }
        let dev = Device::Cuda(self.device.clone());
        let t = Tensor::from_slice(buf, buf.len(), &dev)?;
        let sum = self.all_reduce_tensor(&t)?.to_vec1::<f32>()?;
        self.check_healthy()?;
        buf.copy_from_slice(&sum);
        Ok(())
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
        // NCCL broadcasts fixed-size buffers: the length first, then the bytes.
        let mut len = [data.len() as u64];
        self.broadcast_slice(root, &mut len)?;
        let len = usize::try_from(len[0]).map_err(|_| {
            CollectiveError::Nccl(format!("broadcast length {} does not fit", len[0]))
        })?;
        if self.rank != root {
            data.clear();
            data.try_reserve_exact(len).map_err(|_| {
                CollectiveError::Nccl(format!("cannot allocate a {len}-byte broadcast"))
            })?;
            data.resize(len, 0);
        }
        if len > 0 {
            self.broadcast_slice(root, &mut data[..])?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        // NCCL has no barrier; a one-element all-reduce completes only once every rank joined it.
        if self.world_size == 1 {
            return Ok(());
        }
        self.all_reduce_sum(&mut [0.0])
    }
}

impl NcclCommunicator {
    /// In-place broadcast of a host slice through the device.
    fn broadcast_slice<T>(&self, root: usize, host: &mut [T]) -> Result<(), CollectiveError>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy,
    {
        let stream = self.stream();
        let mut dev = stream
            .clone_htod(&*host)
            .map_err(|e| cuda_err("copy to device", e))?;
        let bytes = std::mem::size_of_val(host);
        self.enqueue("ncclBroadcast", |comm, s| {
            let (p, _write) = dev.device_ptr_mut(&stream);
            // SAFETY: `p` is `bytes` bytes on this device, alive until the guard drops after the
            // call is enqueued on `s`.
            #[allow(unsafe_code)]
            unsafe {
                nccl::broadcast(
                    p as _,
                    p as _,
                    bytes,
                    sys::ncclDataType_t::ncclUint8,
                    root as i32,
                    comm,
                    s,
                )
            }
            .map(|_| ())
        })?;
        stream
            .memcpy_dtoh(&dev, host)
            .map_err(|e| cuda_err("copy to host", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        self.check_healthy()
    }
}

/// A GPU rank's communicator: tensors on the device go through NCCL, everything else (the
/// leader's step plans, barriers, host buffers) through the control communicator (TCP). A failed
/// control channel aborts NCCL at once, so a peer's death never leaves this rank in a GPU wait.
pub struct DeviceGroupCommunicator {
    control: Arc<dyn Communicator>,
    nccl: NcclCommunicator,
}

impl DeviceGroupCommunicator {
    pub fn new(control: Arc<dyn Communicator>, nccl: NcclCommunicator) -> Self {
        Self { control, nccl }
    }

    fn on_control<T>(&self, r: Result<T, CollectiveError>) -> Result<T, CollectiveError> {
        if let Err(e) = &r {
            self.nccl
                .abort(&format!("the group's control channel failed: {e}"));
        }
        r
    }
}

impl Communicator for DeviceGroupCommunicator {
    fn rank(&self) -> usize {
        self.control.rank()
    }
    fn world_size(&self) -> usize {
        self.control.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let r = self.control.all_reduce_sum(buf);
        self.on_control(r)
    }
    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let r = self.control.broadcast(root, data);
        self.on_control(r)
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        let r = self.control.barrier();
        self.on_control(r)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        if t.device().is_cuda() {
            self.nccl.all_reduce_tensor(t)
        } else {
            let r = self.control.all_reduce_tensor(t);
            self.on_control(r)
        }
    }
    fn check_healthy(&self) -> Result<(), CollectiveError> {
        self.nccl.check_healthy()?;
        self.control.check_healthy()
    }
}
