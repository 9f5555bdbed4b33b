//! A tensor-parallel group in lockstep: the leader's engine broadcasts step plans, followers
//! (threads here, each its own rank over TCP on loopback) mirror them. Output equals TP=1's;
//! a follower that dies fails the group's requests with an error instead of hanging.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_collective::{Communicator, TcpCommunicator, TcpOptions};
use tandem_engine::{
    Engine, EngineConfig, EngineError, Follower, Request, SamplingParams, SpecMode, Speculation,
    StopCriteria,
};
use tandem_model::{LoadOptions, Model, Shard};
use tandem_testkit::{tiny_model, TinyConfig};

fn greedy(prompt: Vec<u32>, n: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_new_tokens: n,
            ..Default::default()
        },
        ignore_eos: true,
        speculation: Speculation::default(),
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6u32)
        .map(|i| {
            (0..(2 + 7 * i))
                .map(|j| (i * 13 + j * 5 + 3) % 300)
                .collect()
        })
        .collect()
}

fn run(e: &Engine, n: usize) -> Vec<Vec<u32>> {
    let gens: Vec<_> = prompts()
        .into_iter()
        .map(|p| e.submit(greedy(p, n)).unwrap())
        .collect();
    gens.into_iter()
        .map(|g| {
            g.collect_blocking()
                .unwrap()
                .0
                .into_iter()
                .map(|t| t.token)
                .collect()
        })
        .collect()
}

/// The group's socket timeout while it runs steps: far above a step's time on a loaded machine,
/// so only a dead or hung rank trips it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn cfg() -> TinyConfig {
    let mut c = TinyConfig::llama();
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c
}

/// A non-leader rank: its loaded shard and its communicator.
type Rank = (Model, Arc<dyn Communicator>);

/// Rank 0's engine and the other ranks.
fn group(dir: &std::path::Path, world: usize, io_timeout: Duration) -> (Engine, Vec<Rank>) {
    let opts = TcpOptions {
        io_timeout: Some(io_timeout),
        ..Default::default()
    };
    let comms = TcpCommunicator::local_group(world, &opts).unwrap();
    let mut ranks: Vec<Rank> = comms
        .into_iter()
        .map(|c| {
            let comm: Arc<dyn Communicator> = Arc::new(c);
            let model = Model::load(
                dir,
                &LoadOptions {
                    shard: Some(Shard::new(comm.clone())),
                    ..Default::default()
                },
            )
            .unwrap();
            (model, comm)
        })
        .collect();
    let (m0, c0) = ranks.remove(0);
    // Three n-gram candidates: speculative steps copy KV slots (mirrored by the followers).
    let cfg = EngineConfig {
        draft_candidates: 3,
        ..Default::default()
    };
    (Engine::start_group(m0, cfg, c0), ranks)
}

#[test]
fn group_of_two_equals_one_rank_and_stops_cleanly() {
    let tiny = tiny_model(&cfg()).unwrap();
    let single = Engine::start(
        Model::load(&tiny.dir, &LoadOptions::default()).unwrap(),
        EngineConfig::default(),
    );
    let want = run(&single, 20);

    let (leader, followers) = group(&tiny.dir, 2, IO_TIMEOUT);
    let handles: Vec<_> = followers
        .into_iter()
        .map(|(m, c)| std::thread::spawn(move || Follower::new(m.transformer, c).run()))
        .collect();
    assert_eq!(run(&leader, 20), want);
    // A second wave after an idle gap longer than the socket timeout: idle followers wait.
    std::thread::sleep(IO_TIMEOUT + Duration::from_millis(500));
    assert_eq!(run(&leader, 20), want);
    // Speculative greedy through the group: rejected drafts truncate every rank's KV (the
    // truncations travel in the step plan), and the tokens still equal TP=1 plain greedy.
    let gens: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            leader
                .submit(Request {
                    speculation: Speculation {
                        mode: SpecMode::Ngram,
                        max_draft_tokens: 5,
                        ..Default::default()
                    },
                    ..greedy(p, 20)
                })
                .unwrap()
        })
        .collect();
    let spec: Vec<Vec<u32>> = gens
        .into_iter()
        .map(|g| {
            g.collect_blocking()
                .unwrap()
                .0
                .into_iter()
                .map(|t| t.token)
                .collect()
        })
        .collect();
    assert_eq!(spec, want);
    drop(leader);
    for h in handles {
        h.join().unwrap().unwrap();
    }
}

#[test]
fn a_dead_follower_fails_the_group_fast() {
    let tiny = tiny_model(&cfg()).unwrap();
    // A long socket timeout: failing well before it means the leader saw the connection close.
    let io_timeout = Duration::from_secs(60);
    let (leader, mut followers) = group(&tiny.dir, 2, io_timeout);
    let (m, c) = followers.remove(0);
    // The follower runs the warm-up and a few steps, then dies (drops its connections).
    let h = std::thread::spawn(move || {
        let mut f = Follower::new(m.transformer, c);
        f.warm_up().unwrap();
        for _ in 0..3 {
            f.step().unwrap();
        }
    });
    let start = Instant::now();
    let g = leader.submit(greedy(vec![1, 2, 3], 200)).unwrap();
    let err = g.collect_blocking().err();
    h.join().unwrap();
    assert!(
        matches!(err, Some(EngineError::GroupFailed(_))),
        "expected GroupFailed, got {err:?}"
    );
    let took = start.elapsed();
    eprintln!("the group failed {took:?} after the request");
    assert!(took < io_timeout / 2, "took {took:?}");
    // From now on the replica refuses at once.
    let again = leader.submit(greedy(vec![1, 2, 3], 4)).err();
    assert!(
        matches!(again, Some(EngineError::GroupFailed(_))),
        "{again:?}"
    );
    assert!(leader
        .stats()
        .group_failed
        .load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn explicit_shutdown_ends_the_followers_while_other_handles_live() {
    let tiny = tiny_model(&cfg()).unwrap();
    let (leader, followers) = group(&tiny.dir, 2, IO_TIMEOUT);
    let handles: Vec<_> = followers
        .into_iter()
        .map(|(m, c)| std::thread::spawn(move || Follower::new(m.transformer, c).run()))
        .collect();
    // A clone held elsewhere (a server's, a stream's) must not keep the group alive.
    let other = leader.clone();
    let long = leader.submit(greedy(vec![1, 2, 3], 400)).unwrap();
    assert!(leader.shutdown(Duration::from_secs(30)));
    // The follower got the shutdown plan: a clean end, not a broken connection.
    for h in handles {
        h.join().unwrap().unwrap();
    }
    // What was still running is told, and later submissions find the engine stopped.
    let err = long.collect_blocking().err();
    assert!(matches!(err, Some(EngineError::Stopped)), "{err:?}");
    let again = other
        .submit(greedy(vec![1], 2))
        .and_then(|g| g.collect_blocking());
    assert!(matches!(again, Err(EngineError::Stopped)), "{again:?}");
}
