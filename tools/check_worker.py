"""The child side of `bugforge check` and of `bugforge reveal`: runs candidate code.

    python -m tools.check_worker check FILE --result OUT.jsonl
    python -m tools.check_worker judge JOB.json --result OUT.jsonl

Everything that executes a candidate's code happens here, in a process the parent
can stop. Events go to OUT.jsonl, one JSON object a line, flushed as they happen,
so what finished before a hang or a crash is not lost.

`check` compares the candidate's file with the clean reference
(clean_model.transformer). Both models are built with the same seed; where a check
needs identical weights, the reference's parameters (spread wider than the init,
see `spread`) are copied into the candidate's by name (the buffers `mask` and
`pos_emb` are non-persistent, so a candidate's own buffers stay in place). A check
never names the code it found wrong.

`judge` decides, for `bugforge reveal`, whether the candidate fixed each planted
bug, by behaviour (see `judge` below).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import traceback
import types
from pathlib import Path

import torch
from torch.nn import functional as F

import clean_model.transformer as ref
from tools.check import CHECK_IDS
from tools.oracle import load_source

CONFIG = ref.DEMO_CONFIG
VOCAB = CONFIG["vocab_size"]
BLOCK = CONFIG["block_size"]
SEED = 0  # the seed the demo builds its model with
SPREAD, SPREAD_SEED = 0.2, 1  # see spread()
# (batch, length) of the inputs the forward checks use: full and shorter than a block.
SHAPES = ((16, BLOCK), (3, 7))

# Tolerances. Equivalent rewrites of the model (another softmax, einsum for matmul)
# move float32 logits and gradients by ~1e-7 of their size; a bug moves them by far
# more. Some gradients are exactly zero in theory (the key biases: softmax ignores a
# constant per query) and ~1e-13 in practice, hence the floor relative to the
# largest gradient in the model.
LOGITS_RTOL = 1e-4  # max |logits - ref| <= 1e-4 * max |ref logits|
LOSS_RTOL = 1e-5  # |loss - cross_entropy(logits)| <= 1e-5 * |that| + 1e-6
GRAD_RTOL = 1e-4  # per parameter: max |g - g_ref| <= 1e-4 * max |g_ref| of it
GRAD_FLOOR = 1e-6  # ... + 1e-6 * max |g_ref| over the whole model
BACKWARD_TOL = 1e-9  # float64 autograd Functions: max |g - g_ref| <= 1e-9 (1 + max)
INIT_LOSS_MARGIN = 0.1  # clean model: ln(vocab) + 0.003 .. 0.017 over seeds 0-5
GREEDY_TOL = 1e-5  # a generated token's reference logit may trail the max by this


class CheckFailed(Exception):
    """A check's verdict with its one-line, location-free reason."""


def describe(error: BaseException) -> str:
    """Exception type and the first line of its message, as Python would print it."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Events:
    def __init__(self, path: str):
        self._file = open(path, "w")

    def emit(self, **event) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()


# ----------------------------------------------------------------------------- helpers


def build(module, seed: int = SEED):
    torch.manual_seed(seed)
    return module.Transformer(**CONFIG)


def _attribute(model, name: str):
    """The tensor at a dotted state-dict name, found by attribute and index even when
    it is not registered (a weight kept in a plain list), or None."""
    obj = model
    try:
        for part in name.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return obj if torch.is_tensor(obj) else None


def copy_weights(src, dst) -> None:
    """Copy every state-dict entry of `src` into the tensor of `dst` with the same
    name and shape, registered or not; anything else in `dst` keeps its value. So a
    registration bug does not also make the forward checks compare other weights."""
    dst_state = dst.state_dict()
    with torch.no_grad():
        for name, value in src.state_dict().items():
            target = dst_state.get(name)
            if target is None:
                target = _attribute(dst, name)
            if torch.is_tensor(target) and target.shape == value.shape:
                target.copy_(value)


def spread(model):
    """Move every parameter by noise of std SPREAD, the same for any model with the
    same parameter names and shapes. At init, attention is close to uniform and a
    bug in the queries or keys barely moves the logits; spread weights make every
    layer count."""
    g = torch.Generator().manual_seed(SPREAD_SEED)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * SPREAD)
    return model


def reference_and(candidate_module):
    """The reference model with spread weights, and the candidate's model with the
    same weights copied in."""
    reference = spread(build(ref))
    candidate = build(candidate_module)
    copy_weights(reference, candidate)
    return reference, candidate


def batch(size: int, length: int, seed: int):
    """A demo batch cropped to `length`: inputs and targets, -1 where unpredictable."""
    x, y = ref.make_batch(size, VOCAB, BLOCK, torch.Generator().manual_seed(seed))
    return x[:, :length].contiguous(), y[:, :length].contiguous()


def scattered_targets(size: int, length: int, seed: int):
    """Random tokens and targets with about a third of the targets ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (size, length), generator=g)
    y = torch.randint(VOCAB, (size, length), generator=g)
    y[torch.rand(size, length, generator=g) < 0.3] = -1
    return x, y


def greedy(model, idx, max_new_tokens):
    """The reference's greedy decoding, run on any model's forward."""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -BLOCK:])[0]
            next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, next_id), dim=1)
    return idx


def decoding_with(generate):
    """A stand-in model for `evaluate`: the vocabulary size and a generate function."""
    return types.SimpleNamespace(
        tok_emb=types.SimpleNamespace(num_embeddings=VOCAB),
        block_size=BLOCK,
        generate=generate,
    )


def half_right_model():
    """A fake model whose generations continue the prompt's period exactly for
    prompts starting with an even token, and end one token wrong for the others."""

    def generate(idx, max_new_tokens):
        T = idx.size(1)
        reps = (T + max_new_tokens) // T + 1
        out = idx.repeat(1, reps)[:, : T + max_new_tokens].clone()
        wrong = idx[:, 0] % 2 == 1
        out[wrong, -1] = (out[wrong, -1] + 1) % VOCAB
        return out

    return decoding_with(generate)


def max_abs(t) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def close(actual, expected, rtol: float, atol: float = 0.0) -> bool:
    """max |actual - expected| <= rtol * max |expected| + atol, same shape, and NaN or
    infinity only where the expected has them too."""
    if not torch.is_tensor(actual) or actual.shape != expected.shape:
        return False
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return False
    if not finite.any():
        return True
    diff = (a[finite] - e[finite]).abs().max().item()
    return diff <= rtol * e[finite].abs().max().item() + atol


# ----------------------------------------------------------------------------- checks


def check_api(cand) -> str:
    missing = [
        n
        for n in ("Transformer", "train", "evaluate", "make_batch")
        if not callable(getattr(cand, n, None))
    ]
    if missing:
        raise CheckFailed(f"the file defines no {', '.join(missing)}")
    model = build(cand)
    for size, length in SHAPES:
        x, y = batch(size, length, seed=11)
        out = model(x, y)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise CheckFailed("forward must return (logits, loss)")
        logits, loss = out
        want = (size, length, VOCAB)
        if not torch.is_tensor(logits) or tuple(logits.shape) != want:
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits)
            raise CheckFailed(f"logits for input {(size, length)}: {got}, want {want}")
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise CheckFailed("the loss with targets must be a scalar tensor")
        if model(x)[1] is not None:
            raise CheckFailed("the loss without targets must be None")
    prompt = torch.randint(VOCAB, (2, 5), generator=torch.Generator().manual_seed(12))
    out = model.generate(prompt, 4)
    if not torch.is_tensor(out) or tuple(out.shape) != (2, 9):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out)
        raise CheckFailed(f"generate((2, 5), 4) gave {got}, want (2, 9)")
    if out.dtype.is_floating_point or not torch.equal(out[:, :5], prompt):
        raise CheckFailed("generate must return the prompt's token ids, then new ones")
    x, y = cand.make_batch(4, VOCAB, BLOCK, torch.Generator().manual_seed(13))
    if tuple(x.shape) != (4, BLOCK) or tuple(y.shape) != (4, BLOCK):
        raise CheckFailed(
            "make_batch must return inputs and targets of (B, block_size)"
        )
    return ""


def check_parameters(cand) -> str:
    reference = dict(build(ref).named_parameters())
    candidate = dict(build(cand).named_parameters())
    missing = [n for n in reference if n not in candidate]
    extra = [n for n in candidate if n not in reference]
    shapes = [
        n
        for n in reference
        if n in candidate and reference[n].shape != candidate[n].shape
    ]
    frozen = [n for n, p in candidate.items() if not p.requires_grad]
    problems = [
        f"{len(missing)} of {len(reference)} not registered" if missing else "",
        f"{len(extra)} not in the reference" if extra else "",
        f"{len(shapes)} of the wrong shape" if shapes else "",
        f"{len(frozen)} not trainable" if frozen else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckFailed("parameters: " + ", ".join(problems))
    return f"{len(reference)} parameters"


def check_init(cand) -> str:
    """The candidate's initial weights, scored by the reference model: init alone."""
    scorer = build(ref)
    copy_weights(build(cand), scorer)
    x, y = batch(64, BLOCK, seed=3)
    with torch.no_grad():
        loss = scorer(x, y)[1].item()
    target = math.log(VOCAB)
    detail = f"initial loss {loss:.3f}, ln(vocab) = {target:.3f}"
    if not math.isfinite(loss) or abs(loss - target) > INIT_LOSS_MARGIN:
        raise CheckFailed(detail)
    return detail


def check_logits(cand) -> str:
    reference, candidate = reference_and(cand)
    with torch.no_grad():
        for size, length in SHAPES:
            x, _ = batch(size, length, seed=21)
            expected = reference(x)[0]
            actual = candidate(x)[0]
            if not close(actual, expected, LOGITS_RTOL):
                raise CheckFailed(
                    f"logits differ for input {(size, length)}"
                    f" (tolerance {LOGITS_RTOL:g} of the largest)"
                )
    return f"identical weights, tolerance {LOGITS_RTOL:g} of the largest"


def check_loss(cand) -> str:
    """The candidate's loss against cross-entropy of the candidate's own logits."""
    _, candidate = reference_and(cand)
    with torch.no_grad():
        inputs = [batch(16, BLOCK, seed=31), scattered_targets(3, 7, seed=32)]
        for x, y in inputs:
            logits, loss = candidate(x, y)
            expected = F.cross_entropy(
                logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-1
            )
            if not torch.is_tensor(loss) or not close(
                loss.reshape(()), expected, LOSS_RTOL, 1e-6
            ):
                raise CheckFailed(
                    "the loss is not the mean cross-entropy over the targets"
                    " that are not -1"
                )
        if candidate(inputs[0][0])[1] is not None:
            raise CheckFailed("the loss without targets must be None")
    return f"tolerance {LOSS_RTOL:g}"


def check_gradients(cand) -> str:
    reference, candidate = reference_and(cand)
    expected_params = dict(reference.named_parameters())
    actual_params = dict(candidate.named_parameters())
    bad = set()
    for x, y in (batch(16, BLOCK, seed=41), scattered_targets(4, 7, seed=42)):
        for model in (reference, candidate):
            model.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
        floor = GRAD_FLOOR * max(max_abs(p.grad) for p in expected_params.values())
        for name, p in expected_params.items():
            q = actual_params.get(name)
            if (
                q is None
                or q.grad is None
                or not close(q.grad, p.grad, GRAD_RTOL, floor)
            ):
                bad.add(name)
    tolerance = (
        f"tolerance {GRAD_RTOL:g} of each parameter's largest entry"
        f" + {GRAD_FLOOR:g} of the model's"
    )
    if bad:
        raise CheckFailed(
            f"{len(bad)} of {len(expected_params)} parameter gradients differ"
            f" ({tolerance})"
        )
    return tolerance


class _Ctx:
    """Stands in for autograd's ctx when a Function's forward is called directly."""

    def __init__(self, n_inputs: int):
        self.needs_input_grad = (True,) * n_inputs
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def mark_dirty(self, *args):
        pass

    def set_materialize_grads(self, value):
        pass


def _function_inputs() -> dict[str, list[tuple]]:
    """Float64 test inputs for each autograd Function of the reference, 2 and 4 shards."""
    g = torch.Generator().manual_seed(51)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    return {
        "CopyToShards": [(t(2, 3, 8), 2), (t(2, 3, 8), 4)],
        "ReduceFromShards": [
            (t(2, 3, 8), t(2, 3, 8)),
            tuple(t(2, 3, 8) for _ in "abcd"),
        ],
        "SplitToShards": [(t(2, 3, 8), 2), (t(2, 3, 8), 4)],
        "GatherFromShards": [
            (t(2, 3, 4), t(2, 3, 4)),
            tuple(t(2, 3, 2) for _ in "abcd"),
        ],
        "LinearShard": [(t(2, 3, 8), t(5, 8)), (t(4, 8), t(6, 8))],
    }


def reference_functions() -> list[str]:
    return sorted(
        name
        for name, obj in vars(ref).items()
        if isinstance(obj, type)
        and issubclass(obj, torch.autograd.Function)
        and obj.__module__ == ref.__name__
    )


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def function_gradients(cls, inputs, cotangent_seed: int, direct: bool = False):
    """Gradients of sum(out * cotangent) w.r.t. the tensor inputs, through
    `cls.apply` (its own backward) or, `direct`, through autograd of its forward."""
    tensors = [a for a in inputs if torch.is_tensor(a)]
    if direct:
        outs = _as_tuple(cls.forward(_Ctx(len(inputs)), *inputs))
    else:
        outs = _as_tuple(cls.apply(*inputs))
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [
        torch.randn(o.shape, generator=g, dtype=o.dtype) if o.requires_grad else None
        for o in outs
    ]
    pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        tensors,
        grad_outputs=[c for _, c in pairs],
        allow_unused=True,
    )
    return outs, [
        torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)
    ]


def check_backward(cand) -> str:
    """Each custom backward against autograd's derivative of the reference forward."""
    names = reference_functions()
    inputs = _function_inputs()
    bad = []
    for name in names:
        cls = getattr(cand, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
            bad.append(name)
            continue
        for i, args in enumerate(inputs[name]):
            try:
                _, actual = function_gradients(cls, args, 52 + i)
            except Exception:
                bad.append(name)
                break
            _, expected = function_gradients(getattr(ref, name), args, 52 + i, True)
            if len(actual) != len(expected) or not all(
                close(a, e, BACKWARD_TOL, BACKWARD_TOL)
                for a, e in zip(actual, expected)
            ):
                bad.append(name)
                break
    if bad:
        raise CheckFailed(
            f"{len(bad)} of {len(names)} autograd Functions give other gradients"
        )
    return f"{len(names)} Functions, float64, tolerance {BACKWARD_TOL:g}"


def check_generation(cand) -> str:
    """Greedy continuations of held-out prompts, with identical weights: every
    generated token must be the reference's argmax for the text before it (ties
    within GREEDY_TOL allowed, so float noise cannot flip a verdict); and `evaluate`
    must score a model as the reference's does."""
    reference, candidate = reference_and(cand)
    g = torch.Generator().manual_seed(61)
    prompts = [
        (torch.randint(VOCAB, (40, ref.PERIOD), generator=g), ref.EVAL_NEW_TOKENS),
        (torch.randint(VOCAB, (8, 12), generator=g), 10),
    ]
    wrong = 0
    total = 0
    for prompt, n in prompts:
        out = candidate.generate(prompt, n)
        B, T = prompt.shape
        if not torch.is_tensor(out) or tuple(out.shape) != (B, T + n):
            raise CheckFailed("generate returns the wrong shape")
        if not torch.equal(out[:, :T], prompt):
            raise CheckFailed("generate does not keep the prompt")
        bad = torch.zeros(B, dtype=torch.bool)
        with torch.no_grad():
            for t in range(T, T + n):
                logits = reference(out[:, :t][:, -BLOCK:])[0][:, -1, :]
                chosen = logits.gather(1, out[:, t : t + 1].long()).squeeze(1)
                bad |= chosen < logits.max(dim=-1).values - GREEDY_TOL
        wrong += int(bad.sum())
        total += B
    if wrong:
        raise CheckFailed(f"{wrong} of {total} continuations differ")
    stub = half_right_model()
    expected = ref.evaluate(stub)
    actual = cand.evaluate(stub)
    if not isinstance(actual, (int, float)) or abs(actual - expected) > 1e-9:
        raise CheckFailed("evaluate scores a model differently")
    return f"{total} prompts"


def check_training(cand) -> str:
    """The candidate's own init and `train` (its loop and batches are part of the
    exercise); accuracy measured by the reference `evaluate` with the reference's
    greedy decoding on the trained model's forward, so a bug in the candidate's
    `generate` or `evaluate` does not count here (the generation check has those)."""
    model = build(cand)
    cand.train(model)
    accuracy = ref.evaluate(decoding_with(lambda idx, n: greedy(model, idx, n)))
    detail = (
        f"continues {accuracy:.0%} of held-out patterns,"
        f" target {ref.TARGET_ACCURACY:.0%}"
    )
    if accuracy < ref.TARGET_ACCURACY:
        raise CheckFailed(detail)
    return detail


CHECK_FUNCTIONS = {
    "api": check_api,
    "parameters": check_parameters,
    "init": check_init,
    "logits": check_logits,
    "loss": check_loss,
    "gradients": check_gradients,
    "backward": check_backward,
    "generation": check_generation,
    "training": check_training,
}
assert tuple(CHECK_FUNCTIONS) == CHECK_IDS, "tools.check.CHECKS and the worker disagree"


def run_checks(path: str, events: Events) -> None:
    try:
        source = Path(path).read_text()
        cand = load_source(source, "bugforge_candidate", path, register=True)
    except SyntaxError as e:
        events.emit(
            event="load-error", message=f"SyntaxError: {e.msg} (line {e.lineno})"
        )
        return
    except BaseException as e:  # noqa: BLE001 - SystemExit at import is theirs too
        if isinstance(e, KeyboardInterrupt):
            raise
        events.emit(event="load-error", message=describe(e))
        return
    events.emit(event="loaded")
    for check_id, fn in CHECK_FUNCTIONS.items():
        events.emit(event="start", check=check_id)
        try:
            status, detail = "pass", fn(cand)
        except CheckFailed as e:
            status, detail = "fail", str(e)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            status, detail = "error", describe(e)
        events.emit(event="result", check=check_id, status=status, detail=detail)


# ----------------------------------------------------------------------------- judge


class Observation:
    """One probe's result; `same` says whether two agree up to the probe's tolerance."""

    def __init__(self, value, rtol: float = 0.0):
        self.value = value
        self.rtol = rtol

    def same(self, other: Observation) -> bool:
        return _same(self.value, other.value, self.rtol)


def _same(a, b, rtol: float) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
            return False
        if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
            return a.dtype.is_floating_point == b.dtype.is_floating_point and bool(
                torch.equal(a, b)
            )
        scale = max(max_abs(a[torch.isfinite(a)]), max_abs(b[torch.isfinite(b)]))
        return close(a, b, 0.0, rtol * scale + 1e-12) and close(
            b, a, 0.0, rtol * scale + 1e-12
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12
    return type(a) is type(b) and a == b


class InitObservation(Observation):
    """Initial parameters over several seeds. Equal values agree; otherwise each
    parameter's pooled mean and spread must agree (std within 10%, mean within 10%
    of the std), so an init written differently but drawing from the same
    distribution agrees and a wrong scale or a missing init does not."""

    def same(self, other) -> bool:
        a, b = self.value, other.value
        if not isinstance(a, dict) or not isinstance(b, dict) or a.keys() != b.keys():
            return _same(a, b, 0.0)
        for name in a:
            x, y = a[name], b[name]
            if x.shape != y.shape:
                return False
            if close(x, y, 1e-6, 1e-9):
                continue
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                return False
            sx, sy = x.double().std().item(), y.double().std().item()
            mx, my = x.double().mean().item(), y.double().mean().item()
            if max(sx, sy) < 1e-9:
                if abs(mx - my) > 1e-6:
                    return False
                continue
            if abs(sx - sy) > 0.1 * max(sx, sy) or abs(mx - my) > 0.1 * max(sx, sy):
                return False
        return True


class GradientsObservation(Observation):
    """Parameter gradients by name, compared as `check_gradients` does: relative to
    each parameter's largest entry, with a floor relative to the whole model's."""

    def same(self, other) -> bool:
        a, b = self.value, other.value
        if a.keys() != b.keys():
            return False
        largest = max(
            [max_abs(g) for g in (*a.values(), *b.values()) if torch.is_tensor(g)],
            default=0.0,
        )
        floor = GRAD_FLOOR * largest
        for name in a:
            x, y = a[name], b[name]
            if not (torch.is_tensor(x) and torch.is_tensor(y)):
                if torch.is_tensor(x) or torch.is_tensor(y):
                    return False
                continue
            if not (close(x, y, GRAD_RTOL, floor) and close(y, x, GRAD_RTOL, floor)):
                return False
        return True


def _error(e: BaseException) -> Observation:
    return Observation(("error", type(e).__name__))


def fingerprint(module, clean_module) -> dict[str, Observation]:
    """What a module does, probe by probe, where only one function of it may differ
    from the clean module. Probes of one function run it with clean code around it
    where that removes float noise: `train` trains a clean model, `generate` decodes
    with the clean forward."""
    probes = {}

    def probe(name, fn, cls=Observation, rtol=0.0):
        try:
            probes[name] = cls(fn(), rtol)
        except Exception as e:  # the module's own failure is an observation
            probes[name] = _error(e)

    def constants():
        out = {}
        for name, value in vars(clean_module).items():
            if name.isupper() and isinstance(value, (int, float, str, dict, tuple)):
                out[name] = repr(getattr(module, name, "<missing>"))
        return out

    def signatures():
        out = {}
        for name, obj in vars(clean_module).items():
            if getattr(obj, "__module__", None) != clean_module.__name__:
                continue
            mine = getattr(module, name, None)
            if isinstance(obj, type):
                for attr in vars(obj):
                    if callable(getattr(obj, attr)) and not attr.startswith("__"):
                        out[f"{name}.{attr}"] = _signature(getattr(mine, attr, None))
                out[name] = _signature(mine)
            elif callable(obj):
                out[name] = _signature(mine)
        return out

    def _signature(obj):
        try:
            return str(inspect.signature(obj))
        except (TypeError, ValueError):
            return repr(obj)

    def init():
        out = {}
        for seed in range(4):
            for name, p in build(module, seed).named_parameters():
                out.setdefault(name, []).append(p.detach().clone())
        return {name: torch.stack(values) for name, values in out.items()}

    def trainable():
        return {n: p.requires_grad for n, p in build(module).named_parameters()}

    def buffers():
        return {n: b.clone() for n, b in build(module).named_buffers()}

    clean_model = spread(build(clean_module))

    def with_clean_weights():
        model = build(module)
        copy_weights(clean_model, model)
        return model

    def forward():
        model = with_clean_weights()
        out = {}
        with torch.no_grad():
            for i, (size, length) in enumerate(SHAPES):
                x, y = batch(size, length, seed=71)
                logits, loss = model(x, y)
                out[f"logits{i}"] = logits
                out[f"loss{i}"] = loss
                out[f"none{i}"] = model(x)[1] is None
            x, y = scattered_targets(3, 7, seed=72)
            out["loss-scattered"] = model(x, y)[1]
        return out

    def gradients():
        model = with_clean_weights()
        x, y = batch(16, BLOCK, seed=73)
        model(x, y)[1].backward()
        return {n: p.grad for n, p in model.named_parameters()}

    def functions():
        inputs = _function_inputs()
        out = {}
        for name in reference_functions():
            cls = getattr(module, name)
            for i, args in enumerate(inputs[name]):
                outs, grads = function_gradients(cls, args, 74 + i)
                out[f"{name}{i}"] = (list(outs), grads)
        return out

    def generate():
        g = torch.Generator().manual_seed(75)
        idx = torch.randint(VOCAB, (20, ref.PERIOD), generator=g)
        longer = torch.randint(VOCAB, (4, 12), generator=g)
        decode = module.Transformer.generate
        return [
            decode(clean_model, idx, ref.EVAL_NEW_TOKENS),
            decode(clean_model, longer, 8),
        ]

    def make_batch():
        return list(
            module.make_batch(8, VOCAB, BLOCK, torch.Generator().manual_seed(76))
        )

    def train():
        model = build(clean_module)
        losses = module.train(model, steps=5)
        return [float(v) for v in losses], {
            n: p.detach().clone() for n, p in model.named_parameters()
        }

    def evaluate():
        return float(module.evaluate(half_right_model()))

    probe("constants", constants)
    probe("signatures", signatures)
    probe("init", init, InitObservation)
    probe("trainable", trainable)
    probe("buffers", buffers, rtol=1e-5)
    probe("forward", forward, rtol=LOGITS_RTOL)
    probe("gradients", gradients, GradientsObservation)
    probe("functions", functions, rtol=1e-9)
    probe("generate", generate)
    probe("make_batch", make_batch)
    probe("train", train, rtol=1e-5)
    probe("evaluate", evaluate)
    return probes


def agree(a: dict[str, Observation], b: dict[str, Observation]) -> bool:
    return a.keys() == b.keys() and all(
        type(a[k]) is type(b[k]) and a[k].same(b[k]) for k in a
    )


def judge(job_path: str, events: Events) -> None:
    """For each unit (a function or statement of the clean model holding planted
    sites), the job gives the hybrid source (the clean model with the candidate's
    version of that unit) and, for every non-empty subset of the unit's sites, the
    clean model with just those bugs planted. The hybrid agreeing with the clean
    model on every probe means all the unit's bugs are fixed; agreeing with the
    subset variant U means exactly U's bugs are still there (with several such U,
    the sites in all of them are not fixed and those in some are "unclear");
    agreeing with none means at least one is not fixed: the one site, or, of
    several, "unclear" which.
    """
    job = json.loads(Path(job_path).read_text())
    clean_module = load_source(job["clean"], "bugforge_clean", "<clean>", register=True)
    clean_fp = fingerprint(clean_module, clean_module)
    for index, unit in enumerate(job["units"]):
        if index < job.get("skip", 0):
            continue
        events.emit(event="start", unit=index)
        sites = unit["sites"]
        try:
            hybrid = load_source(
                unit["hybrid"], f"bugforge_hybrid{index}", "<hybrid>", register=True
            )
            hybrid_fp = fingerprint(hybrid, clean_module)
        except Exception as e:  # noqa: BLE001 - their code fails to even define itself
            note = f"your version does not run in the clean model ({describe(e)})"
            events.emit(event="unit", unit=index, **_not_fixed(sites), note=note)
            continue
        if agree(hybrid_fp, clean_fp):
            events.emit(event="unit", unit=index, fixed=sites, unfixed=[], unclear=[])
            continue
        agreeing = []
        for n, variant in enumerate(unit["variants"]):
            name = f"bugforge_variant{index}_{n}"
            module = load_source(variant["source"], name, "<variant>", register=True)
            if agree(hybrid_fp, fingerprint(module, clean_module)):
                agreeing.append(set(variant["unfixed"]))
        if not agreeing:
            note = "behaves like neither the reference nor the planted bugs"
            events.emit(event="unit", unit=index, **_not_fixed(sites), note=note)
            continue
        # Several subsets can look alike (a crash hides what comes after it): credit
        # no fix that cannot be seen.
        surely = set.intersection(*agreeing)
        maybe = set.union(*agreeing) - surely
        events.emit(
            event="unit",
            unit=index,
            fixed=[s for s in sites if s not in surely | maybe],
            unfixed=[s for s in sites if s in surely],
            unclear=[s for s in sites if s in maybe],
            note="its behaviour fits more than one set of remaining bugs"
            if maybe
            else "",
        )


def _not_fixed(sites: list[str]) -> dict:
    """A unit that is still wrong: its one site is not fixed; of several, which ones
    are cannot be told."""
    if len(sites) == 1:
        return {"fixed": [], "unfixed": sites, "unclear": []}
    return {"fixed": [], "unfixed": [], "unclear": sites}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.check_worker")
    parser.add_argument("mode", choices=("check", "judge"))
    parser.add_argument("path")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    events = Events(args.result)
    try:
        if args.mode == "check":
            run_checks(args.path, events)
        else:
            judge(args.path, events)
    except Exception:
        events.emit(event="internal-error", traceback=traceback.format_exc())
        return 3
    events.emit(event="done")
    return 0


if __name__ == "__main__":
    # os._exit: skip interpreter teardown, which a candidate's module can hang.
    import os

    code = main()
    sys.stdout.flush()
    os._exit(code)
