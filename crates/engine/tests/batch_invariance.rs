//! Batch invariance on the real Qwen2.5-Coder-1.5B (Q4_K/Q6_K, as served): a request's tokens,
//! greedy or seeded sampling, are the same sent alone or among 15 others of mixed lengths
//! (chunked prefill beside other sequences' decoding), with n-gram speculation on or off, at
//! TP=1 and TP=2. Skipped when the weights are absent, unless TANDEM_REQUIRE_REAL_MODELS=1.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_collective::{Communicator, TcpCommunicator, TcpOptions};
use tandem_engine::{
    Engine, EngineConfig, Follower, Request, SamplingParams, SpecMode, Speculation, StopCriteria,
};
use tandem_model::{LoadOptions, Model, Shard};

const NEW_TOKENS: usize = 10;

fn model_path() -> Option<std::path::PathBuf> {
    tandem_testkit::real_model("qwen2.5-coder-1.5b-instruct.gguf", "qwen-1.5b")
}

fn load(path: &std::path::Path, shard: Option<Shard>) -> Model {
    let opts = LoadOptions {
        max_context: Some(1024),
        shard,
        ..Default::default()
    };
    Model::load(path, &opts).unwrap()
}

/// 16 requests: prompts from a few tokens to ~200, half greedy and half seeded sampling, half
/// with n-gram speculation (the cost model decides how much to draft, from timings).
fn requests(model: &Model) -> Vec<Request> {
    let texts = [
        "fn main() {",
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "SELECT * FROM users WHERE",
        "// A binary search over a sorted slice.\npub fn binary_search<T: Ord>(items: &[T], target: &T) -> Option<usize> {\n",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "#include <stdio.h>\n\nint main(void) {\n    for (int i = 0; i < 10; i++) {\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    ];
    let long = texts.join("\n\n");
    (0..16)
        .map(|i| {
            let text = if i % 5 == 4 {
                format!("{long}\n\n{}", texts[i % texts.len()])
            } else {
                texts[i % texts.len()].to_owned()
            };
            let prompt = model.text.encode(&text, false).unwrap();
            let sampling = if i % 2 == 0 {
                SamplingParams::default()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed: Some(1000 + i as u64),
                    ..Default::default()
                }
            };
            Request {
                prompt,
                sampling,
                stop: StopCriteria {
                    max_new_tokens: NEW_TOKENS,
                    ..Default::default()
                },
                ignore_eos: true,
                speculation: Speculation {
                    mode: if i % 4 < 2 {
                        SpecMode::Ngram
                    } else {
                        SpecMode::Off
                    },
                    ..Default::default()
                },
            }
        })
        .collect()
}

fn tokens(g: tandem_engine::Generation) -> Vec<u32> {
    g.collect_blocking()
        .unwrap()
        .0
        .into_iter()
        .map(|t| t.token)
        .collect()
}

/// Each request alone (speculation off), then all 16 at once; every output must match.
fn check(engine: &Engine, reqs: &[Request], label: &str) {
    let alone: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| {
            let plain = Request {
                speculation: Speculation {
                    mode: SpecMode::Off,
                    ..Default::default()
                },
                ..r.clone()
            };
            tokens(engine.submit(plain).unwrap())
        })
        .collect();
    let gens: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    let together: Vec<Vec<u32>> = gens.into_iter().map(tokens).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), NEW_TOKENS, "{label}: request {i} ended early");
        assert_eq!(
            a, t,
            "{label}: request {i} ({} prompt tokens, {}, speculation {:?}) differs alone vs among 16",
            reqs[i].prompt.len(),
            if reqs[i].sampling.is_greedy() { "greedy" } else { "seeded sampling" },
            reqs[i].speculation.mode
        );
    }
}

#[test]
fn sixteen_mixed_requests_equal_each_alone_tp1() {
    let Some(path) = model_path() else {
        return;
    };
    let model = load(&path, None);
    let reqs = requests(&model);
    let engine = Engine::start(model, EngineConfig::default());
    check(&engine, &reqs, "TP=1");
}

#[test]
fn sixteen_mixed_requests_equal_each_alone_tp2() {
    let Some(path) = model_path() else {
        return;
    };
    let opts = TcpOptions {
        io_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let mut comms: Vec<Arc<dyn Communicator>> = TcpCommunicator::local_group(2, &opts)
        .unwrap()
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let follower = {
        let path = path.clone();
        std::thread::spawn(move || {
            let m = load(&path, Some(Shard::new(c1.clone())));
            Follower::new(m.transformer, c1).run()
        })
    };
    let leader = load(&path, Some(Shard::new(c0.clone())));
    let reqs = requests(&leader);
    let engine = Engine::start_group(leader, EngineConfig::default(), c0);
    check(&engine, &reqs, "TP=2");
    assert!(engine.shutdown(Duration::from_secs(60)));
    follower.join().unwrap().unwrap();
}
