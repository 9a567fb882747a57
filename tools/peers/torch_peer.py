#!/usr/bin/env python3
"""torch_peer.py: the project's model written in plain PyTorch, to measure ./train against.

A measuring instrument, not part of the project (the project has no Python): tools/compare_torch.sh runs
it beside ./train on the same machine. It needs PyTorch 2.x in a virtual environment of your own:
    python3 -m venv venv && venv/bin/pip install torch numpy

The model is sparse_transformer.cu's (README: How it works), written as a PyTorch user would:
  - bytes -> a 256-entry embedding, plus the position's factorized embeddings (row and column of a
    grid of width l: text and audio);
  - pre-LN blocks: x + a + b with a = proj(attn(LN1(x))), b = W2 gelu(W1 LN2(x + a) + b1) + b2, GELU the
    paper's x sigmoid(1.702 x), its product W1 h computed once;
  - attention: F.scaled_dot_product_attention with the pattern as a boolean mask (--attn sdpa, the
    default; FlexAttention has no CPU backward), or q k^T, masked_fill and softmax (--attn mask);
  - logits = LN(x) Wout^T (no bias), cross-entropy;
  - init as the paper's: N(0, 0.125 / fan_in), the branches' last products also / sqrt(2 layers),
    positions * sqrt(1/2) for two factors, Wout 0, biases 0;
  - AdamW (0.9, 0.95, eps 1e-8), weight decay on matrices only, the gradient clipped to norm 1,
    linear warmup then cosine, as ./train.
--compile 1 runs the model under torch.compile (its first steps compile: only steps after the first
two count). Data: random windows of --data (a train.bin of data/datatool, header skipped), or random
bytes.

Prints 'peer: tok/s=<median tokens/s of the steps after the first (two with --compile)> loss=<last>'.
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def pattern_mask(kind, combine, layer, head, n, l, c, groups):
    """(n, n) booleans, True where query i (row) may attend to key j (column): section 2 of the .cu."""
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    causal = j <= i

    def step(s):
        if kind == "strided":
            return causal & ((i - j < l) if s == 0 else ((i - j) % l == 0))
        if kind == "fixed":
            if s == 0:
                return causal & (j // l == i // l)
            g = head % groups
            return causal & (j % l >= l - (g + 1) * c) & (j % l <= l - g * c - 1)
        raise ValueError(kind)

    if kind == "dense":
        return causal
    if combine == "merged":
        return step(0) | step(1)
    return step(layer % 2 if combine == "interleaved" else head % 2)


def normal_(t, std):
    with torch.no_grad():
        t.normal_(0.0, std)


class Block(nn.Module):
    def __init__(self, dim, heads, layers, ff, masks, attn):
        super().__init__()
        self.heads, self.attn = heads, attn  # "sdpa", "mask", or a function (q, k, v) -> y (gpu_peer.py)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, ff * dim), nn.Linear(ff * dim, dim)
        for lin in (self.qkv, self.proj, self.fc1, self.fc2):
            std = math.sqrt(0.125 / lin.in_features)
            normal_(lin.weight, std / math.sqrt(2 * layers) if lin in (self.proj, self.fc2) else std)
            nn.init.zeros_(lin.bias)
        self.register_buffer("mask", masks)  # (heads, T, T)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if callable(self.attn):
            y = self.attn(q, k, v)
        elif self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads)
            y = s.masked_fill(~self.mask, float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        a = self.attention(self.ln1(x))
        u = self.fc1(self.ln2(x + a))
        return x + a + self.fc2(u * torch.sigmoid(1.702 * u))


class Model(nn.Module):
    """attend: None (--attn), or one function per layer, (q, k, v) -> y (gpu_peer.py's FlexAttention)."""
    def __init__(self, a, attend=None):
        super().__init__()
        T, l, d = a.ctx, a.stride, a.dim
        self.l = l
        self.wte = nn.Embedding(256, d)
        self.rows, self.cols = nn.Embedding((T + l - 1) // l, d), nn.Embedding(l, d)
        normal_(self.wte.weight, math.sqrt(0.125 / d))
        for e in (self.rows, self.cols):
            normal_(e.weight, math.sqrt(0.125 / d) * math.sqrt(0.5))
        self.blocks = nn.ModuleList(
            Block(d, a.heads, a.layers, a.ff,
                  torch.stack([pattern_mask(a.pattern, a.combine, r, h, T, l, a.summary, a.groups)
                               for h in range(a.heads)]) if attend is None else torch.zeros(0),
                  a.attn if attend is None else attend[r])
            for r in range(a.layers))
        self.lnf = nn.LayerNorm(d)
        self.out = nn.Linear(d, 256, bias=False)
        nn.init.zeros_(self.out.weight)
        self.register_buffer("pos", torch.arange(T))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.rows(self.pos // self.l) + self.cols(self.pos % self.l)
        for b in self.blocks:
            x = b(x)
        logits = self.out(self.lnf(x))
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


def arguments(defaults):
    """The model's and the run's flags, as ./train names them; `defaults` overrides some."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    values = dict(ctx=1024, stride=32, summary=8, groups=1, dim=128, heads=4, layers=2, ff=4, batch=4, steps=8,
                  threads=2, warmup=50, compile=0, seed=1337)
    values.update(defaults)
    for name, default in values.items():
        p.add_argument("--" + name, type=int, default=default)
    p.add_argument("--pattern", default="strided", choices=["dense", "strided", "fixed"])
    p.add_argument("--combine", default="merged", choices=["interleaved", "merged", "multihead"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "mask"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default="", help="a train.bin written by data/datatool (else random bytes)")
    return p


def train(a, model, device="cpu", autocast=None):
    """a.steps steps of AdamW on random windows; returns (tokens/s: the median of the steps after the
    first, or the first two with --compile; the last loss). autocast: a dtype for torch.autocast."""
    model = model.to(device)
    decay = [q for n, q in model.named_parameters() if q.dim() == 2 and "wte" not in n and "rows" not in n
             and "cols" not in n]
    other = [q for n, q in model.named_parameters() if all(q is not d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    step_fn = torch.compile(model) if a.compile else model
    data = None
    if a.data:
        raw = open(a.data, "rb").read()
        data = torch.frombuffer(bytearray(raw[64:]), dtype=torch.uint8).long()  # (the 64-byte header)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, loss = [], float("nan")
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / max(a.warmup, 1))
        lr *= 0.5 * (1 + math.cos(math.pi * step / a.steps)) if step >= a.warmup else 1.0
        for g in opt.param_groups:
            g["lr"] = lr
        start = time.perf_counter()
        if data is not None:
            at = torch.randint(0, len(data) - a.ctx - 1, (a.batch,))
            w = torch.stack([data[s:s + a.ctx + 1] for s in at.tolist()])
        else:
            w = torch.randint(0, 256, (a.batch, a.ctx + 1))
        w = w.to(device)
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            l = step_fn(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        l.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = l.item()
        sync()
        times.append(time.perf_counter() - start)
    kept = times[2 if a.compile else 1:] or times[-1:]
    return a.batch * a.ctx / statistics.median(kept), loss


def main():
    a = arguments({}).parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok_s, loss = train(a, Model(a))
    print(f"peer: tok/s={tok_s:.0f} loss={loss:.4f}")


if __name__ == "__main__":
    main()
