#!/usr/bin/env python3
"""The peer for scripts/gpu-check: the same model shape in PyTorch + transformers, bf16, on the
same GPU, built from the model folder's config.json (random weights: nothing is downloaded).

Prints one JSON line: prefill tokens/s and decode tokens/s (aggregate) at each batch size,
measured like `tandem bench device` (greedy, fixed new-token count, EOS ignored).

    python3 scripts/gpu-peer.py --model DIR [--batch 1,32] [--new-tokens 64] [--prompt-tokens 256]
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="folder with config.json")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--out")
    a = ap.parse_args()
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        print(json.dumps({"peer": "transformers", "skipped": f"not installed: {e}"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"peer": "transformers", "skipped": "torch sees no CUDA device"}))
        return 0
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).cuda().eval()
    vocab = min(cfg.vocab_size, 30000)
    out = {"peer": "transformers", "transformers": transformers.__version__,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "dtype": "bfloat16", "model": a.model}

    def gen(batch, prompt, new):
        ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(1, 16, 4)  # warm-up: kernels, allocator
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, a.prompt_tokens), device="cuda")
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    out["prefill_tokens_per_s"] = a.prompt_tokens / sorted(times)[len(times) // 2]
    decode = {}
    for b in [int(x) for x in a.batch.split(",")]:
        # Decode time = generating n tokens minus generating 1 (the prefill and first token).
        first = min(gen(b, 32, 1) for _ in range(2))
        full = min(gen(b, 32, a.new_tokens) for _ in range(2))
        decode[str(b)] = b * (a.new_tokens - 1) / max(full - first, 1e-9)
    out["decode_tokens_per_s"] = decode
    line = json.dumps(out)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
