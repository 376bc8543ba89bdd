"""Bugs in what the loss compares: the targets, the ignore mask, the cross-entropy."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import (
    COMMA,
    MINUS_ONE,
    keyword_arg,
    mirrored_colon,
    negative,
)

# `x.view(B * T, ...)`: a reshape that flattens the batch and time axes
FLATTEN = m.Call(
    func=m.Attribute(value=m.Name(), attr=m.Name("view")),
    args=[
        m.Arg(
            value=m.BinaryOperation(
                left=m.Name(), operator=m.Multiply(), right=m.Name()
            )
        ),
        m.ZeroOrMore(),
    ],
)
# `F.cross_entropy(...)`
CROSS_ENTROPY = m.Call(func=m.Attribute(attr=m.Name("cross_entropy")))


def _slice(lower=None, upper=None):
    return cst.SubscriptElement(slice=cst.Slice(lower=lower, upper=upper))


class TargetsNotShifted(Rule):
    name = "targets-not-shifted"
    category = "loss"
    description = (
        "The targets are cut from the sequence at the same offset as the inputs"
        " (seq[:, :-1]) instead of one step later, so every target is the input token"
        " itself: the model learns to copy its input, the loss goes to zero, and it"
        " never learns to predict the next token"
    )
    fix = "Shift the targets by one: y = seq[:, 1:].clone()"
    symptom = "degraded"
    nodes = (cst.Subscript,)
    examples = (
        Example(
            before="x = seq[:, :-1]\ny = seq[:, 1:].clone()\n",
            after="x = seq[:, :-1]\ny = seq[:, :-1].clone()\n",
        ),
    )
    untouched = ("x = seq[:, 1:]\n", "y = seq[:, :-1].clone()\n")

    def find(self, node, ctx):
        return ctx.inside_assignment_to("y") and m.matches(
            node,
            m.Subscript(
                slice=[
                    m.SubscriptElement(slice=m.Slice(lower=None, upper=None)),
                    m.SubscriptElement(
                        slice=m.Slice(lower=m.Integer("1"), upper=None, step=None)
                    ),
                ]
            ),
        )

    def mutate(self, node, ctx):
        return node.with_changes(slice=[node.slice[0], _slice(upper=negative(1))])


class LossMaskInverted(Rule):
    name = "loss-mask-inverted"
    category = "loss"
    description = (
        "The ignore mask covers everything after the first period instead of the first"
        " period itself, so the loss is taken only where the next token is random and"
        " unpredictable: the model can learn nothing but the token frequencies"
    )
    fix = "Ignore the first period only: y[:, : PERIOD - 1] = -1"
    symptom = "no-learning"
    nodes = (cst.Subscript,)
    examples = (
        Example(
            before="y[:, : PERIOD - 1] = -1\n",
            after="y[:, PERIOD - 1 :] = -1\n",
        ),
    )
    untouched = ("y[:, PERIOD - 1 :] = -1\n", "z = y[:, : PERIOD - 1]\n")

    def find(self, node, ctx):
        return (
            m.matches(ctx.parent, m.AssignTarget())
            and m.matches(
                node,
                m.Subscript(
                    slice=[
                        m.SubscriptElement(slice=m.Slice(lower=None, upper=None)),
                        m.SubscriptElement(
                            slice=m.Slice(lower=None, upper=m.DoNotCare(), step=None)
                        ),
                    ]
                ),
            )
            and m.matches(ctx.ancestors[-2], m.Assign(value=MINUS_ONE))
        )

    def mutate(self, node, ctx):
        old = node.slice[1].slice
        new = old.with_changes(
            lower=old.upper, upper=None, first_colon=mirrored_colon(old)
        )
        return node.with_changes(
            slice=[node.slice[0], node.slice[1].with_changes(slice=new)]
        )


class CrossEntropyUnflattened(Rule):
    name = "cross-entropy-unflattened"
    category = "loss"
    description = (
        "The logits are viewed as (B, T, vocab) instead of flattened to"
        " (B * T, vocab), and cross_entropy takes dim 1 as the classes: it scores the"
        " T positions as classes at each vocabulary slot, so the model is trained on"
        " a meaningless objective (it only runs because T == vocab_size == 16 in the"
        " demo)"
    )
    fix = (
        "Flatten both: F.cross_entropy(logits.view(B * T, -1), targets.view(B * T),"
        " ignore_index=-1)"
    )
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "loss = F.cross_entropy(\n"
                "    logits.view(B * T, -1), targets.view(B * T), ignore_index=-1\n"
                ")\n"
            ),
            after=(
                "loss = F.cross_entropy(\n"
                "    logits.view(B, T, -1), targets.view(B, T), ignore_index=-1\n"
                ")\n"
            ),
        ),
    )
    untouched = (
        "loss = F.cross_entropy(logits, targets)\n",
        "loss = F.cross_entropy(logits.view(B, T, -1), targets.view(B, T))\n",
    )

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Call(
                func=CROSS_ENTROPY.func,
                args=[m.Arg(value=FLATTEN), m.Arg(value=FLATTEN), m.ZeroOrMore()],
            ),
        )

    def mutate(self, node, ctx):
        args = list(node.args)
        for i in (0, 1):
            view = args[i].value
            product, *rest = view.args
            # B * T -> B, T
            batch = cst.Arg(value=product.value.left, comma=COMMA)
            time = product.with_changes(value=product.value.right)
            args[i] = args[i].with_changes(
                value=view.with_changes(args=[batch, time, *rest])
            )
        return node.with_changes(args=args)


class SoftmaxBeforeCrossEntropy(Rule):
    name = "softmax-before-cross-entropy"
    category = "loss"
    description = (
        "The head's output goes through a softmax before cross_entropy, which applies"
        " log-softmax itself: it reads probabilities in [0, 1] as logits, so even a"
        " perfect prediction costs a loss near 1.9 and the gradients through the"
        " flattened scores are tiny: the loss barely falls below ln(vocab_size)"
    )
    fix = "Give cross_entropy the raw logits: logits = self.head(x)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="logits = self.head(x)  # (B, T, vocab_size)\n",
            after="logits = self.head(x).softmax(dim=-1)\n",
        ),
    )
    untouched = ("logits = self.head(x).softmax(dim=-1)\n", "y = self.head(x)\n")

    def find(self, node, ctx):
        return m.matches(
            ctx.parent, m.Assign(targets=[m.AssignTarget(target=m.Name("logits"))])
        ) and m.matches(
            node, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("head")))
        )

    def mutate(self, node, ctx):
        return cst.Call(
            func=cst.Attribute(value=node, attr=cst.Name("softmax")),
            args=[keyword_arg("dim", negative(1))],
        )


class IgnoreIndexMismatch(Rule):
    name = "ignore-index-mismatch"
    category = "loss"
    description = (
        "cross_entropy ignores the default -100 while make_batch marks the first"
        " period with -1, so the -1 targets are taken as class ids and the loss"
        " fails on the first batch"
    )
    fix = "Ignore the marker make_batch uses: ignore_index=-1"
    symptom = "crash"
    nodes = (cst.Arg,)
    examples = (
        Example(
            before="loss = F.cross_entropy(logits, targets, ignore_index=-1)\n",
            after="loss = F.cross_entropy(logits, targets, ignore_index=-100)\n",
        ),
    )
    untouched = ("loss = F.cross_entropy(logits, targets, ignore_index=-100)\n",)

    def find(self, node, ctx):
        return m.matches(
            node, m.Arg(keyword=m.Name("ignore_index"), value=MINUS_ONE)
        ) and m.matches(ctx.parent, CROSS_ENTROPY)

    def mutate(self, node, ctx):
        return node.with_changes(
            value=node.value.with_changes(expression=cst.Integer("100"))
        )
