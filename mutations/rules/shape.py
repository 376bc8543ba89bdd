"""Bugs in tensor shapes: wrong axes, views that scramble, silent broadcasting."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import COMMA, keyword_arg, method_call, negative

_INTS_1_2 = [m.Arg(value=m.Integer("1")), m.Arg(value=m.Integer("2"))]


class HeadsSplitWithoutTranspose(Rule):
    name = "heads-split-without-transpose"
    category = "shape"
    description = (
        "The projection (B, T, C) is viewed straight as (B, nh, T, hs) instead of"
        " (B, T, nh, hs) and transposed, so each row of a head mixes the features of"
        " several positions in a pattern that depends on T: training at the full"
        " length learns around it, but generation at other lengths attends with"
        " scrambled vectors"
    )
    fix = (
        "Split the features first, then move the head axis forward:"
        " .view(B, T, nh, hs).transpose(1, 2)"
    )
    symptom = "wrong-generation"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="q = self.q(x).view(B, T, self.num_heads, hs).transpose(1, 2)\n",
            after="q = self.q(x).view(B, self.num_heads, T, hs)\n",
        ),
    )
    untouched = (
        "y = y.transpose(1, 2).contiguous().view(B, T, C)\n",
        "x = x.view(B, T, C).transpose(1, 2)\n",
    )

    def find(self, node, ctx):
        view_4d = method_call("view", args=[m.Arg()] * 4)
        return m.matches(node, method_call("transpose", view_4d, _INTS_1_2))

    def mutate(self, node, ctx):
        view = node.func.value
        b, t, nh, hs = view.args
        return view.with_changes(args=[b, nh, t, hs])


# y.transpose(1, 2).contiguous().view(...): heads merged back into (B, T, C)
_MERGE_HEADS = method_call(
    "view", method_call("contiguous", method_call("transpose", args=_INTS_1_2))
)


class HeadsMergedWithoutTranspose(Rule):
    name = "heads-merged-without-transpose"
    category = "shape"
    description = (
        "The heads' output (B, nh, T, hs) is viewed straight as (B, T, C) without"
        " moving the head axis back behind the time axis, so each position's vector"
        " is stitched from other positions' outputs, later ones included, and the"
        " projection sees tokens scrambled across time"
    )
    fix = "Transpose before the view: y.transpose(1, 2).contiguous().view(B, T, C)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="y = y.transpose(1, 2).contiguous().view(B, T, C)\n",
            after="y = y.contiguous().view(B, T, C)\n",
        ),
    )
    untouched = ("y = y.contiguous().view(B, T, C)\n",)

    def find(self, node, ctx):
        return m.matches(node, _MERGE_HEADS)

    def mutate(self, node, ctx):
        contiguous = node.func.value
        transpose = contiguous.func.value
        receiver = transpose.func.value
        return node.with_changes(
            func=node.func.with_changes(
                value=contiguous.with_changes(
                    func=contiguous.func.with_changes(value=receiver)
                )
            )
        )


class ViewOfTransposedTensor(Rule):
    name = "view-of-transposed-tensor"
    category = "shape"
    description = (
        "The transposed heads' output is not contiguous in memory, and .view cannot"
        " reinterpret a tensor whose strides do not match the requested shape, so"
        " the forward pass raises"
    )
    fix = "Make it contiguous before viewing: y.transpose(1, 2).contiguous().view(...)"
    symptom = "crash"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="y = y.transpose(1, 2).contiguous().view(B, T, C)\n",
            after="y = y.transpose(1, 2).view(B, T, C)\n",
        ),
    )
    untouched = ("y = y.contiguous().view(B, T, C)\n",)

    def find(self, node, ctx):
        return m.matches(node, _MERGE_HEADS)

    def mutate(self, node, ctx):
        contiguous = node.func.value
        return node.with_changes(
            func=node.func.with_changes(value=contiguous.func.value)
        )


class HeadsMergedWithWrongTranspose(Rule):
    name = "heads-merged-with-wrong-transpose"
    category = "shape"
    description = (
        "The heads' output (B, nh, T, hs) is transposed on its last two axes, as for"
        " k.transpose(-2, -1), instead of swapping heads and time, and the view to"
        " (B, T, C) accepts the (B, nh, hs, T) result because only the element count"
        " must match: each position's vector is built from features of many"
        " positions, later ones included, so teacher-forced training can read ahead"
        " while generation, which has no future, fails"
    )
    fix = "Swap the head and time axes: y.transpose(1, 2).contiguous().view(B, T, C)"
    symptom = "wrong-generation"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="y = y.transpose(1, 2).contiguous().view(B, T, C)\n",
            after="y = y.transpose(-2, -1).contiguous().view(B, T, C)\n",
        ),
    )
    untouched = ("y = y.transpose(-2, -1).contiguous().view(B, T, C)\n",)

    def find(self, node, ctx):
        return m.matches(node, _MERGE_HEADS)

    def mutate(self, node, ctx):
        contiguous = node.func.value
        transpose = contiguous.func.value
        first, second = transpose.args
        axes = [
            first.with_changes(value=negative(2)),
            second.with_changes(value=negative(1)),
        ]
        return node.with_changes(
            func=node.func.with_changes(
                value=contiguous.with_changes(
                    func=contiguous.func.with_changes(
                        value=transpose.with_changes(args=axes)
                    )
                )
            )
        )


class PatternInterleavedNotTiled(Rule):
    name = "pattern-interleaved-not-tiled"
    category = "shape"
    description = (
        "The training sequences are built with repeat_interleave, which repeats each"
        " token in place (a a a b b b ...), instead of repeat, which tiles the whole"
        " word (a b c a b c ...): the model is trained on a different task from the"
        " one it is asked to continue"
    )
    fix = "Tile the word along the time axis: word.repeat(1, n)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="def make_batch(word, n):\n    return word.repeat(1, n)\n",
            after=(
                "def make_batch(word, n):\n"
                "    return word.repeat_interleave(n, dim=1)\n"
            ),
        ),
    )
    untouched = (
        # the held-out answers are built the same way, but the oracle judges
        # with the clean evaluate(): a bug there would not break the model
        "def evaluate(word, n):\n    return word.repeat(1, n)\n",
        "def make_batch(word, n):\n    return word.repeat(n, 1)\n",
    )

    def find(self, node, ctx):
        tile_time = method_call("repeat", args=[m.Arg(value=m.Integer("1")), m.Arg()])
        return ctx.function == "make_batch" and m.matches(node, tile_time)

    def mutate(self, node, ctx):
        _, times = node.args
        dim = keyword_arg("dim", cst.Integer("1"))
        return node.with_changes(
            func=node.func.with_changes(attr=cst.Name("repeat_interleave")),
            args=[times.with_changes(comma=COMMA), dim],
        )
