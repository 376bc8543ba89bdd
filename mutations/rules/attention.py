"""Bugs in the attention computation: scores, scale, mask, softmax."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule


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
        dim = node.args[1].with_changes(
            value=cst.UnaryOperation(cst.Minus(), cst.Integer("2"))
        )
        return node.with_changes(args=[node.args[0], dim])
