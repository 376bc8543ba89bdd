"""Bugs in the training loop: the order of zero_grad, backward and step, the
learning rate, the batches."""

import re

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import method_call


def _method_call(name):
    """A statement line that is just a call of method `name`: `optimizer.step()`."""
    return m.SimpleStatementLine(body=[m.Expr(method_call(name))])


ZERO_GRAD = _method_call("zero_grad")
BACKWARD = _method_call("backward")
STEP = _method_call("step")
# `generator = torch.Generator().manual_seed(seed)`: the source of the batches
SEEDED_GENERATOR = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[m.AssignTarget(m.Name())],
            value=m.Call(
                func=m.Attribute(
                    value=m.Call(func=m.Attribute(attr=m.Name("Generator"))),
                    attr=m.Name("manual_seed"),
                )
            ),
        )
    ]
)


def _index(body, pattern):
    """Position of the only statement in `body` that matches `pattern`, or None."""
    hits = [i for i, stmt in enumerate(body) if m.matches(stmt, pattern)]
    return hits[0] if len(hits) == 1 else None


def _update_steps(block):
    """(zero_grad, backward, step) positions in a block that runs them in that order
    (not necessarily adjacent), or None."""
    if not isinstance(block, cst.IndentedBlock):
        return None
    found = tuple(_index(block.body, p) for p in (ZERO_GRAD, BACKWARD, STEP))
    if None in found or not found[0] < found[1] < found[2]:
        return None
    return found


LOOP = (
    "for x, y in batches:\n"
    "    _, loss = model(x, y)\n"
    "    optimizer.zero_grad(set_to_none=True)\n"
    "    loss.backward()\n"
    "    optimizer.step()\n"
)


class _UpdateOrder(Rule):
    """Moves or drops one of zero_grad, backward and step in the training loop."""

    name = ""  # a base, not a rule
    category = "training"
    nodes = (cst.IndentedBlock,)

    def find(self, node, ctx):
        return _update_steps(node) is not None


class ZeroGradAfterBackward(_UpdateOrder):
    name = "zero-grad-after-backward"
    description = (
        "optimizer.zero_grad runs between loss.backward and optimizer.step, so the"
        " gradients are wiped (set to None) just before every update: the optimizer"
        " skips every parameter and the model never moves from its init"
    )
    fix = "Clear the gradients before backward: zero_grad, then backward, then step"
    symptom = "no-learning"
    examples = (
        Example(
            before=LOOP,
            after=(
                "for x, y in batches:\n"
                "    _, loss = model(x, y)\n"
                "    loss.backward()\n"
                "    optimizer.zero_grad(set_to_none=True)\n"
                "    optimizer.step()\n"
            ),
        ),
    )
    untouched = (
        "for x, y in batches:\n"
        "    loss.backward()\n"
        "    optimizer.step()\n"
        "    optimizer.zero_grad()\n",
    )

    def mutate(self, node, ctx):
        zero_grad, backward, _ = _update_steps(node)
        body = list(node.body)
        moved = body.pop(zero_grad)
        body.insert(backward, moved)
        return node.with_changes(body=body)


class StepBeforeBackward(_UpdateOrder):
    name = "step-before-backward"
    description = (
        "optimizer.step runs before loss.backward, so each update uses gradients that"
        " zero_grad has already cleared and the fresh ones are cleared before the"
        " next step: no update ever happens and the model stays at its init"
    )
    fix = "Call loss.backward() first, then optimizer.step()"
    symptom = "no-learning"
    examples = (
        Example(
            before=LOOP,
            after=(
                "for x, y in batches:\n"
                "    _, loss = model(x, y)\n"
                "    optimizer.zero_grad(set_to_none=True)\n"
                "    optimizer.step()\n"
                "    loss.backward()\n"
            ),
        ),
    )
    untouched = (
        "for x, y in batches:\n"
        "    optimizer.step()\n"
        "    optimizer.zero_grad()\n"
        "    loss.backward()\n",
    )

    def mutate(self, node, ctx):
        _, backward, step = _update_steps(node)
        body = list(node.body)
        body[backward], body[step] = body[step], body[backward]
        return node.with_changes(body=body)


class GradientsNeverZeroed(_UpdateOrder):
    name = "gradients-never-zeroed"
    description = (
        "The loop never calls optimizer.zero_grad, so backward adds each step's"
        " gradient to the sum of all earlier ones: the update follows a stale running"
        " total instead of the current batch and training drifts off and diverges"
    )
    fix = "Clear the gradients every step: optimizer.zero_grad() before loss.backward()"
    symptom = "no-learning"
    examples = (
        Example(
            before=LOOP,
            after=(
                "for x, y in batches:\n"
                "    _, loss = model(x, y)\n"
                "    loss.backward()\n"
                "    optimizer.step()\n"
            ),
        ),
    )
    untouched = ("for x, y in batches:\n    loss.backward()\n    optimizer.step()\n",)

    def mutate(self, node, ctx):
        zero_grad, _, _ = _update_steps(node)
        body = list(node.body)
        del body[zero_grad]
        return node.with_changes(body=body)


class LearningRateExponentSign(Rule):
    name = "learning-rate-exponent-sign"
    category = "training"
    description = (
        "The learning rate's exponent lost its minus sign (1e2 instead of 1e-2), so"
        " every AdamW step moves each weight by about 100: the weights jump far past"
        " any minimum and the loss explodes instead of falling"
    )
    fix = "Restore the negative exponent: LEARNING_RATE = 1e-2"
    symptom = "no-learning"
    nodes = (cst.Float,)
    examples = (
        Example(
            before="LEARNING_RATE = 1e-2\n",
            after="LEARNING_RATE = 1e2\n",
        ),
        Example(
            before="optimizer = torch.optim.AdamW(params, lr=3e-4)\n",
            after="optimizer = torch.optim.AdamW(params, lr=3e4)\n",
        ),
    )
    untouched = ("EPS = 1e-5\n", "LEARNING_RATE = 0.01\n")

    def find(self, node, ctx):
        if not re.fullmatch(r"\d+(\.\d*)?e-\d+", node.value, re.IGNORECASE):
            return False
        learning_rate = m.Name(value=m.MatchRegex(r"(?i)(lr|learning_rate)"))
        return m.matches(
            ctx.parent,
            m.Assign(targets=[m.AssignTarget(learning_rate)])
            | m.Arg(keyword=learning_rate),
        )

    def mutate(self, node, ctx):
        return node.with_changes(value=node.value.replace("-", ""))


class BatchGeneratorReseededEveryStep(Rule):
    name = "batch-generator-reseeded-every-step"
    category = "training"
    description = (
        "The batch generator is created and seeded inside the loop, so make_batch"
        " draws the very same batch at every step: the model memorises those 32 words"
        " (the loss goes to zero) and never learns to continue a pattern it has not"
        " seen"
    )
    fix = "Seed the generator once, before the loop"
    symptom = "degraded"
    nodes = (cst.IndentedBlock,)
    examples = (
        Example(
            before=(
                "def train(model, steps, seed):\n"
                "    generator = torch.Generator().manual_seed(seed)\n"
                "    for _ in range(steps):\n"
                "        x, y = make_batch(32, generator)\n"
            ),
            after=(
                "def train(model, steps, seed):\n"
                "    for _ in range(steps):\n"
                "        generator = torch.Generator().manual_seed(seed)\n"
                "        x, y = make_batch(32, generator)\n"
            ),
        ),
    )
    untouched = (
        "def evaluate(model, seed):\n"
        "    generator = torch.Generator().manual_seed(seed)\n"
        "    x, y = make_batch(32, generator)\n",
    )

    @staticmethod
    def _plan(node, ctx):
        """(generator statement, first loop after it) positions, or None."""
        if not isinstance(ctx.parent, cst.FunctionDef):
            return None
        seeded = _index(node.body, SEEDED_GENERATOR)
        if seeded is None:
            return None
        loops = [
            i
            for i, stmt in enumerate(node.body)
            if i > seeded and isinstance(stmt, cst.For)
        ]
        return (seeded, loops[0]) if loops else None

    def find(self, node, ctx):
        return self._plan(node, ctx) is not None

    def mutate(self, node, ctx):
        seeded, loop = self._plan(node, ctx)
        body = list(node.body)
        statement = body[seeded].with_changes(leading_lines=[])
        for_loop = body[loop]
        inner = for_loop.body.with_changes(body=[statement, *for_loop.body.body])
        body[loop] = for_loop.with_changes(body=inner)
        del body[seeded]
        return node.with_changes(body=body)
