"""A small GPT-style transformer with tensor parallelism written out by hand.

Every linear layer keeps its weight as shards, one `nn.Parameter` per shard, and
moves activations between shards through four autograd Functions (copy, reduce,
split, gather), each with an explicit backward. The shards live in one process,
so 1, 2 or 4 shards compute the same function.

Run this file (or `python -m clean_model`) to train it on a small task and see
whether it works: the last line says PASS or FAIL.
"""

import math
import sys
import time

import torch
import torch.nn as nn
from torch.nn import functional as F

NUM_SHARDS = 2


class CopyToShards(torch.autograd.Function):
    """Give every shard the same input; the shards' gradients are summed."""

    @staticmethod
    def forward(ctx, x, num_shards):
        return tuple(x.clone() for _ in range(num_shards))

    @staticmethod
    def backward(ctx, *grads):
        grad = grads[0]
        for g in grads[1:]:
            grad = g
        return grad, None


class ReduceFromShards(torch.autograd.Function):
    """Sum the shards' partial outputs; every shard gets the whole gradient."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.num_shards = len(xs)
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.clone() for _ in range(ctx.num_shards))


class SplitToShards(torch.autograd.Function):
    """Cut the last dimension into equal slices, one per shard."""

    @staticmethod
    def forward(ctx, x, num_shards):
        return tuple(t.contiguous() for t in x.chunk(num_shards, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        return torch.cat(grads, dim=-1), None


class GatherFromShards(torch.autograd.Function):
    """Concatenate the shards' slices along the last dimension."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.sizes = [x.size(-1) for x in xs]
        return torch.cat(xs, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return tuple(g.contiguous() for g in grad.split(ctx.sizes, dim=-1))


class LinearShard(torch.autograd.Function):
    """x @ w.T for one shard's weight w of shape (out, in)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        _, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_weight = grad.flatten(0, -2).t() @ grad_x.flatten(0, -2)
        return grad_x, grad_weight


class ParallelLinear(nn.Module):
    """A linear layer whose weight is split into `num_shards` parameters."""

    def __init__(self, in_features, out_features, shard_dim, num_shards=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_dim = shard_dim
        num_shards = num_shards or NUM_SHARDS
        shape = [out_features, in_features]
        assert shape[shard_dim] % num_shards == 0, (
            "features must split evenly into shards"
        )
        shape[shard_dim] //= num_shards
        self.weight = nn.ParameterList([nn.Parameter(torch.empty(shape))] * num_shards)

    def full_weight(self):
        return torch.cat(list(self.weight), dim=self.shard_dim)

    @torch.no_grad()
    def load_full_weight(self, full):
        chunks = full.chunk(len(self.weight), dim=self.shard_dim)
        for w, chunk in zip(self.weight, chunks):
            w.copy_(chunk)


class ColumnParallelLinear(ParallelLinear):
    """Output features split across shards; gathers them unless told not to."""

    def __init__(self, in_features, out_features, gather_output=True, num_shards=None):
        super().__init__(in_features, out_features, 0, num_shards)
        self.gather_output = gather_output
        self.bias = nn.ParameterList(
            nn.Parameter(torch.zeros(w.size(0))) for w in self.weight
        )

    def forward(self, x):
        xs = CopyToShards.apply(x, len(self.weight))
        ys = [
            LinearShard.apply(x_i, w.data) + b
            for x_i, w, b in zip(xs, self.weight, self.bias)
        ]
        if self.gather_output:
            return GatherFromShards.apply(*ys)
        return ys


class RowParallelLinear(ParallelLinear):
    """Input features split across shards; partial outputs are summed."""

    def __init__(
        self, in_features, out_features, input_is_split=False, num_shards=None
    ):
        super().__init__(in_features, out_features, 1, num_shards)
        self.input_is_split = input_is_split
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        xs = x if self.input_is_split else SplitToShards.apply(x, len(self.weight))
        ys = [LinearShard.apply(x_i, w) for x_i, w in zip(xs, self.weight)]
        return ReduceFromShards.apply(*ys) + self.bias


def sinusoidal_positions(num_positions, dim):
    """Fixed position table (num_positions, dim): sin on even features, cos on odd."""
    position = torch.arange(num_positions).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = position.new_zeros(num_positions, dim)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, block_size):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.q = ColumnParallelLinear(dim, dim)
        self.k = ColumnParallelLinear(dim, dim)
        self.v = ColumnParallelLinear(dim, dim)
        self.proj = RowParallelLinear(dim, dim)
        mask = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer(
            "mask", mask.view(1, 1, block_size, block_size), persistent=False
        )

    def forward(self, x):
        B, T, C = x.size()
        hs = C // self.num_heads
        q = self.q(x).view(B, T, self.num_heads, hs).transpose(1, 2)
        k = self.k(x).view(B, self.num_heads, T, hs)
        v = self.v(x).view(B, T, self.num_heads, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-2)
        y = att @ v
        y = y.transpose(-2, -1).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, ffn_dim, gather_output=False)
        self.fc2 = RowParallelLinear(ffn_dim, dim, input_is_split=True)

    def forward(self, x):
        hs = [F.gelu(h) for h in self.fc1(x)]
        return self.fc2(hs)


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn_dim, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ffn_dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, num_layers, num_heads, ffn_dim, dim, vocab_size, block_size):
        super().__init__()
        self.num_layers = num_layers
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, dim)
        pe = sinusoidal_positions(block_size, dim)
        self.register_buffer("pos_emb", pe, persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, ffn_dim, block_size) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = ColumnParallelLinear(dim, vocab_size)
        self._init_weights()

    def _init_weights(self):
        """GPT-2's init: weights N(0, 0.02), biases zero, and the projections into the
        residual stream shrunk by 1/sqrt(2 * num_layers) so depth doesn't grow it.

        Token embeddings start at std 0.3, not 0.02: they are added to sinusoids of
        unit size, and at 0.02 the tokens drown in them (learning takes ~3x longer).
        Each full weight is drawn once and then cut into shards.
        """
        for module in self.modules():
            if isinstance(module, ParallelLinear):
                full = torch.empty(module.out_features, module.in_features)
                nn.init.normal_(full, mean=0.0, std=0.02)
                module.load_full_weight(full)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**0.5)
        residual_std = 0.02 / math.sqrt(2 * self.num_layers)
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                full = torch.empty(layer.out_features, layer.in_features)
                nn.init.normal_(full, mean=0.0, std=residual_std)
                layer.load_full_weight(full)
            for layer in (block.attn.q, block.attn.k):
                for w in layer.weight:
                    nn.init.zeros_(w)

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids, T <= block_size; targets: (B, T), -1 = ignore.

        Returns (logits, loss): logits (B, T, vocab_size), loss a scalar, or
        None when no targets are given.
        """
        B, T = idx.size()
        assert T <= self.block_size, (
            f"sequence of {T} exceeds block_size {self.block_size}"
        )
        x = self.tok_emb(idx) + self.pos_emb[:T]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(B * T, -1), targets.view(B * T), ignore_index=-1
            )
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedily extend idx (B, T) by max_new_tokens; returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.block_size :]
            logits, _ = self(idx_cond)
            next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


DEMO_CONFIG = dict(
    num_layers=2, num_heads=2, ffn_dim=64, dim=32, vocab_size=16, block_size=16
)
PERIOD = 5
TRAIN_STEPS = 200
BATCH_SIZE = 32
LEARNING_RATE = 1e2
EVAL_PROMPTS = 100
EVAL_NEW_TOKENS = 24
TARGET_ACCURACY = 0.9


def make_batch(batch_size, vocab_size, block_size, generator):
    """Inputs (B, block_size) and next-token targets for the demo task.

    The task: continue a repeating pattern. Each sequence is a random word of PERIOD
    tokens, repeated; the model must predict every token after the first period,
    which takes attention to the token PERIOD steps back and a sense of position.
    Targets inside the first period are unpredictable and set to -1 (ignored).
    """
    word = torch.randint(vocab_size, (batch_size, PERIOD), generator=generator)
    seq = word.repeat(1, block_size // PERIOD + 2)[:, : block_size + 1]
    x = seq[:, :-1]
    y = seq[:, 1:].clone()
    y[:, PERIOD - 1 :] = -1
    return x, y


def train(model, steps=TRAIN_STEPS, seed=0):
    """Train with AdamW on fresh batches; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, foreach=True)
    losses = []
    for _ in range(steps):
        x, y = make_batch(
            BATCH_SIZE, model.tok_emb.num_embeddings, model.block_size, generator
        )
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def evaluate(model, seed=1234):
    """Fraction of held-out prompts whose generated continuation is exactly right."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.tok_emb.num_embeddings
    word = torch.randint(vocab_size, (EVAL_PROMPTS, PERIOD), generator=generator)
    expected = word.repeat(1, (PERIOD + EVAL_NEW_TOKENS) // PERIOD + 1)
    expected = expected[:, : PERIOD + EVAL_NEW_TOKENS]
    out = model.generate(word, EVAL_NEW_TOKENS)
    return (out == expected).all(dim=1).float().mean().item()


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(**DEMO_CONFIG)
    start = time.perf_counter()
    losses = train(model)
    accuracy = evaluate(model)
    seconds = time.perf_counter() - start
    print(f"trained {len(losses)} steps in {seconds:.1f}s, final loss {losses[-1]:.3f}")
    ok = accuracy >= TARGET_ACCURACY
    verdict = (
        "PASS: the model works" if ok else "FAIL: the model does not learn the task"
    )
    print(
        f"{verdict} (continues {accuracy:.0%} of held-out patterns exactly,"
        f" target {TARGET_ACCURACY:.0%})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
