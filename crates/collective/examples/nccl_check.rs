//! NCCL on every GPU of this machine: one rank per GPU (NCCL allows one rank per device), each a
//! thread; checks all-reduce (exact on integers, bit-identical across ranks), broadcast and
//! barrier. Run by scripts/gpu-check on a machine with GPUs:
//!
//!   cargo run --release -p tandem-collective --features nccl --example nccl_check -- [GPUS]
//!
//! Without the `nccl` feature it only says how to build it.

#[cfg(feature = "nccl")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::time::{Duration, Instant};
    use tandem_collective::{Communicator, NcclCommunicator};

    let gpus: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => return Err("usage: nccl_check GPUS (the number of GPUs to use)".into()),
    };
    println!("NCCL {}", tandem_collective::nccl_version()?);
    let id = tandem_collective::new_unique_id()?;
    let threads: Vec<_> = (0..gpus)
        .map(|rank| {
            let id = id.clone();
            std::thread::spawn(move || -> Result<(Vec<f32>, f64), String> {
                let device = candle_core::Device::new_cuda_with_stream(rank)
                    .map_err(|e| format!("GPU {rank}: {e}"))?;
                let comm = NcclCommunicator::new(rank, gpus, &id, &device, Duration::from_secs(60))
                    .map_err(|e| e.to_string())?;
                // A device tensor stays on the device: the model's row-parallel path.
                let t = candle_core::Tensor::full((rank + 1) as f32, (4, 1536), &device)
                    .map_err(|e| e.to_string())?;
                let sum = comm.all_reduce_tensor(&t).map_err(|e| e.to_string())?;
                let got: Vec<f32> = sum
                    .flatten_all()
                    .and_then(|s| s.to_vec1())
                    .map_err(|e| e.to_string())?;
                let want = (gpus * (gpus + 1) / 2) as f32;
                if got.iter().any(|&v| v != want) {
                    return Err(format!(
                        "rank {rank}: device all-reduce gave {} not {want}",
                        got[0]
                    ));
                }
                // Integers: the sum is exact whatever the reduction order.
                let mut buf: Vec<f32> = (0..1_000_003)
                    .map(|i| ((i * (rank + 1)) % 97) as f32)
                    .collect();
                comm.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
                let mut data = if rank == 0 {
                    b"tandem".to_vec()
                } else {
                    Vec::new()
                };
                comm.broadcast(0, &mut data).map_err(|e| e.to_string())?;
                if data != b"tandem" {
                    return Err(format!("rank {rank}: broadcast gave {data:?}"));
                }
                comm.barrier().map_err(|e| e.to_string())?;
                // Latency of a decode-sized all-reduce (one token's hidden state).
                let mut small = vec![1.0f32; 1536];
                let start = Instant::now();
                for _ in 0..100 {
                    comm.all_reduce_sum(&mut small).map_err(|e| e.to_string())?;
                }
                Ok((buf, start.elapsed().as_secs_f64() * 1e6 / 100.0))
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in threads {
        results.push(t.join().map_err(|_| "rank thread panicked")??);
    }
    let want: Vec<f32> = (0..1_000_003)
        .map(|i| (1..=gpus).map(|r| ((i * r) % 97) as f32).sum())
        .collect();
    for (rank, (buf, us)) in results.iter().enumerate() {
        if buf != &want {
            return Err(format!("rank {rank}: all-reduce sum differs from the expected").into());
        }
        println!("rank {rank}: all-reduce exact; 1536-float all-reduce {us:.1} us");
    }
    println!("nccl_check: ok on {gpus} GPU(s)");
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn main() {
    eprintln!("build with --features nccl: cargo run -p tandem-collective --features nccl --example nccl_check -- GPUS");
    std::process::exit(2);
}
