"""Bugs in what the loss compares: the targets, the ignore mask, the cross-entropy."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule

# `x.view(...)`: a flattening reshape
VIEW = m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("view")))
# `F.cross_entropy(...)`
CROSS_ENTROPY = m.Call(func=m.Attribute(attr=m.Name("cross_entropy")))
# `-1` as written in the source
MINUS_ONE = m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))


def _slice(lower=None, upper=None):
    return cst.SubscriptElement(slice=cst.Slice(lower=lower, upper=upper))


def _one_line(call):
    """The call with its arguments on one line (as ruff formats a short call)."""
    args = list(call.args)
    args[-1] = args[-1].with_changes(
        comma=cst.MaybeSentinel.DEFAULT, whitespace_after_arg=cst.SimpleWhitespace("")
    )
    return call.with_changes(args=args, whitespace_before_args=cst.SimpleWhitespace(""))


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
        minus_one = cst.UnaryOperation(cst.Minus(), cst.Integer("1"))
        return node.with_changes(slice=[node.slice[0], _slice(upper=minus_one)])


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
        colon = old.first_colon.with_changes(
            whitespace_before=old.first_colon.whitespace_after,
            whitespace_after=old.first_colon.whitespace_before,
        )
        new = old.with_changes(lower=old.upper, upper=None, first_colon=colon)
        return node.with_changes(
            slice=[node.slice[0], node.slice[1].with_changes(slice=new)]
        )


class CrossEntropyUnflattened(Rule):
    name = "cross-entropy-unflattened"
    category = "loss"
    description = (
        "The (B, T, vocab) logits go into cross_entropy without flattening, and"
        " cross_entropy takes dim 1 as the classes: it scores the T positions as"
        " classes at each vocabulary slot, so the model is trained on a meaningless"
        " objective (it only runs because T == vocab_size here)"
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
            after="loss = F.cross_entropy(logits, targets, ignore_index=-1)\n",
        ),
    )
    untouched = ("loss = F.cross_entropy(logits, targets)\n",)

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Call(
                func=CROSS_ENTROPY.func,
                args=[m.Arg(value=VIEW), m.Arg(value=VIEW), m.ZeroOrMore()],
            ),
        )

    def mutate(self, node, ctx):
        args = list(node.args)
        for i in (0, 1):
            args[i] = args[i].with_changes(value=args[i].value.func.value)
        return _one_line(node.with_changes(args=args))


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
        minus_one = cst.UnaryOperation(cst.Minus(), cst.Integer("1"))
        return cst.Call(
            func=cst.Attribute(value=node, attr=cst.Name("softmax")),
            args=[
                cst.Arg(
                    keyword=cst.Name("dim"),
                    value=minus_one,
                    equal=cst.AssignEqual(
                        whitespace_before=cst.SimpleWhitespace(""),
                        whitespace_after=cst.SimpleWhitespace(""),
                    ),
                )
            ],
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
