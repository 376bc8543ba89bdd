"""Benchmark: training tokens/s of the clean transformer, 2 shards vs 1 vs nn.Linear.

    python -m tools.bench_model [--rounds N] [--steps N]

Three models of one architecture (pre-LN, causal attention written out, GELU MLP,
sinusoidal positions) train with AdamW on the same batches: the clean model with
2 shards, with 1 shard, and a copy built from PyTorch's own nn.Linear. After a
warm-up, each round times a fixed number of steps of every model, in a rotating
order; the medians over rounds are printed. Target: sharding costs at most 10%.
Exits 1 when the target is missed.
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

import clean_model.transformer as tm

CONFIG = dict(
    num_layers=2, num_heads=4, ffn_dim=256, dim=64, vocab_size=64, block_size=32
)
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
THREADS = 2
TARGET_COST = 0.10


class Attention(nn.Module):
    def __init__(self, dim, num_heads, block_size):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        mask = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer(
            "mask", mask.view(1, 1, block_size, block_size), persistent=False
        )

    def forward(self, x):
        B, T, C = x.size()
        hs = C // self.num_heads
        q = self.q(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.num_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn_dim, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))
        return x


class TorchTransformer(nn.Module):
    """The clean model's architecture from nn.Linear, loaded with its weights."""

    def __init__(self, clean):
        super().__init__()
        dim = clean.tok_emb.embedding_dim
        vocab_size = clean.tok_emb.num_embeddings
        num_heads = clean.blocks[0].attn.num_heads
        ffn_dim = clean.blocks[0].mlp.fc1.out_features
        self.block_size = clean.block_size
        self.tok_emb = nn.Embedding(vocab_size, dim)
        pe = tm.sinusoidal_positions(self.block_size, dim)
        self.register_buffer("pos_emb", pe, persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, ffn_dim, self.block_size) for _ in clean.blocks
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.load_state_dict(self.state_from(clean))

    def state_from(self, clean):
        state = {}
        for name, module in clean.named_modules():
            name = name.replace("mlp.", "")
            if isinstance(module, tm.ParallelLinear):
                bias = module.bias
                if isinstance(bias, nn.ParameterList):
                    bias = torch.cat(list(bias))
                state[f"{name}.weight"] = module.full_weight()
                state[f"{name}.bias"] = bias
            elif isinstance(module, (nn.Embedding, nn.LayerNorm)):
                for pname, p in module.named_parameters():
                    state[f"{name}.{pname}"] = p
        return {k: v.detach().clone() for k, v in state.items()}

    def forward(self, idx, targets):
        B, T = idx.size()
        x = self.tok_emb(idx) + self.pos_emb[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab_size)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss


def clean_model(num_shards):
    tm.NUM_SHARDS = num_shards
    torch.manual_seed(0)
    return tm.Transformer(**CONFIG)


def trainer(model, batches):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, foreach=True)

    def run(steps):
        start = time.perf_counter()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]

    saved = tm.NUM_SHARDS
    try:
        models = {
            "2 shards": clean_model(2),
            "1 shard": clean_model(1),
        }
    finally:
        tm.NUM_SHARDS = saved
    models["nn.Linear"] = TorchTransformer(models["1 shard"])

    generator = torch.Generator().manual_seed(0)
    shape = (BATCH_SIZE, CONFIG["block_size"])
    batches = [
        (
            torch.randint(CONFIG["vocab_size"], shape, generator=generator),
            torch.randint(CONFIG["vocab_size"], shape, generator=generator),
        )
        for _ in range(8)
    ]
    # Same weights, same function: otherwise the comparison means nothing.
    x, y = batches[0]
    with torch.no_grad():
        reference, _ = models["nn.Linear"](x, y)
        for name in ("2 shards", "1 shard"):
            logits, _ = models[name](x, y)
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)

    runs = {name: trainer(model, batches) for name, model in models.items()}
    for run in runs.values():
        run(args.warmup)

    tokens = args.steps * BATCH_SIZE * CONFIG["block_size"]
    names = list(runs)
    rates = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(tokens / runs[name](args.steps))

    def ratio(a, b):
        # Paired within a round, so load that drifts between rounds cancels.
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(
        f"config {CONFIG}, batch {BATCH_SIZE}, AdamW, {args.threads} threads;"
        f" {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'':>10}  {'median':>8}  {'best':>8}  (tokens/s)")
    for name in names:
        median, best = statistics.median(rates[name]), max(rates[name])
        print(f"{name:>10}  {median:8.0f}  {best:8.0f}")
    if any(statistics.median(r) < 0.8 * max(r) for r in rates.values()):
        print(
            f"warning: rounds vary by more than 20% (load average {load:.1f} at the"
            f" start, {os.cpu_count()} cores): other processes share the CPU, so"
            " these numbers are noisy"
        )
    vs_one = ratio("2 shards", "1 shard")
    vs_torch = ratio("2 shards", "nn.Linear")
    print(f"2 shards / 1 shard:   {vs_one:.3f}")
    print(f"1 shard / nn.Linear:  {ratio('1 shard', 'nn.Linear'):.3f}")
    print(f"2 shards / nn.Linear: {vs_torch:.3f}")
    cost = 1 - vs_torch
    verdict = "within" if cost <= TARGET_COST else "MISSES"
    print(
        f"sharding costs {cost:.1%} against nn.Linear"
        f" ({1 - vs_one:.1%} against 1 shard): {verdict} the target of"
        f" {TARGET_COST:.0%}"
    )
    return 0 if cost <= TARGET_COST else 1


if __name__ == "__main__":
    sys.exit(main())
