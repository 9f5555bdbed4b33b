#!/usr/bin/env python3
"""Independent float64 NumPy reference of the Llama / Qwen2 decoder forward pass.

Written from the published equations (Llama, Llama 3.1 RoPE scaling, Qwen2) and the
Hugging Face config semantics; only numpy and the standard library are used.

    python3 tests/reference/transformer_ref.py MODEL_DIR --ids 1,2,3[;4,5,...]
        -> stdout: {"logits": [[[vocab floats] per position] per sequence]}
    python3 tests/reference/transformer_ref.py --selftest

Importable: forward(model_dir, ids) -> np.ndarray [T, vocab] (float64).
"""

import argparse
import json
import math
import mmap
import os
import struct
import sys
import tempfile

import numpy as np

# --------------------------------------------------------------------------------------
# safetensors: u64 LE header length N | N bytes JSON header | raw little-endian data.
# Header maps name -> {dtype, shape, data_offsets: [begin, end]} (relative to data block).
# --------------------------------------------------------------------------------------

_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def _decode(raw, dtype, shape):
    """Raw bytes -> float64 array."""
    if dtype == "BF16":
        # bfloat16 is the upper 16 bits of an IEEE float32.
        u16 = np.frombuffer(raw, dtype="<u2")
        arr = (u16.astype(np.uint32) << 16).view(np.float32)
    elif dtype in _NP_DTYPES:
        arr = np.frombuffer(raw, dtype=_NP_DTYPES[dtype])
    else:
        raise ValueError(f"unsupported safetensors dtype {dtype}")
    return arr.astype(np.float64).reshape(shape)


class SafetensorsFile:
    def __init__(self, path):
        self._f = open(path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self._mm[:8])
        header = json.loads(self._mm[8 : 8 + n].decode("utf-8"))
        header.pop("__metadata__", None)
        self.entries = header
        self.data_start = 8 + n

    def get(self, name):
        e = self.entries[name]
        begin, end = e["data_offsets"]
        raw = self._mm[self.data_start + begin : self.data_start + end]
        return _decode(raw, e["dtype"], e["shape"])


class Weights:
    """Lazy name -> float64 tensor lookup over a single or sharded checkpoint."""

    def __init__(self, model_dir):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(model_dir, fn)) for fn in set(weight_map.values())}
            self._where = {name: files[fn] for name, fn in weight_map.items()}
        else:
            st = SafetensorsFile(os.path.join(model_dir, "model.safetensors"))
            self._where = {name: st for name in st.entries}

    def __contains__(self, name):
        return name in self._where

    def __getitem__(self, name):
        return self._where[name].get(name)

    def opt(self, name):
        return self[name] if name in self else None


def write_safetensors(path, tensors, dtype="F32"):
    """Write {name: ndarray} as safetensors (used by the selftest). dtype per file or per name."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        dt = dtype[name] if isinstance(dtype, dict) else dtype
        a = np.ascontiguousarray(arr)
        if dt == "BF16":
            raw = (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()  # truncate
        else:
            raw = a.astype(_NP_DTYPES[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # pad header to 8-byte alignment (allowed by the format)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or [""])[0]
    mt = cfg.get("model_type", "")
    if arch not in ("LlamaForCausalLM", "Qwen2ForCausalLM") and mt not in ("llama", "qwen2"):
        raise ValueError(f"unsupported architecture {arch!r} / model_type {mt!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}")
    return cfg


def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# --------------------------------------------------------------------------------------
# RoPE frequencies
#   inv_freq[i] = 1 / theta^(2i / d),  i = 0 .. d/2-1
#   "linear":  inv_freq /= factor            (same as positions / factor)
#   "llama3":  wavelen = 2*pi / inv_freq;  L = original_max_position_embeddings
#              wavelen < L/high_freq_factor  -> keep
#              wavelen > L/low_freq_factor   -> inv_freq / factor
#              otherwise smooth = (L/wavelen - low) / (high - low)
#                        inv = (1 - smooth) * inv/factor + smooth * inv
# --------------------------------------------------------------------------------------


def rope_inv_freq(cfg):
    d = head_dim_of(cfg)
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        L = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (L / wavelen - lo) / (hi - lo)
        medium = (1 - smooth) * inv / factor + smooth * inv
        return np.where(wavelen < L / hi, inv, np.where(wavelen > L / lo, inv / factor, medium))
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def apply_rope(x, positions, inv_freq):
    """x: [H, T, d]. rotate_half convention, pairs (i, i + d/2):
    out = x * cos + rotate_half(x) * sin, rotate_half([a, b]) = [-b, a]."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, d/2]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)  # [T, d]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def rms_norm(x, w, eps):
    # y = x / sqrt(mean(x^2) + eps) * w
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def linear(x, W, b=None):
    # y = x @ W^T + b     (W: [out, in], HF nn.Linear layout)
    y = x @ W.T
    return y if b is None else y + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _check_sliding_window(cfg, T):
    if cfg.get("use_sliding_window") and cfg.get("sliding_window") and T > cfg["sliding_window"]:
        raise NotImplementedError("Qwen2 sliding-window attention is not implemented")


def _proj(w, p, name):
    return w[f"{p}.{name}.weight"], w.opt(f"{p}.{name}.bias")


# --------------------------------------------------------------------------------------
# Forward pass (vectorised over heads and positions)
# --------------------------------------------------------------------------------------


def attention(x, w, p, cfg, inv_freq):
    """Causal GQA self-attention. x: [T, hidden]."""
    T = x.shape[0]
    H, KV, d = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim_of(cfg)
    q = linear(x, *_proj(w, p, "q_proj")).reshape(T, H, d).transpose(1, 0, 2)  # [H, T, d]
    k = linear(x, *_proj(w, p, "k_proj")).reshape(T, KV, d).transpose(1, 0, 2)  # [KV, T, d]
    v = linear(x, *_proj(w, p, "v_proj")).reshape(T, KV, d).transpose(1, 0, 2)
    pos = np.arange(T)
    q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
    # GQA: query head h uses kv head h // (H / KV)
    k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)
    # scores = q k^T / sqrt(d), causal mask (key j > query i -> -inf), softmax over keys
    s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    o = softmax(s) @ v  # [H, T, d]
    o = o.transpose(1, 0, 2).reshape(T, H * d)
    return linear(o, *_proj(w, p, "o_proj"))


def mlp(x, w, p):
    # down( silu(gate(x)) * up(x) )
    g = linear(x, *_proj(w, p, "gate_proj"))
    u = linear(x, *_proj(w, p, "up_proj"))
    return linear(silu(g) * u, *_proj(w, p, "down_proj"))


def lm_head_weight(w, cfg):
    if cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in w:
        return w["model.embed_tokens.weight"]
    return w["lm_head.weight"]


def forward_loaded(w, cfg, ids, attn=attention):
    ids = np.asarray(ids, dtype=np.int64)
    _check_sliding_window(cfg, len(ids))
    eps = cfg.get("rms_norm_eps", 1e-6)
    inv_freq = rope_inv_freq(cfg)
    x = w["model.embed_tokens.weight"][ids]  # [T, hidden]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        # pre-norm residual blocks
        x = x + attn(rms_norm(x, w[f"{p}.input_layernorm.weight"], eps), w, f"{p}.self_attn", cfg, inv_freq)
        x = x + mlp(rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], eps), w, f"{p}.mlp")
    x = rms_norm(x, w["model.norm.weight"], eps)
    return x @ lm_head_weight(w, cfg).T  # [T, vocab]


def forward(model_dir, ids):
    """Logits [T, vocab] (float64) for one token sequence."""
    return forward_loaded(Weights(model_dir), load_config(model_dir), ids)


# --------------------------------------------------------------------------------------
# Selftest: second, loop-based attention + tiny random checkpoints
# --------------------------------------------------------------------------------------


def attention_loops(x, w, p, cfg, inv_freq):
    """Straightforward per-head, per-position attention; RoPE as explicit 2D rotations."""
    T = x.shape[0]
    H, KV, d = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim_of(cfg)
    q, k, v = (linear(x, *_proj(w, p, n)) for n in ("q_proj", "k_proj", "v_proj"))

    def rope(vec, t):
        out = vec.copy()
        for i in range(d // 2):
            c, s = math.cos(t * inv_freq[i]), math.sin(t * inv_freq[i])
            a, b = vec[i], vec[i + d // 2]
            out[i], out[i + d // 2] = a * c - b * s, b * c + a * s
        return out

    out = np.zeros((T, H * d))
    for h in range(H):
        g = h // (H // KV)
        for t in range(T):
            qt = rope(q[t, h * d : (h + 1) * d], t)
            scores = [qt @ rope(k[j, g * d : (g + 1) * d], j) / math.sqrt(d) for j in range(t + 1)]
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            z = sum(e)
            for j in range(t + 1):
                out[t, h * d : (h + 1) * d] += e[j] / z * v[j, g * d : (g + 1) * d]
    return linear(out, *_proj(w, p, "o_proj"))


def _tiny_model(folder, cfg, rng, bias, dtypes, shard):
    hd, d, V, I = cfg["hidden_size"], head_dim_of(cfg), cfg["vocab_size"], cfg["intermediate_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    r = lambda *s: rng.standard_normal(s) * 0.3
    t = {"model.embed_tokens.weight": r(V, hd), "model.norm.weight": 1 + r(hd)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = r(V, hd)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + r(hd)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + r(hd)
        for n, o in (("q", H * d), ("k", KV * d), ("v", KV * d)):
            t[f"{p}.self_attn.{n}_proj.weight"] = r(o, hd)
            if bias:
                t[f"{p}.self_attn.{n}_proj.bias"] = r(o)
        t[f"{p}.self_attn.o_proj.weight"] = r(hd, H * d)
        t[f"{p}.mlp.gate_proj.weight"] = r(I, hd)
        t[f"{p}.mlp.up_proj.weight"] = r(I, hd)
        t[f"{p}.mlp.down_proj.weight"] = r(hd, I)
    dt = {n: dtypes[j % len(dtypes)] for j, n in enumerate(t)}
    if shard:
        names = list(t)
        parts = [names[: len(names) // 2], names[len(names) // 2 :]]
        wm = {}
        for j, part in enumerate(parts):
            fn = f"model-{j + 1:05d}-of-{len(parts):05d}.safetensors"
            write_safetensors(os.path.join(folder, fn), {n: t[n] for n in part}, {n: dt[n] for n in part})
            wm.update({n: fn for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
    else:
        write_safetensors(os.path.join(folder, "model.safetensors"), t, dt)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return t


def selftest():
    rng = np.random.default_rng(0)
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=50, rms_norm_eps=1e-5, hidden_act="silu")
    cases = [
        ("llama GQA + llama3 rope + tied + BF16/F16/F32", dict(base, architectures=["LlamaForCausalLM"], model_type="llama",
         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64)),  # wavelens 6, 63, 628, 6283: all 3 branches
         False, ["BF16", "F16", "F32"], False),
        ("qwen2 biases + linear rope + sharded", dict(base, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
         num_attention_heads=4, num_key_value_heads=1, rope_theta=1000000.0, tie_word_embeddings=False,
         rope_scaling=dict(type="linear", factor=2.0)), True, ["F32"], True),
    ]
    ids = [3, 17, 5, 42, 0, 9, 31, 8]
    # llama3 rope scaling vs a scalar transcription of the Llama 3.1 apply_scaling (8B settings)
    c31 = dict(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
    want = []
    for f in 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128):
        wl = 2 * math.pi / f
        if wl < 8192 / 4:
            want.append(f)
        elif wl > 8192 / 1:
            want.append(f / 8)
        else:
            sm = (8192 / wl - 1) / (4 - 1)
            want.append((1 - sm) * f / 8 + sm * f)
    rope_err = np.max(np.abs(rope_inv_freq(c31) - np.array(want)) / np.array(want))
    ok = rope_err < 1e-14
    print(f"[{'ok' if ok else 'FAIL'}] llama3 rope scaling vs scalar Llama 3.1 rule: rel_err={rope_err:.1e}")
    for name, cfg, bias, dtypes, shard in cases:
        with tempfile.TemporaryDirectory() as folder:
            t = _tiny_model(folder, cfg, rng, bias, dtypes, shard)
            w = Weights(folder)
            # parser round trip (BF16 is truncated on write, so compare against that)
            emb = t["model.embed_tokens.weight"]
            dt0 = dtypes[0]
            exp = {"BF16": (emb.astype("<f4").view("<u4") & 0xFFFF0000).view("<f4"), "F16": emb.astype("<f2"), "F32": emb.astype("<f4")}[dt0]
            parse_err = np.max(np.abs(w["model.embed_tokens.weight"] - exp.astype(np.float64)))
            full = forward(folder, ids)
            prefix = forward(folder, ids[:5])
            causal_err = np.max(np.abs(full[:5] - prefix))
            loop = forward_loaded(w, load_config(folder), ids, attn=attention_loops)
            loop_err = np.max(np.abs(full - loop))
            good = parse_err == 0 and causal_err < 1e-10 and loop_err < 1e-10 and full.shape == (len(ids), cfg["vocab_size"])
            ok &= good
            print(f"[{'ok' if good else 'FAIL'}] {name}: parse_err={parse_err:.1e} "
                  f"causal_err={causal_err:.1e} loop_vs_vectorised_err={loop_err:.1e} logits_shape={full.shape}")
    print("selftest", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--ids", help="comma-separated token ids; several sequences separated by ';'")
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args(argv)
    if a.selftest:
        return selftest()
    if not a.model_dir or not a.ids:
        ap.error("MODEL_DIR and --ids are required (or use --selftest)")
    seqs = [[int(s) for s in part.split(",") if s.strip()] for part in a.ids.split(";") if part.strip()]
    w, cfg = Weights(a.model_dir), load_config(a.model_dir)
    logits = [forward_loaded(w, cfg, ids).tolist() for ids in seqs]
    json.dump({"logits": logits}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
