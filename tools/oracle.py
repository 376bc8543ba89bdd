"""The behavioural oracle: train a model source on the demo and say how it did.

It sits beside the data path, not inside it. `measure` runs one source (the clean
model, a single-bug variant, a whole exercise file) under one seed: the source is
executed in a fresh module namespace, the model is built and trained with the
SOURCE's `Transformer` and `train`, and judged with the CLEAN module's `evaluate`
plus a teacher-forced accuracy on clean `make_batch` data, so a mutated evaluation
cannot hide a bug. `classify` turns what was seen into one verdict. `measure_many`
runs many (source, seed) pairs in worker processes and keeps each result in an
on-disk cache keyed by everything the result depends on.

Nothing here imports torch at module import: `bugforge --help` loads this module.

Why three seeds are enough. DeepCrime (Humbatova et al., ISSTA 2021) decides that a
mutant is killed by training it 20 times and testing the accuracy distributions
against the original's with a statistical test, because a mutant may sit close to
the threshold. We train each site under only MIN_SEEDS = 3 seeds, which is enough
only for verdicts far from the threshold; so a site counts as killed only if EVERY
seed fails AND every seed's generation accuracy stays below KILL_MARGIN_ACCURACY
(0.5, against a target of 0.9). The clean model sits at the other end: 1.00 under
every oracle seed (0.99 at worst over seeds 0-9), final loss ~0.001. Measured on the
first 48 sites when this was written: every site whose three seeds all stayed below
0.5 topped out at 0.20, while the five that failed all three seeds but reached
0.60-0.80 under one of them were exactly the risky ones: under seeds 0-9, three of
them met the target under some seed (accuracy 0.98, 0.92, 0.98) and a fourth reached
0.89. A run either learns the task's copy-back mechanism or stays far from it, so
three seeds far below the target say what twenty would; one seed anywhere near it
does not, and such a "close call" is not a kill (exclude it, or narrow the rule).
`bugforge verify` prints the margin: the clean model's lowest accuracy against the
highest accuracy any killed site reaches under any seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

SEEDS = (0, 1, 2)
# A site is killed only if it fails under every one of at least this many seeds.
MIN_SEEDS = 3
# "no-learning": the final loss is still within 10% of the loss at chance,
# ln(vocab_size) on the predictable positions (or above it).
NO_LEARNING_FRACTION = 0.9
# The final loss is the mean of the last LOSS_TAIL training steps (one step is noisy).
LOSS_TAIL = 10
# The teacher-forced accuracy is measured on clean make_batch data from this seed,
# apart from the training seeds and from evaluate()'s own seed.
TEACHER_FORCED_SEED = 4321
# One run takes 1.5 to 3 s; a mutant still running after this long is hanging.
RUN_TIMEOUT = 60.0
# Tiny model: more threads only add overhead, and one thread keeps runs bitwise
# reproducible between the test suite, the worker processes and the cache.
NUM_THREADS = 1
# A site is killed only if its generation accuracy stays below this under every
# seed: far from the target, so that three seeds are enough (see above). A site that
# fails every seed but reaches it under one is a "close call", not a kill.
KILL_MARGIN_ACCURACY = 0.5

FAILURES = ("crash", "nan", "no-learning", "degraded", "wrong-generation")
VERDICTS = (*FAILURES, "survived")
CLEAN_LABEL = "<clean>"


@dataclass
class Run:
    """What one training run of one source under one seed showed."""

    seed: int
    verdict: str  # one of VERDICTS
    final_loss: float  # mean of the last LOSS_TAIL losses; nan when none or non-finite
    accuracy: float | None  # generation accuracy (clean evaluate); None if not reached
    # fraction of sequences whose every predictable next token is the argmax
    teacher_forced: float | None
    steps: int  # training steps that ran
    error: str | None  # "TypeError: message" for a crash
    seconds: float
    target: float  # the demo's TARGET_ACCURACY
    chance_loss: float  # ln(vocab_size)
    losses: list[float] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.verdict != "survived"

    @property
    def failed_by_margin(self) -> bool:
        """Failed, and far from the target: what a kill needs under every seed."""
        return self.failed and (self.accuracy or 0.0) < KILL_MARGIN_ACCURACY

    @property
    def error_type(self) -> str | None:
        return self.error.split(":", 1)[0] if self.error else None

    def describe(self) -> str:
        if self.verdict == "crash":
            return f"crash ({self.error_type})"
        return self.verdict

    def to_json(self) -> dict:
        data = asdict(self)
        data["final_loss"] = finite_or_none(self.final_loss)
        data["losses"] = [finite_or_none(x) for x in self.losses]
        return data

    @classmethod
    def from_json(cls, data: dict) -> Run:
        data = dict(data)
        data["final_loss"] = _nan_if_none(data["final_loss"])
        data["losses"] = [_nan_if_none(x) for x in data["losses"]]
        return cls(**data)


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if x is not None and math.isfinite(x) else None


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


# ------------------------------------------------------------------ classification


def final_loss(losses: list[float]) -> float:
    tail = losses[-LOSS_TAIL:]
    if not tail or not all(math.isfinite(x) for x in tail):
        return math.nan
    return sum(tail) / len(tail)


def classify(
    *,
    error: str | None,
    losses: list[float],
    accuracy: float | None,
    teacher_forced: float | None,
    target: float,
    chance_loss: float,
) -> str:
    """One verdict from what a run showed; the first that applies wins."""
    if error is not None:
        return "crash"
    if not all(math.isfinite(x) for x in losses):
        return "nan"
    if accuracy is None:
        raise ValueError("a run without an error must have a generation accuracy")
    if accuracy >= target:
        return "survived"
    if not losses or final_loss(losses) >= NO_LEARNING_FRACTION * chance_loss:
        return "no-learning"  # (no loss at all: no training step ran)
    if teacher_forced is not None and teacher_forced >= target:
        return "wrong-generation"
    return "degraded"


@dataclass
class SiteResult:
    """Every seed's run of one source, and the verdict over all of them."""

    label: str  # site id, or "<clean>"
    runs: list[Run]

    @property
    def killed(self) -> bool:
        """Failed by the margin under every seed, and there were at least MIN_SEEDS."""
        return len(self.runs) >= MIN_SEEDS and all(
            r.failed_by_margin for r in self.runs
        )

    @property
    def close_call(self) -> bool:
        """Failed under every seed, but not by the margin under some seed."""
        return (
            bool(self.runs)
            and all(r.failed for r in self.runs)
            and not all(r.failed_by_margin for r in self.runs)
        )

    @property
    def passed(self) -> bool:
        """Met the target under every seed (what the clean model must do)."""
        return bool(self.runs) and not any(r.failed for r in self.runs)

    @property
    def verdict(self) -> str:
        """`survived` if any seed survived, else the most common failure."""
        if any(not r.failed for r in self.runs):
            return "survived"
        counts = Counter(r.describe() for r in self.runs)
        order = {v: i for i, v in enumerate(VERDICTS)}
        return min(counts, key=lambda d: (-counts[d], order.get(d.split(" ")[0], 0), d))

    @property
    def final_loss(self) -> float:
        losses = [r.final_loss for r in self.runs if math.isfinite(r.final_loss)]
        return sum(losses) / len(losses) if losses else math.nan

    @property
    def max_accuracy(self) -> float:
        """The best generation accuracy under any seed (0 for a run without one)."""
        return max((r.accuracy or 0.0 for r in self.runs), default=0.0)

    @property
    def min_accuracy(self) -> float:
        return min((r.accuracy or 0.0 for r in self.runs), default=0.0)


def exclusion_reason(result: SiteResult) -> str:
    """Why a site is not killed, as measured: to paste into mutations/excluded.py."""
    accuracies = " ".join(f"{r.accuracy or 0.0:.2f}" for r in result.runs)
    seeds = ",".join(str(r.seed) for r in result.runs)
    measured = f"accuracy {accuracies} under seeds {seeds}"
    if len(result.runs) < MIN_SEEDS:
        return f"too few seeds: {measured}"
    if result.close_call:
        return f"close call: {measured}, a kill needs each < {KILL_MARGIN_ACCURACY:.2f}"
    target = result.runs[0].target
    return f"survived: {measured}, target {target:.2f}"


# -------------------------------------------------------------------- measurement


class _NonFinite(BaseException):
    """Raised by the forward hook to stop training at the first non-finite loss.

    A BaseException so that an `except Exception` in the mutant cannot swallow it."""


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise _Timeout in this thread after `seconds` (main thread, POSIX only).

    The alarm interrupts Python code, where a hanging mutant loops; elsewhere
    (a non-main thread, Windows) runs go without a deadline."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_source(
    source: str,
    name: str = "bugforge_mutant",
    filename: str | None = None,
    register: bool = False,
) -> types.ModuleType:
    """Execute `source` as a fresh module called `name` (so its `__main__` code never
    runs), registered in sys.modules only if asked; `filename` shows in tracebacks."""
    filename = filename or f"<{name}>"
    code = compile(source, filename, "exec")
    module = types.ModuleType(name)
    module.__file__ = filename
    if register:
        sys.modules[name] = module
    exec(code, module.__dict__)
    return module


def teacher_forced_accuracy(model, clean) -> float:
    """Fraction of clean make_batch sequences whose every predictable next token is
    the model's argmax when it sees the true prefix (no generation involved)."""
    import torch

    config = clean.DEMO_CONFIG
    generator = torch.Generator().manual_seed(TEACHER_FORCED_SEED)
    x, y = clean.make_batch(
        clean.EVAL_PROMPTS, config["vocab_size"], config["block_size"], generator
    )
    with torch.no_grad():
        logits, _ = model(x)
    hit = (logits.argmax(dim=-1) == y) | (y == -1)
    return hit.all(dim=1).float().mean().item()


def measure(source: str, seed: int, timeout: float | None = RUN_TIMEOUT) -> Run:
    """Train `source`'s model on the demo under `seed` and classify the outcome."""
    import torch

    from clean_model import transformer as clean

    # a mutant's module-level code may have changed global state in this process
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(NUM_THREADS)
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)
    recorded: list[float] = []
    training = [True]

    def watch(module, inputs, output):
        # Records the training losses even if `train` never returns them, and stops
        # at the first non-finite one: nothing after a NaN can recover.
        loss = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if training[0] and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.item()
            recorded.append(value)
            if not math.isfinite(value):
                raise _NonFinite()

    error = None
    losses: list[float] = []
    accuracy = teacher_forced = None
    start = time.perf_counter()
    try:
        with _deadline(timeout):
            mutant = load_source(source)
            torch.manual_seed(seed)
            model = mutant.Transformer(**clean.DEMO_CONFIG)
            model.register_forward_hook(watch)
            returned = mutant.train(model, seed=seed)
            training[0] = False
            try:
                losses = [float(x) for x in returned]
            except (TypeError, ValueError):
                losses = []
            losses = losses or recorded
            if all(math.isfinite(x) for x in losses):
                teacher_forced = teacher_forced_accuracy(model, clean)
                accuracy = clean.evaluate(model)
    except _NonFinite:
        losses = recorded
    except _Timeout:
        error = f"Timeout: no result within {timeout:g} s"
        losses = recorded
    except Exception as e:  # the mutant's own failure is the measurement
        error = f"{type(e).__name__}: {e}"
        losses = recorded
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(True)
    chance_loss = math.log(clean.DEMO_CONFIG["vocab_size"])
    verdict = classify(
        error=error,
        losses=losses,
        accuracy=accuracy,
        teacher_forced=teacher_forced,
        target=clean.TARGET_ACCURACY,
        chance_loss=chance_loss,
    )
    return Run(
        seed=seed,
        verdict=verdict,
        final_loss=final_loss(losses),
        accuracy=accuracy,
        teacher_forced=teacher_forced,
        steps=len(losses),
        error=error if error is None else error[:300],
        seconds=round(time.perf_counter() - start, 3),
        target=clean.TARGET_ACCURACY,
        chance_loss=chance_loss,
        losses=losses,
    )


# -------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$BUGFORGE_CACHE_DIR, else $XDG_CACHE_HOME/bugforge, else ~/.cache/bugforge."""
    explicit = os.environ.get("BUGFORGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bugforge"


def oracle_config() -> dict:
    """Everything about the measurement that a verdict depends on, besides the sources
    and the seed. Reading it never imports torch."""
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "unknown"
    return {
        # any change to this file (the measurement) invalidates every verdict
        "oracle_source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "no_learning_fraction": NO_LEARNING_FRACTION,
        "loss_tail": LOSS_TAIL,
        "teacher_forced_seed": TEACHER_FORCED_SEED,
        "timeout": RUN_TIMEOUT,
        "threads": NUM_THREADS,
        "torch": torch_version,
    }


def run_key(
    clean_source: str,
    rule_source: str,
    site_id: str,
    seed: int,
    config: dict | None = None,
) -> str:
    """Hash of (clean source, rule source, oracle config, site id, seed); the rule
    source is whatever shapes the mutant besides the clean source (a digest of the
    rule's module and the engine: see tools.verify.rule_source)."""
    payload = json.dumps(
        [clean_source, rule_source, config or oracle_config(), site_id, seed],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class Cache:
    """One JSON file per verdict under `root`/verdicts; written atomically."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self.hits = 0
        self.misses = 0
        self.write_error: OSError | None = None  # after one, nothing more is written

    def _path(self, key: str) -> Path:
        return self.root / "verdicts" / key[:2] / f"{key}.json"

    def get(self, key: str) -> Run | None:
        try:
            data = json.loads(self._path(key).read_text())
            run = Run.from_json(data)
        except (OSError, ValueError, TypeError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return run

    def put(self, key: str, run: Run) -> None:
        """Store a verdict; if the cache cannot be written, say so once on stderr and
        go on without it (a verdict is worth more than its cache entry)."""
        if self.write_error is not None:
            return
        try:
            self._write(key, run)
        except OSError as e:
            self.write_error = e
            print(
                f"bugforge: warning: cannot write the verdict cache in {self.root}"
                f" ({e.strerror or e}); going on without caching",
                file=sys.stderr,
            )

    def _write(self, key: str, run: Run) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verdict.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(run.to_json(), f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# --------------------------------------------------------------- many runs at once


@dataclass
class Request:
    """One (source, seed) to measure; `source` is built only on a cache miss."""

    key: str
    seed: int
    source: Callable[[], str]


def _init_worker() -> None:
    import torch

    import clean_model.transformer  # noqa: F401  (imported once per worker)

    torch.set_num_threads(NUM_THREADS)


def _measure_in_worker(source: str, seed: int, timeout: float | None) -> Run:
    return measure(source, seed, timeout)


def measure_many(
    requests: Iterable[Request],
    jobs: int = 2,
    cache: Cache | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    timeout: float | None = RUN_TIMEOUT,
) -> dict[str, Run]:
    """Every request's Run by key: cached ones read back, the rest measured in `jobs`
    worker processes (or in this process when jobs <= 1) and then cached.

    `progress(done, total, cached)` is called after each result."""
    requests = list(requests)
    results: dict[str, Run] = {}
    todo: list[Request] = []
    seen: set[str] = set()
    for request in requests:
        if request.key in seen:
            continue
        seen.add(request.key)
        run = cache.get(request.key) if cache is not None else None
        if run is not None:
            results[request.key] = run
        else:
            todo.append(request)
    total, cached = len(seen), len(results)

    def record(request: Request, run: Run) -> None:
        results[request.key] = run
        if cache is not None:
            cache.put(request.key, run)
        if progress is not None:
            progress(len(results), total, cached)

    if progress is not None:
        progress(len(results), total, cached)
    if not todo:
        return results
    if jobs <= 1:
        for request in todo:
            record(request, measure(request.source(), request.seed, timeout))
        return results
    _measure_in_pool(todo, jobs, record, timeout)
    return results


def _measure_in_pool(todo, jobs, record, timeout) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # 'spawn': a clean interpreter per worker that imports torch once and runs many
    # jobs; forking a parent that holds libcst state and threads is not safe.
    context = multiprocessing.get_context("spawn")
    sources: dict[int, str] = {}
    order = {id(request): i for i, request in enumerate(todo)}
    pending, workers = list(todo), jobs
    while pending:
        broken: list[Request] = []
        with ProcessPoolExecutor(
            max_workers=min(workers, len(pending)),
            mp_context=context,
            initializer=_init_worker,
        ) as pool:
            futures = {}
            for request in pending:
                # the requests of one site share its builder: build the source once
                builder = id(request.source)
                if builder not in sources:
                    sources[builder] = request.source()
                future = pool.submit(
                    _measure_in_worker, sources[builder], request.seed, timeout
                )
                futures[future] = request
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    request = futures.pop(future)
                    try:
                        record(request, future.result())
                    except BrokenProcessPool:
                        broken.append(request)
        broken.sort(key=lambda r: order[id(r)])
        if broken and workers == 1:
            # one worker runs its queue in order: the first broken request killed it
            record(broken[0], _died(broken[0].seed))
            broken, workers = broken[1:], jobs
        elif broken:
            workers = 1  # rerun the rest one at a time to find the culprit
        pending = broken


def _died(seed: int) -> Run:
    return Run(
        seed=seed,
        verdict="crash",
        final_loss=math.nan,
        accuracy=None,
        teacher_forced=None,
        steps=0,
        error="WorkerDied: the worker process running this source died",
        seconds=0.0,
        target=math.nan,
        chance_loss=math.nan,
    )
