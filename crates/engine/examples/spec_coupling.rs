//! How often a sampled draft token is accepted, two ways, on a real target/draft pair:
//! - rejection sampling (accept x ~ q with probability min(1, p(x)/q(x))): Σ min(p, q) per
//!   position, exact;
//! - Gumbel coupling (what Tandem verifies with: the draft races q with the target's noise, the
//!   target accepts when its own race over p picks the same token): the share of noise seeds
//!   for which the two races agree, estimated over `--seeds` seeds per position.
//!
//! Both models are teacher-forced along texts (`--text`, or a built-in set), p and q taken at
//! every position under the same sampling settings (temperature, top-p).
//!
//!   cargo run --release -p tandem-engine --example spec_coupling -- \
//!       TARGET.gguf DRAFT.gguf [--temperature 0.8] [--top-p 0.95] [--seeds 400]
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use tandem_engine::sampling::race;
use tandem_engine::{Sampler, SamplingParams};
use tandem_model::{LoadOptions, Model, SeqInput};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: f64| -> f64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap())
    };
    let (Some(target), Some(draft)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: spec_coupling TARGET.gguf DRAFT.gguf [--temperature T] [--top-p P] [--seeds N]"
        );
        std::process::exit(2);
    };
    let params = SamplingParams {
        temperature: flag("--temperature", 0.8) as f32,
        top_p: flag("--top-p", 0.95) as f32,
        seed: Some(0),
        ..Default::default()
    };
    let seeds = flag("--seeds", 400.0) as u64;
    let opts = LoadOptions {
        max_context: Some(1024),
        ..Default::default()
    };
    let target = Model::load(std::path::Path::new(target), &opts).unwrap();
    let draft = Model::load(std::path::Path::new(draft), &opts).unwrap();
    // Fresh texts (none of them tuned on): code in several languages, prose, a list.
    let texts = [
        "<|im_start|>user\nWrite a Go function that merges two sorted slices of ints.<|im_end|>\n<|im_start|>assistant\n```go\nfunc merge(a, b []int) []int {\n\tout := make([]int, 0, len(a)+len(b))\n\ti, j := 0, 0\n\tfor i < len(a) && j < len(b) {\n\t\tif a[i] <= b[j] {\n\t\t\tout = append(out, a[i])\n\t\t\ti++\n\t\t} else {\n\t\t\tout = append(out, b[j])\n\t\t\tj++\n\t\t}\n\t}\n\treturn append(append(out, a[i:]...), b[j:]...)\n}\n```",
        "<|im_start|>user\nExplain what a hash map is in two sentences.<|im_end|>\n<|im_start|>assistant\nA hash map stores key-value pairs and uses a hash function to compute where each key lives, so lookups, inserts and deletes take constant time on average. Collisions, when two keys hash to the same slot, are resolved by chaining or open addressing.",
        "<|im_start|>user\nWrite a bash one-liner that counts lines in all .rs files.<|im_end|>\n<|im_start|>assistant\n```bash\nfind . -name '*.rs' -print0 | xargs -0 wc -l | tail -n 1\n```\nThis finds every Rust file, counts the lines of each, and prints the total.",
    ];
    let (mut n, mut rejection, mut coupling) = (0usize, 0f64, 0f64);
    for text in texts {
        let ids = target.text.encode(text, false).unwrap();
        let p_rows = logits(&target, &ids);
        let q_rows = logits(&draft, &ids);
        let sampler = Sampler::new(params.clone(), &[]);
        for (pos, (p_row, q_row)) in p_rows.iter().zip(&q_rows).enumerate().skip(8) {
            let p = sampler.distribution(p_row);
            let q = sampler.distribution(q_row);
            let q_of = |t: u32| q.iter().find(|e| e.0 == t).map_or(0.0, |e| f64::from(e.1));
            rejection += p
                .iter()
                .map(|&(t, pt)| f64::from(pt).min(q_of(t)))
                .sum::<f64>();
            let agree = (0..seeds)
                .filter(|&s| {
                    race(p.iter().copied(), s, pos as u64) == race(q.iter().copied(), s, pos as u64)
                })
                .count();
            coupling += agree as f64 / seeds as f64;
            n += 1;
        }
    }
    println!(
        "{n} positions, temperature {}, top-p {}: acceptance per drafted token: rejection sampling {:.3}, Gumbel coupling {:.3} (ratio {:.2})",
        params.temperature,
        params.top_p,
        rejection / n as f64,
        coupling / n as f64,
        coupling / rejection
    );
}

/// The logits after every prefix of `ids` (teacher forcing), one row per position.
fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = &model.transformer;
    let mut kv = t.new_cache();
    let slot = kv.allocate();
    t.forward(
        &mut kv,
        &[SeqInput {
            slot,
            tokens: ids,
            all_logits: true,
        }],
    )
    .unwrap()
    .to_vecs()
    .unwrap()
    .remove(0)
}
