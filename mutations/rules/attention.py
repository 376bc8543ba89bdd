"""Bugs in the attention computation: scores, scale, mask, softmax."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import COMMA, keyword_arg, negative


class SoftmaxOverQueries(Rule):
    name = "softmax-over-queries"
    category = "attention"
    description = (
        "The attention softmax normalises over the query axis (dim=-2), so each key's"
        " weights sum to one across queries and a position's output depends on later"
        " queries: information leaks from the future and generation breaks"
    )
    fix = "Normalise over the key axis: F.softmax(att, dim=-1)"
    symptom = "wrong-generation"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="att = F.softmax(att, dim=-1)\n",
            after="att = F.softmax(att, dim=-2)\n",
        ),
    )
    untouched = ("p = F.softmax(logits, dim=0)\n",)

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Call(
                func=m.Attribute(attr=m.Name("softmax")),
                args=[m.Arg(value=m.Name("att")), m.Arg(keyword=m.Name("dim"))],
            ),
        )

    def mutate(self, node, ctx):
        dim = node.args[1].with_changes(value=negative(2))
        return node.with_changes(args=[node.args[0], dim])


# self.mask[...]: the causal mask buffer, sliced to the sequence length
_MASK_SLICE = m.Subscript(value=m.Attribute(value=m.Name("self"), attr=m.Name("mask")))


class CausalMaskIncludesNextToken(Rule):
    name = "causal-mask-includes-next-token"
    category = "attention"
    description = (
        "The causal mask keeps one diagonal above the main one (tril with"
        " diagonal=1), so every position also attends to the token it must predict:"
        " teacher-forced training copies the answer and reaches a near-zero loss,"
        " but in generation that token does not exist yet and the model has learnt"
        " nothing else"
    )
    fix = "Keep the main diagonal and below only: torch.tril(torch.ones(T, T))"
    symptom = "wrong-generation"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="mask = torch.tril(torch.ones(block_size, block_size))\n",
            after="mask = torch.tril(torch.ones(block_size, block_size), diagonal=1)\n",
        ),
    )
    untouched = ("mask = torch.tril(torch.ones(n, n), diagonal=-1)\n",)

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Call(
                func=m.Attribute(value=m.Name("torch"), attr=m.Name("tril")),
                args=[m.Arg(keyword=None)],
            ),
        )

    def mutate(self, node, ctx):
        diagonal = keyword_arg("diagonal", cst.Integer("1"))
        (tensor,) = node.args
        return node.with_changes(args=[tensor.with_changes(comma=COMMA), diagonal])


class CausalMaskInverted(Rule):
    name = "causal-mask-inverted"
    category = "attention"
    description = (
        "The scores are filled with -inf where the mask is 1 instead of 0, so each"
        " position may see only the future and never itself: the last row is"
        " masked entirely, its softmax is 0/0 and the loss turns NaN"
    )
    fix = "Fill where the mask is zero: att.masked_fill(mask == 0, float('-inf'))"
    symptom = "nan"
    nodes = (cst.Comparison,)
    examples = (
        Example(
            before=(
                'att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))\n'
            ),
            after='att = att.masked_fill(self.mask[:, :, :T, :T] == 1, float("-inf"))\n',
        ),
    )
    untouched = ("keep = lengths == 0\n",)

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Comparison(
                left=_MASK_SLICE,
                comparisons=[
                    m.ComparisonTarget(operator=m.Equal(), comparator=m.Integer("0"))
                ],
            ),
        )

    def mutate(self, node, ctx):
        (target,) = node.comparisons
        return node.with_changes(
            comparisons=[target.with_changes(comparator=cst.Integer("1"))]
        )


class MaskedFillWithZero(Rule):
    name = "masked-fill-with-zero"
    category = "attention"
    description = (
        "Future positions get a score of 0 instead of -inf, and exp(0) is not zero:"
        " every position still attends to the tokens after it, so teacher-forced"
        " training reads the answer from the future and generation, which has no"
        " future, fails"
    )
    fix = "Fill the masked scores with float('-inf') so the softmax gives them weight 0"
    symptom = "wrong-generation"
    nodes = (cst.Call,)
    examples = (
        Example(
            before='att = att.masked_fill(mask == 0, float("-inf"))\n',
            after="att = att.masked_fill(mask == 0, 0.0)\n",
        ),
    )
    untouched = ("x = x.masked_fill(pad, 0.0)\n",)

    def find(self, node, ctx):
        neg_inf = m.Call(
            func=m.Name("float"), args=[m.Arg(value=m.SimpleString('"-inf"'))]
        )
        return m.matches(
            node,
            m.Call(
                func=m.Attribute(attr=m.Name("masked_fill")),
                args=[m.Arg(), m.Arg(value=neg_inf)],
            ),
        )

    def mutate(self, node, ctx):
        mask, fill = node.args
        return node.with_changes(args=[mask, fill.with_changes(value=cst.Float("0.0"))])


class CausalMaskSlicedFromEnd(Rule):
    name = "causal-mask-sliced-from-end"
    category = "attention"
    description = (
        "The mask's key columns are taken from the end of the block (-T:) instead of"
        " the start, which is the same triangle only at the full length T ="
        " block_size: teacher-forced training at full length is unaffected, but a"
        " shorter prompt in generation gets rows that mask every key, turning"
        " attention into 0/0"
    )
    fix = "Slice the top-left T x T corner: self.mask[:, :, :T, :T]"
    symptom = "wrong-generation"
    nodes = (cst.Subscript,)
    examples = (
        Example(
            before="m = self.mask[:, :, :T, :T] == 0\n",
            after="m = self.mask[:, :, :T, -T:] == 0\n",
        ),
    )
    untouched = ("m = self.mask[:, :, -T:, -T:] == 0\n", "y = x[:, :, :T, :T]\n")

    def find(self, node, ctx):
        upto = m.SubscriptElement(slice=m.Slice(lower=None, upper=m.Name(), step=None))
        return m.matches(node, _MASK_SLICE) and m.matches(
            node, m.Subscript(slice=[m.ZeroOrMore(), upto, upto])
        )

    def mutate(self, node, ctx):
        *rest, keys = node.slice
        upper = keys.slice.upper
        minus = cst.UnaryOperation(operator=cst.Minus(), expression=upper)
        new_keys = keys.with_changes(
            slice=keys.slice.with_changes(lower=minus, upper=None)
        )
        return node.with_changes(slice=[*rest, new_keys])
