#!/usr/bin/env python3
"""gpu_peer.py: PyTorch with FlexAttention on an NVIDIA GPU, to measure the GPU build against.

A measuring instrument, not part of the project: tools/gpu_check.sh runs it where python3 has PyTorch
2.5 or later with a GPU (the lent H100/H200 machines' python3 has it).

  gpu_peer.py attention [--sizes 8192,32768] [--dtypes float32,bfloat16] [--tf32 1]
      One attention forward + backward, batch 4, 4 heads, head size 64 (bench's GPU shapes), best of 5:
      FlexAttention (compiled) with the strided/merged pattern, l = round(sqrt(n)), as a block mask, and
      PyTorch's dense causal attention (F.scaled_dot_product_attention, is_causal). Lines:
        peer-mask n=<n> l=<l> sparsity=<% of the 128 x 128 blocks skipped>
        peer-attn n=<n> dtype=<t> tf32=<0|1> impl=<flex_strided|sdpa_dense> ms=<best>
  gpu_peer.py train [--amp 0|1] [--tf32 0|1] [model flags of torch_peer.py]
      The GPU default model of ./train (context 1024, width 512, 8 heads, 8 layers, batch 16, stride 32,
      strided/merged), torch_peer.py's model with FlexAttention on the same block mask, float32 (with
      TF32 allowed: --tf32 1) or under autocast bf16 (--amp 1). Line:
        peer-train ctx=<n> amp=<0|1> tf32=<0|1> tok/s=<median of the steps after the first two>
"""
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer  # noqa: E402 (the model, the flags, the training loop)


def mask_mod(pattern, combine, l, c, groups):
    """The pattern as FlexAttention's mask_mod(b, h, q, k): the rule of torch_peer.pattern_mask."""
    def step(s, h, q, k):
        if pattern == "strided":
            return (q - k < l) if s == 0 else ((q - k) % l == 0)
        if s == 0:
            return k // l == q // l
        g = h % groups
        return (k % l >= l - (g + 1) * c) & (k % l <= l - g * c - 1)

    def combined(layer):
        def mod(b, h, q, k):
            causal = k <= q
            if pattern == "dense":
                return causal
            if combine == "merged":
                return causal & (step(0, h, q, k) | step(1, h, q, k))
            if combine == "interleaved":
                return causal & step(layer % 2, h, q, k)
            return causal & torch.where(h % 2 == 0, step(0, h, q, k), step(1, h, q, k))
        return mod
    return combined


def flex_functions(pattern, combine, l, c, groups, layers, heads, n, device):
    """One attention function per layer, (q, k, v) -> y, on its BlockMask (made once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    mods = mask_mod(pattern, combine, l, c, groups)
    functions, masks = [], []
    for r in range(layers):
        per_head = pattern == "fixed" or combine == "multihead"
        bm = create_block_mask(mods(r), None, heads if per_head else None, n, n, device=device)
        masks.append(bm)
        functions.append(lambda q, k, v, bm=bm: flex(q, k, v, block_mask=bm))
    return functions, masks


def best_ms(fn, reps=5):
    fn()  # compiles
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def attention(argv):
    import argparse
    import torch.nn.functional as F
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,32768")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tf32", type=int, default=1)
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    B, H, D = 4, 4, 64
    for n in (int(s) for s in a.sizes.split(",")):
        l = round(math.sqrt(n))
        functions, masks = flex_functions("strided", "merged", l, 0, 1, 1, H, n, "cuda")
        print(f"peer-mask n={n} l={l} sparsity={masks[0].sparsity():.1f}", flush=True)
        for name in a.dtypes.split(","):
            dt = getattr(torch, name)
            q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            dout = torch.randn(B, H, n, D, device="cuda", dtype=dt)
            impls = {"flex_strided": lambda: functions[0](q, k, v).backward(dout),
                     "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)}
            for impl, fn in impls.items():
                try:
                    print(f"peer-attn n={n} dtype={name} tf32={a.tf32} impl={impl} ms={best_ms(fn):.3f}", flush=True)
                except Exception as e:  # (out of memory, say): the line says so, the others still run
                    print(f"peer-attn n={n} dtype={name} impl={impl} error={type(e).__name__}: {str(e)[:200]}",
                          flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()


def train(argv):
    p = torch_peer.arguments(dict(ctx=1024, stride=32, dim=512, heads=8, layers=8, batch=16, steps=30, warmup=500,
                                  summary=8))
    p.add_argument("--amp", type=int, default=0)
    p.add_argument("--tf32", type=int, default=1)
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    torch.manual_seed(a.seed)
    functions, _ = flex_functions(a.pattern, a.combine, a.stride, a.summary, a.groups, a.layers, a.heads, a.ctx,
                                  "cuda")
    model = torch_peer.Model(a, attend=functions)
    tok_s, loss = torch_peer.train(a, model, "cuda", torch.bfloat16 if a.amp else None)
    print(f"peer-train ctx={a.ctx} amp={a.amp} tf32={a.tf32} tok/s={tok_s:.0f} loss={loss:.4f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("attention", "train"):
        sys.exit("usage: gpu_peer.py attention|train [flags] (see the header)")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    (attention if sys.argv[1] == "attention" else train)(sys.argv[2:])
