"""Bugs in greedy generation: which logits are read, the context crop, the append."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import MINUS_ONE, mirrored_colon

# `torch.cat((idx, next_id), dim=1)`: the new token appended to the sequence
APPEND = m.Call(
    func=m.Attribute(value=m.Name("torch"), attr=m.Name("cat")),
    args=[
        m.Arg(value=m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])),
        m.Arg(keyword=m.Name("dim"), value=m.Integer("1")),
    ],
)


def _in_generate(ctx):
    return ctx.function == "generate"


class NextTokenFromFirstPosition(Rule):
    name = "next-token-from-first-position"
    category = "generate"
    description = (
        "generate reads the logits at position 0 instead of the last position, so"
        " every new token is the model's guess for what follows the first token of"
        " the context, not for what follows the end of the sequence"
    )
    fix = "Read the last position: logits[:, -1, :]"
    symptom = "wrong-generation"
    nodes = (cst.SubscriptElement,)
    examples = (
        Example(
            before=(
                "def generate(self, idx):\n"
                "    next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)\n"
            ),
            after=(
                "def generate(self, idx):\n"
                "    next_id = logits[:, 0, :].argmax(dim=-1, keepdim=True)\n"
            ),
        ),
    )
    untouched = (
        "def forward(self, idx):\n    last = logits[:, -1, :]\n",
        "def generate(self, idx):\n    last = logits[:, 0, :]\n",
    )

    def find(self, node, ctx):
        if not (
            _in_generate(ctx)
            and m.matches(node, m.SubscriptElement(m.Index(MINUS_ONE)))
        ):
            return False
        subscript = ctx.parent
        return (
            m.matches(subscript, m.Subscript(value=m.Name("logits")))
            and len(subscript.slice) == 3
            and subscript.slice[1] is node
        )

    def mutate(self, node, ctx):
        return node.with_changes(slice=cst.Index(cst.Integer("0")))


class ContextCropKeepsOldest(Rule):
    name = "context-crop-keeps-oldest"
    category = "generate"
    description = (
        "The context is cropped to the first block_size tokens instead of the last, so"
        " once the sequence outgrows the block the model sees the same frozen window"
        " every step and keeps predicting the token that follows it"
    )
    fix = "Keep the most recent tokens: idx[:, -self.block_size :]"
    symptom = "wrong-generation"
    nodes = (cst.Slice,)
    examples = (
        Example(
            before=(
                "def generate(self, idx):\n    idx_cond = idx[:, -self.block_size :]\n"
            ),
            after=(
                "def generate(self, idx):\n    idx_cond = idx[:, : self.block_size]\n"
            ),
        ),
    )
    untouched = (
        "def generate(self, idx):\n    idx_cond = idx[:, : self.block_size]\n",
        "def forward(self, idx):\n    idx_cond = idx[:, -self.block_size :]\n",
    )

    def find(self, node, ctx):
        return _in_generate(ctx) and m.matches(
            node,
            m.Slice(
                lower=m.UnaryOperation(
                    operator=m.Minus(),
                    expression=m.Attribute(
                        value=m.Name("self"), attr=m.Name("block_size")
                    ),
                ),
                upper=None,
                step=None,
            ),
        )

    def mutate(self, node, ctx):
        return node.with_changes(
            lower=None, upper=node.lower.expression, first_colon=mirrored_colon(node)
        )


class _AppendRule(Rule):
    """A bug in how the new token is appended: `torch.cat((idx, next_id), dim=1)`."""

    category = "generate"
    nodes = (cst.Call,)
    untouched = ("def forward(self, x):\n    y = torch.cat((x, z), dim=1)\n",)

    def find(self, node, ctx):
        return _in_generate(ctx) and m.matches(node, APPEND)


class GeneratedTokenPrepended(_AppendRule):
    name = "generated-token-prepended"
    description = (
        "Each new token is concatenated in front of the sequence instead of after it,"
        " so the end of the context never changes: the model predicts the same token"
        " at every step, and the new tokens land before the prompt instead of after it"
    )
    fix = "Append the new token at the end: torch.cat((idx, next_id), dim=1)"
    symptom = "wrong-generation"
    examples = (
        Example(
            before=(
                "def generate(self, idx):\n    idx = torch.cat((idx, next_id), dim=1)\n"
            ),
            after=(
                "def generate(self, idx):\n    idx = torch.cat((next_id, idx), dim=1)\n"
            ),
        ),
    )

    def mutate(self, node, ctx):
        pair = node.args[0].value
        first, second = pair.elements
        swapped = [
            second.with_changes(comma=first.comma),
            first.with_changes(comma=second.comma),
        ]
        args = [node.args[0].with_changes(value=pair.with_changes(elements=swapped))]
        return node.with_changes(args=[*args, node.args[1]])


class GeneratedTokenOnBatchAxis(_AppendRule):
    name = "generated-token-on-batch-axis"
    description = (
        "The new token is concatenated along dim 0, the batch axis, instead of dim 1,"
        " the time axis, so a (B, 1) column is stacked under a (B, T) batch and"
        " generation fails on the first step"
    )
    fix = "Append along time: torch.cat((idx, next_id), dim=1)"
    symptom = "crash"
    examples = (
        Example(
            before=(
                "def generate(self, idx):\n    idx = torch.cat((idx, next_id), dim=1)\n"
            ),
            after=(
                "def generate(self, idx):\n    idx = torch.cat((idx, next_id), dim=0)\n"
            ),
        ),
    )

    def mutate(self, node, ctx):
        dim = node.args[1].with_changes(value=cst.Integer("0"))
        return node.with_changes(args=[node.args[0], dim])
