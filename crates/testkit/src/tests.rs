use super::*;
use candle_core::{DType, D};
use std::str::FromStr;

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

#[test]
fn same_seed_gives_identical_files() {
    for cfg in [TinyConfig::llama(), TinyConfig::qwen2()] {
        let a = tiny_model(&cfg).unwrap();
        let b = tiny_model(&cfg).unwrap();
        assert_ne!(a.dir, b.dir);
        for f in FILES {
            let x = std::fs::read(a.dir.join(f)).unwrap();
            let y = std::fs::read(b.dir.join(f)).unwrap();
            assert!(!x.is_empty(), "{f} is empty");
            assert!(x == y, "{f} differs between two writes of the same config");
        }
    }
}

#[test]
fn other_seed_gives_other_weights_only() {
    let a = tiny_model(&TinyConfig::llama()).unwrap();
    let b = tiny_model(&TinyConfig::llama().with_seed(42)).unwrap();
    for f in FILES {
        let same = std::fs::read(a.dir.join(f)).unwrap() == std::fs::read(b.dir.join(f)).unwrap();
        assert_eq!(same, f != "model.safetensors", "{f}");
    }
}

#[test]
fn temp_dir_lives_as_long_as_the_model() {
    let m = tiny_model(&TinyConfig::qwen2()).unwrap();
    let dir = m.dir.clone();
    assert!(m.weights_path().exists() && m.config_path().exists());
    drop(m);
    assert!(!dir.exists());

    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("nested/model");
    let m = tiny_model_in(&TinyConfig::llama(), &sub).unwrap();
    drop(m);
    for f in FILES {
        assert!(sub.join(f).exists(), "{f}");
    }
}

#[test]
fn config_json_is_hf_shaped() {
    let m = tiny_model(&TinyConfig::llama()).unwrap();
    let c = read_json(&m.config_path());
    assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 64);
    assert_eq!(c["intermediate_size"], 128);
    assert_eq!(c["num_hidden_layers"], 2);
    assert_eq!(c["num_attention_heads"], 4);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["max_position_embeddings"], 512);
    assert_eq!(c["vocab_size"], VOCAB_SIZE);
    assert_eq!(m.vocab_size, VOCAB_SIZE);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["torch_dtype"], "float32");
    assert_eq!(c["hidden_act"], "silu");
    assert_eq!(c["bos_token_id"], BOS_TOKEN_ID);
    assert_eq!(c["eos_token_id"], IM_END_ID);
    assert_eq!(c["rope_theta"].as_f64(), Some(500_000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(
        c["rope_scaling"],
        json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
               "high_freq_factor":4.0,"original_max_position_embeddings":64})
    );

    let m = tiny_model(&TinyConfig::qwen2()).unwrap();
    let c = read_json(&m.config_path());
    assert_eq!(c["architectures"], json!(["Qwen2ForCausalLM"]));
    assert_eq!(c["model_type"], "qwen2");
    assert_eq!(c["tie_word_embeddings"], false);
    assert!(c["rope_scaling"].is_null());

    let g = read_json(&m.dir.join("generation_config.json"));
    assert_eq!(g["eos_token_id"], json!([IM_END_ID, ENDOFTEXT_ID]));
}

#[test]
fn safetensors_hold_every_tensor_in_hf_names_and_shapes() {
    for cfg in [TinyConfig::llama(), TinyConfig::qwen2()] {
        let m = tiny_model(&cfg).unwrap();
        let w = candle_core::safetensors::load(m.weights_path(), &Device::Cpu).unwrap();
        let expected = cfg.tensor_shapes();
        assert_eq!(w.len(), expected.len());
        for (name, shape) in &expected {
            let t = w.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.dims(), shape.as_slice(), "{name}");
            assert_eq!(t.dtype(), DType::F32, "{name}");
        }
        let has = |n: &str| w.contains_key(n);
        assert_eq!(has("lm_head.weight"), !cfg.tie_word_embeddings);
        assert_eq!(
            has("model.layers.1.self_attn.k_proj.bias"),
            cfg.arch == Arch::Qwen2
        );
        assert!(!has("model.layers.0.self_attn.o_proj.bias"));
        assert!(has("model.layers.1.mlp.down_proj.weight"));
        assert_eq!(
            w["model.layers.0.self_attn.k_proj.weight"].dims(),
            [2 * 16, 64]
        );
        assert_eq!(w["model.layers.0.mlp.down_proj.weight"].dims(), [64, 128]);
        assert_eq!(w["model.embed_tokens.weight"].dims(), [VOCAB_SIZE, 64]);

        // Norm weights are near 1, the rest centred on 0 with the intended scale.
        let norm = w["model.norm.weight"].to_vec1::<f32>().unwrap();
        assert!(norm.iter().all(|v| (v - 1.0).abs() < 0.15), "{norm:?}");
        let std = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
            (v.iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt()
        };
        let s = std(&w["model.layers.0.mlp.down_proj.weight"]);
        assert!((s - 1.0 / 128f64.sqrt()).abs() < 0.01, "down_proj std {s}");
        let s = std(&w["model.embed_tokens.weight"]);
        let want = if cfg.tie_word_embeddings {
            LM_HEAD_GAIN / 8.0
        } else {
            EMBED_STD
        };
        assert!((s - want).abs() < 0.05 * want, "embed std {s}");
    }
}

#[test]
fn layers_do_not_share_weights_and_tensors_are_independent_of_layer_count() {
    let cfg = TinyConfig::qwen2();
    let w = cfg.weights().unwrap();
    let a = w["model.layers.0.self_attn.q_proj.weight"]
        .to_vec2::<f32>()
        .unwrap();
    let b = w["model.layers.1.self_attn.q_proj.weight"]
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(a, b);
    let mut deeper = cfg.clone();
    deeper.num_layers = 3;
    let w3 = deeper.weights().unwrap();
    let a3 = w3["model.layers.0.self_attn.q_proj.weight"]
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, a3);
}

#[test]
fn invalid_configs_are_refused() {
    let mut c = TinyConfig::llama();
    c.num_kv_heads = 3;
    assert!(tiny_model(&c).is_err());
    let mut c = TinyConfig::llama();
    c.hidden_size = 66;
    assert!(tiny_model(&c).is_err());
    let mut c = TinyConfig::qwen2();
    c.num_layers = 0;
    assert!(tiny_model(&c).is_err());
}

#[test]
fn tokenizer_files_load_and_template_is_chatml() {
    let m = tiny_model(&TinyConfig::qwen2()).unwrap();
    let t = tokenizers::Tokenizer::from_file(m.tokenizer_path()).unwrap();
    assert_eq!(t.get_vocab_size(true), m.vocab_size);
    assert_eq!(t.token_to_id("<|im_end|>"), Some(EOS_TOKEN_ID));
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(BOS_TOKEN_ID));
    assert_eq!(
        tokenizers::Tokenizer::from_str(&tokenizer_json())
            .unwrap()
            .get_vocab_size(true),
        VOCAB_SIZE
    );

    let tc = read_json(&m.dir.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|endoftext|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
    let tpl = tc["chat_template"].as_str().unwrap();
    assert!(tpl.contains("'<|im_start|>' + message['role'] + '\\n'"));
    assert!(tpl.contains("{{ '<|im_start|>assistant\\n' }}"));
}

// ---- a plain reference forward, to check the weights give a usable distribution ----

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let inv = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
}

fn linear(x: &Tensor, w: &HashMap<String, Tensor>, name: &str) -> Tensor {
    let y = x
        .matmul(&w[&format!("{name}.weight")].t().unwrap())
        .unwrap();
    match w.get(&format!("{name}.bias")) {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    }
}

fn softmax_last(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(D::Minus1).unwrap();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    let s = e.sum_keepdim(D::Minus1).unwrap();
    e.broadcast_div(&s).unwrap()
}

/// Non-interleaved (HF "rotate_half") RoPE on [heads, T, hd], without rope scaling.
fn rope(x: &Tensor, theta: f64) -> Tensor {
    let (_, t, hd) = x.dims3().unwrap();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for j in 0..half {
            let a = p as f64 * theta.powf(-((2 * j) as f64) / hd as f64);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (t, half), &Device::Cpu).unwrap();
    let x1 = x.narrow(2, 0, half).unwrap();
    let x2 = x.narrow(2, half, half).unwrap();
    let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
    let r2 = (x1.broadcast_mul(&sin).unwrap() + x2.broadcast_mul(&cos).unwrap()).unwrap();
    Tensor::cat(&[r1, r2], 2).unwrap()
}

/// Logits [T, vocab] for one sequence.
fn forward(cfg: &TinyConfig, w: &HashMap<String, Tensor>, ids: &[u32]) -> Tensor {
    let t = ids.len();
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
    let idx = Tensor::new(ids, &Device::Cpu).unwrap();
    let mut x = w["model.embed_tokens.weight"]
        .index_select(&idx, 0)
        .unwrap();
    let kv_of: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
    let kv_of = Tensor::new(kv_of.as_slice(), &Device::Cpu).unwrap();
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let heads = |y: Tensor, n: usize| {
        y.reshape((t, n, hd))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let h = rms_norm(
            &x,
            &w[&format!("{p}.input_layernorm.weight")],
            cfg.rms_norm_eps,
        );
        let q = rope(
            &heads(linear(&h, w, &format!("{p}.self_attn.q_proj")), nh),
            cfg.rope_theta,
        );
        let k = rope(
            &heads(linear(&h, w, &format!("{p}.self_attn.k_proj")), nkv),
            cfg.rope_theta,
        );
        let v = heads(linear(&h, w, &format!("{p}.self_attn.v_proj")), nkv);
        let k = k.index_select(&kv_of, 0).unwrap();
        let v = v.index_select(&kv_of, 0).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let att = softmax_last(&att.broadcast_add(&mask).unwrap());
        let o = att.matmul(&v).unwrap().transpose(0, 1).unwrap();
        let o = o.contiguous().unwrap().reshape((t, nh * hd)).unwrap();
        x = (x + linear(&o, w, &format!("{p}.self_attn.o_proj"))).unwrap();
        let h = rms_norm(
            &x,
            &w[&format!("{p}.post_attention_layernorm.weight")],
            cfg.rms_norm_eps,
        );
        let g = linear(&h, w, &format!("{p}.mlp.gate_proj")).silu().unwrap();
        let u = linear(&h, w, &format!("{p}.mlp.up_proj"));
        x = (x + linear(&(g * u).unwrap(), w, &format!("{p}.mlp.down_proj"))).unwrap();
    }
    let x = rms_norm(&x, &w["model.norm.weight"], cfg.rms_norm_eps);
    let head = w
        .get("lm_head.weight")
        .unwrap_or(&w["model.embed_tokens.weight"]);
    x.matmul(&head.t().unwrap()).unwrap()
}

#[test]
fn next_token_distributions_are_peaked_but_not_degenerate() {
    let tok = tokenizers::Tokenizer::from_str(&tokenizer_json()).unwrap();
    let prompts = [
        "the cat and the dog",
        "Hello, world! How are you?",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "1 2 3 4 5 6 7 8",
    ];
    let uniform = (VOCAB_SIZE as f64).ln();
    for cfg in [
        TinyConfig::llama(),
        TinyConfig::qwen2(),
        TinyConfig::llama().with_seed(9),
        TinyConfig::qwen2().with_seed(9),
    ] {
        let w = cfg.weights().unwrap();
        let (mut ent, mut top1, mut repeat, mut n) = (0.0, 0.0, 0usize, 0usize);
        let mut argmaxes = std::collections::HashSet::new();
        for prompt in prompts {
            let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
            let probs = softmax_last(&forward(&cfg, &w, &ids))
                .to_vec2::<f32>()
                .unwrap();
            for (pos, row) in probs.iter().enumerate() {
                let h: f64 = row
                    .iter()
                    .filter(|&&p| p > 0.0)
                    .map(|&p| -f64::from(p) * f64::from(p).ln())
                    .sum();
                let (am, &pmax) = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap();
                ent += h;
                top1 += f64::from(pmax);
                repeat += usize::from(am as u32 == ids[pos]);
                argmaxes.insert(am);
                n += 1;
            }
        }
        let (ent, top1) = (ent / n as f64, top1 / n as f64);
        let repeat = repeat as f64 / n as f64;
        eprintln!(
            "{:?} seed {}: mean entropy {ent:.2} nats (uniform {uniform:.2}), mean top-1 {top1:.2}, \
             argmax repeats input {repeat:.2}, {} distinct argmaxes over {n} positions",
            cfg.arch,
            cfg.seed,
            argmaxes.len()
        );
        assert!(ent < 0.6 * uniform, "too flat: {ent}");
        assert!(ent > 0.15 * uniform, "too peaked: {ent}");
        assert!(top1 < 0.9, "argmax almost certain: {top1}");
        assert!(repeat < 0.5, "mostly repeats its input: {repeat}");
        assert!(argmaxes.len() > n / 4, "argmax barely depends on context");
    }
}
