//! The TCP backend across threads of one process, each rank its own communicator on 127.0.0.1.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_collective::tcp::bind_local;
use tandem_collective::{
    all_reduce_tensor, CollectiveError, Communicator, TcpCommunicator, TcpOptions,
};

const SIZES: [usize; 4] = [1, 7, 1000, 100_003];

fn options() -> TcpOptions {
    TcpOptions {
        connect_timeout: Duration::from_secs(20),
        ..TcpOptions::default()
    }
}

fn group(world: usize, options: &TcpOptions) -> Vec<TcpCommunicator> {
    TcpCommunicator::local_group(world, options).expect("connect the group")
}

/// Runs `f` on every rank at once, one thread each; results in rank order.
fn on_all<T: Send>(comms: Vec<TcpCommunicator>, f: impl Fn(TcpCommunicator) -> T + Sync) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || f(c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Integer-valued data: sums stay exact in f32 whatever the order.
fn int_data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + rank * 104_729) % 2001) as f32 - 1000.0)
        .collect()
}

fn random_data(rank: usize, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64((rank as u64) << 32 | n as u64);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Thresholds forcing the star path, the default choice, and the ring path.
const THRESHOLDS: [usize; 3] = [
    usize::MAX,
    tandem_collective::tcp::DEFAULT_RING_THRESHOLD_BYTES,
    0,
];

#[test]
fn all_reduce_integers_is_exact() {
    for world in [2, 3, 4] {
        let comms = group(world, &options());
        let results = on_all(comms, |c| {
            let mut out = Vec::new();
            for threshold in THRESHOLDS {
                c.set_ring_threshold_bytes(threshold);
                for n in SIZES {
                    let mut buf = int_data(c.rank(), n);
                    c.all_reduce_sum(&mut buf).expect("all_reduce");
                    out.push((threshold, n, buf));
                }
            }
            out
        });
        for rank_results in &results {
            for (threshold, n, got) in rank_results {
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| int_data(r, *n)).collect();
                let expected: Vec<f32> =
                    (0..*n).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
                assert_eq!(
                    got, &expected,
                    "world {world}, n {n}, threshold {threshold}"
                );
            }
        }
    }
}

#[test]
fn all_reduce_floats_match_f64_and_are_bit_identical_across_ranks() {
    for world in [2, 3, 4] {
        let comms = group(world, &options());
        let results = on_all(comms, |c| {
            let mut out = Vec::new();
            for threshold in THRESHOLDS {
                c.set_ring_threshold_bytes(threshold);
                for n in SIZES {
                    let mut buf = random_data(c.rank(), n);
                    c.all_reduce_sum(&mut buf).expect("all_reduce");
                    out.push(buf);
                }
            }
            out
        });
        let mut k = 0;
        for threshold in THRESHOLDS {
            for n in SIZES {
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| random_data(r, n)).collect();
                for i in 0..n {
                    let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
                    // Relative to the sum of magnitudes: the bound f32 summation guarantees even
                    // where the terms cancel.
                    let scale: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
                    let got = f64::from(results[0][k][i]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * scale.max(f64::MIN_POSITIVE),
                        "world {world}, n {n}, threshold {threshold}, [{i}]: {got} vs {exact}"
                    );
                }
                let bits0: Vec<u32> = results[0][k].iter().map(|v| v.to_bits()).collect();
                for (r, rank_results) in results.iter().enumerate().skip(1) {
                    let bits: Vec<u32> = rank_results[k].iter().map(|v| v.to_bits()).collect();
                    assert!(
                        bits == bits0,
                        "world {world}, n {n}, threshold {threshold}: rank {r} differs from rank 0"
                    );
                }
                k += 1;
            }
        }
    }
}

#[test]
fn all_reduce_is_deterministic_across_runs() {
    let run = || {
        on_all(group(3, &options()), |c| {
            let mut a = random_data(c.rank(), 100_003);
            c.all_reduce_sum(&mut a).expect("all_reduce");
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        })
    };
    assert_eq!(run(), run());
}

fn payload(root: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + root * 7) as u8).collect()
}

#[test]
fn broadcast_from_every_root_with_any_length() {
    for world in [2, 3, 4] {
        let comms = group(world, &options());
        let results = on_all(comms, |c| {
            let mut out = Vec::new();
            for root in 0..world {
                for len in [0, 10, 1 << 20] {
                    let mut data = if c.rank() == root {
                        payload(root, len)
                    } else {
                        vec![0xAA; 5] // stale content of another length: must be replaced
                    };
                    c.broadcast(root, &mut data).expect("broadcast");
                    out.push((root, len, data));
                }
            }
            out
        });
        for rank_results in results {
            for (root, len, data) in rank_results {
                assert_eq!(data.len(), len, "world {world}, root {root}");
                assert!(
                    data == payload(root, len),
                    "world {world}, root {root}, len {len}"
                );
            }
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    for world in [2, 3, 4] {
        let times = on_all(group(world, &options()), |c| {
            // Ranks arrive at different times; nobody may leave before the last one arrived.
            thread::sleep(Duration::from_millis(60 * c.rank() as u64));
            let entered = Instant::now();
            c.barrier().expect("barrier");
            let left = Instant::now();
            c.barrier().expect("second barrier");
            (entered, left)
        });
        let last_entry = times.iter().map(|t| t.0).max().expect("ranks");
        for (r, (_, left)) in times.iter().enumerate() {
            assert!(
                *left >= last_entry,
                "world {world}: rank {r} left the barrier early"
            );
        }
    }
}

#[test]
fn mixed_collectives_in_sequence() {
    let results = on_all(group(3, &options()), |c| {
        let mut sums = Vec::new();
        for step in 0..20usize {
            let mut plan = if c.rank() == 0 {
                format!("step {step}").into_bytes()
            } else {
                Vec::new()
            };
            c.broadcast(0, &mut plan).expect("broadcast");
            assert_eq!(plan, format!("step {step}").into_bytes());
            let mut x = vec![(c.rank() + step) as f32; 300 + step * 5000];
            c.all_reduce_sum(&mut x).expect("all_reduce");
            sums.push(x[0]);
            if step % 5 == 0 {
                c.barrier().expect("barrier");
            }
        }
        sums
    });
    for sums in results {
        for (step, s) in sums.iter().enumerate() {
            assert_eq!(*s, (3 * step + 3) as f32);
        }
    }
}

#[test]
fn all_reduce_tensor_keeps_shape() {
    let results = on_all(group(2, &options()), |c| {
        let t = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu)
            .and_then(|t| t.affine(c.rank() as f64 + 1.0, 0.0))
            .expect("tensor");
        let sum = all_reduce_tensor(&c, &t).expect("all_reduce_tensor");
        // A strided (transposed) view goes through the same path.
        let sum_t = all_reduce_tensor(&c, &t.t().expect("t")).expect("all_reduce_tensor");
        let bad = all_reduce_tensor(&c, &t.to_dtype(candle_core::DType::F64).expect("f64"));
        (sum, sum_t, bad.is_err())
    });
    for (sum, sum_t, bad) in results {
        assert_eq!(sum.dims(), &[2, 3]);
        assert_eq!(
            sum.to_vec2::<f32>().expect("vec"),
            vec![vec![3., 6., 9.], vec![12., 15., 18.]]
        );
        assert_eq!(sum_t.dims(), &[3, 2]);
        assert_eq!(
            sum_t.to_vec2::<f32>().expect("vec"),
            vec![vec![3., 12.], vec![6., 15.], vec![9., 18.]]
        );
        assert!(bad, "an f64 tensor must be refused");
    }
}

/// One rank drops its communicator after the first collective; the others' next all-reduce must
/// fail (promptly: the bound only catches a hang), and every later call too.
fn dropped_rank_case(world: usize, dropper: usize, n: usize) {
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_secs(2)),
        ..options()
    };
    let results = on_all(group(world, &opts), |c| {
        let mut buf = vec![1.0f32; n];
        c.all_reduce_sum(&mut buf).expect("first all_reduce");
        assert_eq!(buf[0], world as f32);
        if c.rank() == dropper {
            drop(c);
            return None;
        }
        let start = Instant::now();
        let err = c
            .all_reduce_sum(&mut buf)
            .expect_err("all_reduce with a dead rank");
        let elapsed = start.elapsed();
        let later = c
            .all_reduce_sum(&mut buf)
            .expect_err("a broken communicator");
        assert!(matches!(later, CollectiveError::Broken(_)), "{later}");
        assert!(c.is_broken());
        Some((elapsed, err.to_string()))
    });
    for (rank, r) in results.into_iter().enumerate() {
        if let Some((elapsed, msg)) = r {
            assert!(
                elapsed < Duration::from_secs(30),
                "world {world}, n {n}: rank {rank} took {elapsed:?} to fail ({msg})"
            );
        }
    }
}

#[test]
fn dropped_rank_fails_the_others_quickly() {
    for world in [2, 3, 4] {
        // Star path (rank 0 is the hub) and ring path; the hub itself and a leaf dying.
        for dropper in [0, world - 1] {
            dropped_rank_case(world, dropper, 16);
            dropped_rank_case(world, dropper, 100_003);
        }
    }
}

#[test]
fn closed_connection_names_the_peer() {
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_secs(2)),
        ..options()
    };
    let mut comms = group(2, &opts);
    let rank1 = comms.pop().expect("rank 1");
    let addr1 = rank1.addrs()[1];
    drop(rank1);
    let err = comms[0]
        .all_reduce_sum(&mut [1.0])
        .expect_err("peer is gone");
    assert_eq!(
        err.to_string(),
        format!("rank 1 ({addr1}) closed the connection")
    );
}

#[test]
fn hung_rank_times_out_instead_of_hanging() {
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_millis(500)),
        ..options()
    };
    // Rank 2 stays alive, connections open, until both others have failed.
    let (failed, wait_failed) = std::sync::mpsc::channel::<()>();
    let wait_failed = std::sync::Mutex::new(wait_failed);
    let results = on_all(group(3, &opts), |c| {
        if c.rank() == 2 {
            // Never joins the collective. The bound only keeps a hang of the others from
            // hanging the test (they would then see this rank's connections close, too late).
            let rx = wait_failed.lock().expect("receiver");
            for _ in 0..2 {
                let _ = rx.recv_timeout(Duration::from_secs(60));
            }
            return None;
        }
        let start = Instant::now();
        let err = c
            .all_reduce_sum(&mut [1.0; 64])
            .expect_err("rank 2 never joins");
        let _ = failed.send(());
        Some((start.elapsed(), err))
    });
    let failures: Vec<_> = results.into_iter().flatten().collect();
    for (elapsed, err) in &failures {
        eprintln!("failed after {elapsed:?}: {err}");
        // Rank 2 stays 60 s: failing well before means the 500 ms I/O timeout fired (the bound
        // only catches a hang).
        assert!(
            *elapsed < Duration::from_secs(30),
            "took {elapsed:?}: {err}"
        );
    }
    // Nothing closes a connection before a rank fails, so the first failure is a timeout; the
    // other rank times out too or sees that rank close the group's connections.
    assert!(failures.iter().any(|(_, e)| e.is_timeout()), "{failures:?}");
}

#[test]
fn mismatched_lengths_are_a_protocol_error_not_a_hang() {
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_secs(2)),
        ..options()
    };
    let results = on_all(group(3, &opts), |c| {
        let start = Instant::now();
        let mut buf = vec![1.0f32; 10 + c.rank()];
        let res = c.all_reduce_sum(&mut buf);
        (start.elapsed(), res)
    });
    assert!(results
        .iter()
        .any(|(_, r)| matches!(r, Err(CollectiveError::Protocol { .. }))));
    for (elapsed, res) in results {
        assert!(res.is_err());
        // Only catches a hang.
        assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    }
}

#[test]
fn idle_follower_can_retry_a_broadcast_timeout() {
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_millis(200)),
        ..options()
    };
    // Set by the follower once its wait for the leader's next step timed out.
    let follower_timed_out = std::sync::atomic::AtomicBool::new(false);
    let results = on_all(group(2, &opts), |c| {
        if c.rank() == 0 {
            // The leader has nothing to do until the follower's I/O timeout fired (bounded,
            // only so a follower that never times out fails the test instead of hanging it).
            let start = Instant::now();
            while !follower_timed_out.load(std::sync::atomic::Ordering::SeqCst)
                && start.elapsed() < Duration::from_secs(60)
            {
                thread::sleep(Duration::from_millis(10));
            }
            let mut step = b"work".to_vec();
            c.broadcast(0, &mut step).expect("broadcast");
            return (0, step);
        }
        let mut timeouts = 0;
        loop {
            let mut step = Vec::new();
            match c.broadcast(0, &mut step) {
                Ok(()) => return (timeouts, step),
                Err(e) if e.is_timeout() && !c.is_broken() => {
                    timeouts += 1;
                    follower_timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    });
    assert!(
        results[1].0 >= 1,
        "the follower should have timed out while idle"
    );
    assert_eq!(results[1].1, b"work");
}

/// Addresses that nobody listens on yet: bound to learn free ports, then released.
fn free_addrs(world: usize) -> Vec<SocketAddr> {
    let (listeners, addrs) = bind_local(world).expect("bind");
    drop(listeners);
    addrs
}

#[test]
fn ranks_starting_500ms_apart_still_connect() {
    for order in [[0usize, 1, 2], [2, 1, 0]] {
        let addrs = free_addrs(3);
        let sums = thread::scope(|s| {
            let handles: Vec<_> = order
                .iter()
                .enumerate()
                .map(|(k, &rank)| {
                    let addrs = &addrs;
                    s.spawn(move || {
                        thread::sleep(Duration::from_millis(500 * k as u64));
                        let c = TcpCommunicator::connect(rank, 3, addrs, Duration::from_secs(20))
                            .expect("connect");
                        let mut buf = vec![rank as f32; 10];
                        c.all_reduce_sum(&mut buf).expect("all_reduce");
                        buf[0]
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<Vec<_>>()
        });
        assert_eq!(sums, vec![3.0; 3], "start order {order:?}");
    }
}

#[test]
fn world_size_mismatch_fails_at_connect() {
    let addrs = free_addrs(3);
    let timeout = Duration::from_secs(3);
    let start = Instant::now();
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| TcpCommunicator::connect(0, 2, &addrs[..2], timeout));
        let b = s.spawn(|| TcpCommunicator::connect(1, 3, &addrs, timeout));
        (a.join().expect("rank 0"), b.join().expect("rank 1"))
    });
    assert!(matches!(a, Err(CollectiveError::Handshake { .. })), "{a:?}");
    assert!(b.is_err());
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn missing_rank_times_out_at_connect() {
    let addrs = free_addrs(2);
    let start = Instant::now();
    let err = TcpCommunicator::connect(0, 2, &addrs, Duration::from_millis(500))
        .expect_err("rank 1 never starts");
    assert!(matches!(err, CollectiveError::AcceptTimeout { ref missing, .. } if missing == &[1]));
    let err = TcpCommunicator::connect(1, 2, &addrs, Duration::from_millis(500))
        .expect_err("rank 0 never starts");
    assert!(
        matches!(err, CollectiveError::Connect { peer: 0, .. }),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn single_rank_group_is_a_no_op() {
    let c = group(1, &options()).pop().expect("rank 0");
    let mut buf = vec![1.5f32; 10];
    c.all_reduce_sum(&mut buf).expect("all_reduce");
    assert_eq!(buf, vec![1.5; 10]);
    let mut data = b"x".to_vec();
    c.broadcast(0, &mut data).expect("broadcast");
    assert_eq!(data, b"x");
    c.barrier().expect("barrier");
    assert!(c.broadcast(1, &mut data).is_err());
}

#[test]
fn invalid_arguments_are_errors() {
    let addrs = free_addrs(2);
    let t = Duration::from_millis(100);
    assert!(matches!(
        TcpCommunicator::connect(2, 2, &addrs, t),
        Err(CollectiveError::InvalidArgument(_))
    ));
    assert!(matches!(
        TcpCommunicator::connect(0, 3, &addrs, t),
        Err(CollectiveError::InvalidArgument(_))
    ));
    assert!(matches!(
        TcpCommunicator::connect(0, 0, &[], t),
        Err(CollectiveError::InvalidArgument(_))
    ));
}

/// Rank 0's NCCL unique id reaches every rank over the TCP group (the rendezvous of groups
/// started with `--group-peers`); ids are made by a stand-in here, NCCL itself needs a GPU.
#[test]
fn nccl_unique_id_is_shared_from_rank_0() {
    use tandem_collective::{share_unique_id, NCCL_UNIQUE_ID_BYTES};
    let id: Vec<u8> = (0..NCCL_UNIQUE_ID_BYTES).map(|i| (255 - i) as u8).collect();
    let got = on_all(group(3, &options()), |c| {
        share_unique_id(&c, || {
            assert_eq!(c.rank(), 0, "only rank 0 creates the id");
            Ok(id.clone())
        })
    });
    for (rank, g) in got.into_iter().enumerate() {
        assert_eq!(g.expect("the id"), id, "rank {rank}");
    }
}

/// When rank 0 cannot create the id (no NCCL, a bad id), every rank fails at once with a
/// message that points at rank 0, instead of waiting out a timeout.
#[test]
fn a_failed_unique_id_fails_every_rank_at_once() {
    use tandem_collective::share_unique_id;
    let slow = TcpOptions {
        io_timeout: Some(Duration::from_secs(600)),
        ..options()
    };
    for make in [
        (|| Err(CollectiveError::Nccl("libnccl missing".into())))
            as fn() -> Result<Vec<u8>, CollectiveError>,
        || Ok(vec![1, 2, 3]),
    ] {
        let started = Instant::now();
        let got = on_all(group(3, &slow), |c| share_unique_id(&c, make));
        // Bounds only a hang (the I/O timeout is 600 s).
        assert!(started.elapsed() < Duration::from_secs(300));
        let e0 = got[0].as_ref().expect_err("rank 0 fails").to_string();
        assert!(
            e0.contains("libnccl missing") || e0.contains("128 bytes, got 3"),
            "{e0}"
        );
        for g in &got[1..] {
            let e = g.as_ref().expect_err("every rank fails").to_string();
            assert!(e.contains("rank 0 sent no NCCL unique id"), "{e}");
        }
    }
}
