//! Tensor parallelism: ranks as threads of this process, each with its own TCP communicator on
//! 127.0.0.1 and its own shard of the model. Every rank must produce bit-identical logits, equal
//! to the unsharded (TP=1) model's within float tolerance.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_collective::{CollectiveError, Communicator, TcpCommunicator, TcpOptions};
use tandem_model::{ChatMessage, LoadOptions, Model, ModelError, SeqInput, Shard, Transformer};
use tandem_testkit::{tiny_model, Arch, TinyConfig};

mod common;
use common::greedy;

/// Loads `path` once per rank of a fresh `size`-rank group, runs `f` on every rank at once (one
/// thread each, as the collectives need) and returns the results in rank order.
fn on_ranks<T: Send>(
    path: &Path,
    opts: &LoadOptions,
    size: usize,
    f: impl Fn(&Model) -> T + Sync,
) -> Vec<T> {
    let options = TcpOptions {
        connect_timeout: Duration::from_secs(60),
        // Ranks load at their own pace on 2 shared cores; the first all-reduce waits for the
        // slowest loader.
        io_timeout: Some(Duration::from_secs(600)),
        ..TcpOptions::default()
    };
    let comms = TcpCommunicator::local_group(size, &options).unwrap();
    thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                let opts = LoadOptions {
                    shard: Some(Shard::new(Arc::new(comm))),
                    ..opts.clone()
                };
                s.spawn(move || f(&Model::load(path, &opts).unwrap()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

type Logits = Vec<Vec<Vec<Vec<f32>>>>;

/// Two sequences at different positions through prefill, mixed prefill/decode and batched
/// decode steps; every step's logits.
fn script(t: &Transformer) -> Logits {
    let mut kv = t.new_cache();
    let (a, b) = (kv.allocate(), kv.allocate());
    let steps: [Vec<(_, Vec<u32>, bool)>; 5] = [
        vec![(a, (10..30).collect(), true), (b, vec![5, 6, 7], false)],
        vec![(a, vec![42], false), (b, (100..111).collect(), true)],
        vec![(a, vec![43], false), (b, vec![200], false)],
        vec![(b, vec![201], true), (a, vec![44], true)],
        vec![(a, vec![45, 46, 47], true), (b, vec![202], false)],
    ];
    steps
        .iter()
        .map(|step| {
            let batch: Vec<SeqInput> = step
                .iter()
                .map(|(slot, tokens, all)| SeqInput {
                    slot: *slot,
                    tokens,
                    all_logits: *all,
                })
                .collect();
            t.forward(&mut kv, &batch).unwrap().to_vecs().unwrap()
        })
        .collect()
}

fn flat(l: &Logits) -> Vec<f32> {
    l.iter().flatten().flatten().flatten().copied().collect()
}

fn tiny(arch: Arch, heads: usize, kv_heads: usize) -> TinyConfig {
    let base = match arch {
        Arch::Llama => TinyConfig::llama(),
        Arch::Qwen2 => TinyConfig::qwen2(),
    };
    TinyConfig {
        hidden_size: 96,
        intermediate_size: 192,
        num_heads: heads,
        num_kv_heads: kv_heads,
        ..base
    }
}

/// For each (heads, KV heads, TP size): every rank's logits bit-identical to rank 0's, and rank
/// 0's within 1e-4 of TP=1.
fn check_logits(arch: Arch) {
    for (heads, kv_heads, sizes) in [(12, 6, &[2, 3][..]), (6, 3, &[3][..])] {
        let m = tiny_model(&tiny(arch, heads, kv_heads)).unwrap();
        let opts = LoadOptions::default();
        let reference = script(&Model::load(&m.dir, &opts).unwrap().transformer);
        for &size in sizes {
            let what = format!("{arch:?} heads {heads}/{kv_heads} TP={size}");
            let ranks = on_ranks(&m.dir, &opts, size, |m| script(&m.transformer));
            for (r, l) in ranks.iter().enumerate().skip(1) {
                assert!(
                    flat(l) == flat(&ranks[0]),
                    "{what}: rank {r}'s logits differ from rank 0's"
                );
            }
            let (got, want) = (flat(&ranks[0]), flat(&reference));
            assert_eq!(got.len(), want.len(), "{what}");
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            eprintln!("{what}: max |logit diff| vs TP=1 = {diff:e}");
            assert!(diff < 1e-4, "{what}: max logit diff {diff}");
        }
    }
}

#[test]
fn llama_tp_logits_match_tp1() {
    check_logits(Arch::Llama);
}

#[test]
fn qwen2_tp_logits_match_tp1() {
    check_logits(Arch::Qwen2);
}

#[test]
fn tp_greedy_matches_tp1() {
    for arch in [Arch::Llama, Arch::Qwen2] {
        let m = tiny_model(&tiny(arch, 6, 6)).unwrap();
        let opts = LoadOptions::default();
        let prompt: Vec<u32> = "The quick brown fox".bytes().map(u32::from).collect();
        let want = greedy(&Model::load(&m.dir, &opts).unwrap(), &prompt, 16);
        for size in [2, 3] {
            for (r, got) in on_ranks(&m.dir, &opts, size, |m| greedy(m, &prompt, 16))
                .into_iter()
                .enumerate()
            {
                assert_eq!(got, want, "{arch:?} TP={size} rank {r}");
            }
        }
    }
}

/// Only rank and size matter for validation, which runs before any collective.
struct FakeRank {
    rank: usize,
    size: usize,
}

impl Communicator for FakeRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Err(CollectiveError::InvalidArgument("fake communicator".into()))
    }
    fn broadcast(&self, _: usize, _: &mut Vec<u8>) -> Result<(), CollectiveError> {
        Err(CollectiveError::InvalidArgument("fake communicator".into()))
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Err(CollectiveError::InvalidArgument("fake communicator".into()))
    }
}

fn load_err(cfg: &TinyConfig, size: usize) -> String {
    let m = tiny_model(cfg).unwrap();
    let opts = LoadOptions {
        shard: Some(Shard::new(Arc::new(FakeRank { rank: 0, size }))),
        ..LoadOptions::default()
    };
    match Model::load(&m.dir, &opts) {
        Ok(_) => panic!("{cfg:?} loaded at TP={size}"),
        Err(e @ ModelError::TensorParallel(_)) => e.to_string(),
        Err(e) => panic!("wrong error: {e}"),
    }
}

#[test]
fn tp_rejects_sizes_that_do_not_divide_the_model() {
    let e = load_err(&tiny(Arch::Llama, 6, 3), 2);
    assert!(
        e.contains("num_key_value_heads 3 is not divisible by tensor-parallel size 2"),
        "{e}"
    );
    let e = load_err(&tiny(Arch::Qwen2, 6, 6), 4);
    assert!(
        e.contains("num_attention_heads 6 is not divisible by tensor-parallel size 4"),
        "{e}"
    );
    let cfg = TinyConfig {
        intermediate_size: 200,
        ..tiny(Arch::Llama, 6, 6)
    };
    let e = load_err(&cfg, 3);
    assert!(
        e.contains("intermediate_size 200 is not divisible by tensor-parallel size 3"),
        "{e}"
    );
}

/// Bytes of block weights and KV cache per rank, after one forward in one slot.
fn footprint(t: &Transformer) -> (usize, usize, usize) {
    let mut kv = t.new_cache();
    let slot = kv.allocate();
    let tokens: Vec<u32> = (0..40).collect();
    t.forward(
        &mut kv,
        &[SeqInput {
            slot,
            tokens: &tokens,
            all_logits: false,
        }],
    )
    .unwrap();
    (
        t.sharded_weight_bytes(),
        t.weight_bytes(),
        kv.bytes_reserved(),
    )
}

#[test]
fn tp_rank_holds_its_share_of_layers_and_kv() {
    let m = tiny_model(&tiny(Arch::Qwen2, 6, 6)).unwrap();
    let opts = LoadOptions::default();
    let (layers, total, kv) = footprint(&Model::load(&m.dir, &opts).unwrap().transformer);
    for size in [2, 3] {
        for (r, (l, t, k)) in on_ranks(&m.dir, &opts, size, |m| footprint(&m.transformer))
            .into_iter()
            .enumerate()
        {
            // Column slices split q/k/v biases too; the row-parallel layers have none.
            assert_eq!(l * size, layers, "TP={size} rank {r}: layer weights");
            assert_eq!(k * size, kv, "TP={size} rank {r}: KV cache");
            // Norms stay whole on every rank; embedding and LM head are split by vocabulary
            // when it divides (304 tokens: over 2 ranks yes, over 3 no).
            let c = &m.config;
            let norms = (2 * c.num_layers + 1) * c.hidden_size * 4;
            let vocab_tables = total - layers - norms;
            let want = if tandem_testkit::VOCAB_SIZE.is_multiple_of(size) {
                vocab_tables / size
            } else {
                vocab_tables
            };
            assert_eq!(t - l - norms, want, "TP={size} rank {r}: vocabulary tables");
        }
    }
}

/// SmolLM2 (9 heads, 3 KV heads, intermediate 1536) split three ways, quantized: the same greedy
/// answer as the whole model, with a third of the block weights per rank.
#[test]
fn smollm2_tp3_answers_like_tp1() {
    let Some(path) = tandem_testkit::real_smollm2() else {
        return;
    };
    let opts = LoadOptions {
        max_context: Some(512),
        ..LoadOptions::default()
    };
    let chat = [
        ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    let run = |m: &Model| {
        let prompt = m.text.apply_chat_template(&chat).unwrap();
        let ids = m.text.encode(&prompt, false).unwrap();
        (
            greedy(m, &ids, 20),
            m.transformer.sharded_weight_bytes(),
            m.transformer.is_quantized(),
        )
    };
    let whole = Model::load(&path, &opts).unwrap();
    let (want, layers, quantized) = run(&whole);
    assert!(quantized);
    let text = whole.text.decode(&want).unwrap();
    eprintln!("TP=1: {text:?}");
    assert!(text.contains("Paris"), "{text:?}");
    drop(whole);
    for (r, (got, l, q)) in on_ranks(&path, &opts, 3, run).into_iter().enumerate() {
        assert!(q, "rank {r} not quantized");
        assert_eq!(got, want, "rank {r}");
        // Every block slice falls on quantization-block boundaries here, so the split is exact.
        assert_eq!(l * 3, layers, "rank {r}: layer weights");
    }
}
