"""The clean transformer: its API, its hand-written gradients, its shards, its demo."""

import inspect
import math
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import clean_model.transformer as tm
from clean_model.transformer import (
    DEMO_CONFIG,
    TARGET_ACCURACY,
    ColumnParallelLinear,
    CopyToShards,
    GatherFromShards,
    LinearShard,
    ParallelLinear,
    ReduceFromShards,
    RowParallelLinear,
    SplitToShards,
    Transformer,
    evaluate,
    make_batch,
    train,
)

REPO = Path(__file__).resolve().parents[1]

# Every size divides by 1, 2 and 4 shards.
SMALL = dict(num_layers=2, num_heads=2, ffn_dim=32, dim=16, vocab_size=12, block_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    # The model is tiny: more threads only add overhead and fight the other
    # xdist worker for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model():
    torch.manual_seed(0)
    return Transformer(**SMALL)


def random_tokens(shape, vocab_size, seed=1):
    return torch.randint(
        vocab_size, shape, generator=torch.Generator().manual_seed(seed)
    )


# --- API ---------------------------------------------------------------------


def test_transformer_is_built_from_exactly_the_six_documented_sizes():
    signature = str(inspect.signature(Transformer))
    assert signature == "(num_layers, num_heads, ffn_dim, dim, vocab_size, block_size)"


def test_forward_returns_logits_for_every_position_and_a_scalar_loss():
    model = small_model()
    idx = random_tokens((3, 7), SMALL["vocab_size"])
    targets = random_tokens((3, 7), SMALL["vocab_size"], seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 7, SMALL["vocab_size"])
    assert loss.shape == ()
    assert torch.isfinite(loss)


def test_forward_without_targets_returns_no_loss():
    model = small_model()
    logits, loss = model(random_tokens((2, 5), SMALL["vocab_size"]))
    assert loss is None
    assert logits.shape == (2, 5, SMALL["vocab_size"])


def test_loss_is_the_mean_cross_entropy_over_targets_that_are_not_minus_one():
    model = small_model()
    idx = random_tokens((3, 8), SMALL["vocab_size"])
    targets = random_tokens((3, 8), SMALL["vocab_size"], seed=2)
    targets[:, :3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    log_probs = logits.log_softmax(dim=-1)[keep]  # (N, vocab_size)
    expected = -log_probs.gather(1, targets[keep].unsqueeze(1)).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "config",
    [DEMO_CONFIG, {**SMALL, "vocab_size": 64, "dim": 64, "ffn_dim": 128}],
    ids=["demo", "vocab64"],
)
def test_untrained_model_starts_near_the_uniform_guess_loss(config):
    torch.manual_seed(0)
    model = Transformer(**config)
    idx = random_tokens((16, config["block_size"]), config["vocab_size"])
    targets = random_tokens((16, config["block_size"]), config["vocab_size"], seed=2)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(config["vocab_size"])) < 0.3


def test_logits_at_a_position_do_not_depend_on_later_tokens():
    model = small_model()
    idx = random_tokens((2, 8), SMALL["vocab_size"])
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % SMALL["vocab_size"]
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :5], logits_changed[:, :5])
    assert not torch.allclose(logits[:, 5:], logits_changed[:, 5:])


def test_forward_refuses_a_sequence_longer_than_block_size():
    model = small_model()
    with pytest.raises(AssertionError, match="block_size"):
        model(random_tokens((1, SMALL["block_size"] + 1), SMALL["vocab_size"]))


# --- generate ----------------------------------------------------------------


def test_generate_continues_a_prompt_longer_than_block_size():
    model = small_model()
    prompt = random_tokens((2, SMALL["block_size"] + 5), SMALL["vocab_size"])
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, prompt.size(1) + 6)
    assert torch.equal(out[:, : prompt.size(1)], prompt)
    # The first new token is the greedy choice given the last block_size tokens.
    logits, _ = model(prompt[:, -SMALL["block_size"] :])
    assert torch.equal(out[:, prompt.size(1)], logits[:, -1].argmax(dim=-1))


def test_generate_builds_no_autograd_graph():
    model = small_model()
    logits_require_grad = []
    model.register_forward_hook(
        lambda module, args, output: logits_require_grad.append(output[0].requires_grad)
    )
    out = model.generate(random_tokens((2, 3), SMALL["vocab_size"]), max_new_tokens=4)
    assert not out.requires_grad
    assert logits_require_grad == [False] * 4


# --- the autograd Functions --------------------------------------------------


def double(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=generator, dtype=torch.float64, requires_grad=True)
        for s in shapes
    ]


# name: (sharded Function, the same computation in plain differentiable torch,
# input shapes). GatherFromShards gets unequal slices: its backward must split
# by the sizes it saw, not evenly.
FUNCTIONS = {
    "CopyToShards": (
        lambda x: CopyToShards.apply(x, 3),
        lambda x: (x, x, x),
        [(2, 4, 6)],
    ),
    "ReduceFromShards": (
        ReduceFromShards.apply,
        lambda *xs: sum(xs),
        [(2, 4, 6)] * 3,
    ),
    "SplitToShards": (
        lambda x: SplitToShards.apply(x, 3),
        lambda x: (x[..., 0:2], x[..., 2:4], x[..., 4:6]),
        [(2, 4, 6)],
    ),
    "GatherFromShards": (
        GatherFromShards.apply,
        lambda *xs: torch.cat(xs, dim=-1),
        [(2, 4, 1), (2, 4, 3), (2, 4, 2)],
    ),
    "LinearShard": (
        LinearShard.apply,
        lambda x, w: torch.einsum("bti,oi->bto", x, w),
        [(2, 4, 5), (3, 5)],
    ),
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_autograd_function_passes_gradcheck_in_float64(name):
    sharded, _, shapes = FUNCTIONS[name]
    assert torch.autograd.gradcheck(sharded, double(*shapes))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_autograd_function_gives_the_gradients_of_the_unsharded_computation(name):
    sharded, plain, shapes = FUNCTIONS[name]
    inputs = double(*shapes)

    def outputs_and_grads(fn):
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        cotangents = double(*(o.shape for o in outs), seed=1)
        dot = sum((o * c.detach()).sum() for o, c in zip(outs, cotangents))
        return [o.detach() for o in outs], torch.autograd.grad(dot, inputs)

    outs, grads = outputs_and_grads(sharded)
    expected_outs, expected_grads = outputs_and_grads(plain)
    torch.testing.assert_close(outs, expected_outs, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads, expected_grads, rtol=0, atol=1e-12)


def full_weights_and_biases(in_features, hidden, out_features, seed=0):
    """Float64 leaves W1 (hidden, in), b1, W2 (out, hidden), b2."""
    return double(
        (hidden, in_features),
        (hidden,),
        (out_features, hidden),
        (out_features,),
        seed=seed,
    )


def parallel_pair(full, num_shards, split_between):
    """Column- then row-parallel linear in float64, loaded with the full weights."""
    w1, b1, w2, b2 = (t.detach() for t in full)
    column = ColumnParallelLinear(
        w1.size(1), w1.size(0), gather_output=not split_between, num_shards=num_shards
    ).double()
    row = RowParallelLinear(
        w2.size(1), w2.size(0), input_is_split=split_between, num_shards=num_shards
    ).double()
    column.load_full_weight(w1)
    row.load_full_weight(w2)
    with torch.no_grad():
        for bias, chunk in zip(column.bias, b1.chunk(num_shards)):
            bias.copy_(chunk)
        row.bias.copy_(b2)
    return column, row


def run_pair(column, row, x, split_between):
    h = column(x)
    h = [F.gelu(h_i) for h_i in h] if split_between else F.gelu(h)
    return row(h)


@pytest.mark.parametrize("split_between", [True, False], ids=["split", "gathered"])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_column_then_row_parallel_pair_matches_plain_matmuls_on_the_full_weights(
    num_shards, split_between
):
    full = full_weights_and_biases(in_features=6, hidden=8, out_features=5)
    column, row = parallel_pair(full, num_shards, split_between)
    x, grad_y = double((3, 4, 6), (3, 4, 5), seed=1)

    y = run_pair(column, row, x, split_between)
    y.backward(grad_y)

    w1, b1, w2, b2 = full
    x_plain = x.detach().clone().requires_grad_()
    y_plain = F.gelu(x_plain @ w1.t() + b1) @ w2.t() + b2
    y_plain.backward(grad_y)

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)

    close(y, y_plain)
    close(x.grad, x_plain.grad)
    close(torch.cat([w.grad for w in column.weight], dim=0), w1.grad)
    close(torch.cat([b.grad for b in column.bias]), b1.grad)
    close(torch.cat([w.grad for w in row.weight], dim=1), w2.grad)
    close(row.bias.grad, b2.grad)


# --- shard count -------------------------------------------------------------


def forward_backward(monkeypatch, num_shards):
    """Logits, full weights and every parameter's full gradient of a seeded demo model."""
    monkeypatch.setattr(tm, "NUM_SHARDS", num_shards)
    torch.manual_seed(0)
    model = Transformer(**DEMO_CONFIG)
    x, y = make_batch(
        8,
        DEMO_CONFIG["vocab_size"],
        DEMO_CONFIG["block_size"],
        torch.Generator().manual_seed(1),
    )
    logits, loss = model(x, y)
    loss.backward()
    weights, grads = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, ParallelLinear):
            assert len(module.weight) == num_shards
            weights[name] = module.full_weight().detach()
            grads[name + ".weight"] = torch.cat(
                [w.grad for w in module.weight], dim=module.shard_dim
            )
            bias = module.bias
            grads[name + ".bias"] = (
                torch.cat([b.grad for b in bias])
                if isinstance(bias, torch.nn.ParameterList)
                else bias.grad
            )
        elif isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)):
            for pname, p in module.named_parameters():
                grads[f"{name}.{pname}"] = p.grad
    return logits.detach(), weights, grads


@pytest.mark.parametrize("num_shards", [2, 4])
def test_sharded_model_computes_what_the_one_shard_model_computes(
    monkeypatch, num_shards
):
    logits_1, weights_1, grads_1 = forward_backward(monkeypatch, 1)
    logits_n, weights_n, grads_n = forward_backward(monkeypatch, num_shards)
    # Seeding gives the same full weights whatever the shard count.
    assert weights_n.keys() == weights_1.keys()
    for name in weights_1:
        assert torch.equal(weights_n[name], weights_1[name]), name
    # Float32, and n shards add per-shard partial sums in another order, so the
    # results differ by rounding only: about 1e-7 for logits of size 0.3 and
    # gradients of size 0.1. 1e-5 leaves a 100x margin and still catches a
    # sharding bug, which moves them by orders of magnitude more.
    tolerance = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(logits_n, logits_1, **tolerance)
    assert grads_n.keys() == grads_1.keys()
    for name in grads_1:
        torch.testing.assert_close(grads_n[name], grads_1[name], **tolerance, msg=name)


# --- against torch.distributed ---------------------------------------------


class AllReduceForward(torch.autograd.Function):
    """Sum over ranks going forward; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class AllReduceBackward(torch.autograd.Function):
    """Identity going forward; the gradients are summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def distributed_rank(rank, world_size, port, workdir):
    """One rank of a column-then-row parallel pair, written with plain matmuls."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(workdir / "inputs.pt")
        w1 = data["w1"].chunk(world_size, dim=0)[rank].clone().requires_grad_()
        b1 = data["b1"].chunk(world_size)[rank].clone().requires_grad_()
        w2 = data["w2"].chunk(world_size, dim=1)[rank].clone().requires_grad_()
        b2 = data["b2"].clone().requires_grad_()
        x = data["x"].clone().requires_grad_()
        h = F.gelu(AllReduceBackward.apply(x) @ w1.t() + b1)
        y = AllReduceForward.apply(h @ w2.t()) + b2
        y.backward(data["grad_y"])
        results = dict(y=y, x=x.grad, w1=w1.grad, b1=b1.grad, w2=w2.grad, b2=b2.grad)
        torch.save(
            {k: v.detach() for k, v in results.items()}, workdir / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_hand_made_collectives_agree_with_a_gloo_process_group(tmp_path):
    world_size = 2
    full = full_weights_and_biases(in_features=6, hidden=8, out_features=5)
    x, grad_y = double((3, 4, 6), (3, 4, 5), seed=1)
    w1, b1, w2, b2 = (t.detach() for t in full)
    torch.save(
        dict(w1=w1, b1=b1, w2=w2, b2=b2, x=x.detach(), grad_y=grad_y.detach()),
        tmp_path / "inputs.pt",
    )
    context = mp.start_processes(
        distributed_rank,
        args=(world_size, free_port(), tmp_path),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    # join() raises as soon as one rank fails and terminates the others; the
    # deadline covers a rank that hangs without dying. Both are generous because
    # a busy machine can take 20 s just to import torch twice.
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail("the gloo ranks did not finish within 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()

    column, row = parallel_pair(full, world_size, split_between=True)
    y = run_pair(column, row, x, split_between=True)
    y.backward(grad_y)

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)

    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        close(got["y"], y.detach())
        close(got["x"], x.grad)
        close(got["w1"], column.weight[rank].grad)
        close(got["b1"], column.bias[rank].grad)
        close(got["w2"], row.weight[rank].grad)
        close(got["b2"], row.bias.grad)


# --- the demo ----------------------------------------------------------------


def test_demo_config_reaches_its_target_accuracy():
    torch.manual_seed(0)
    model = Transformer(**DEMO_CONFIG)
    train(model)
    accuracy = evaluate(model)
    assert accuracy >= TARGET_ACCURACY


def test_running_the_package_prints_pass_and_exits_zero():
    # One thread, as in-process: the model is too small to gain from more, and
    # the other xdist worker is busy.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "clean_model"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith("PASS") for line in proc.stdout.splitlines()), (
        proc.stdout
    )
