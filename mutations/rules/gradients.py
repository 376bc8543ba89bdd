"""Bugs that cut the gradient flow: detached tensors, untracked weights, dropped grads."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule


def _detached(node):
    return cst.Call(func=cst.Attribute(value=node, attr=cst.Name("detach")))


def _assigns_to(ctx, target):
    """Is the node the value of an assignment whose single target matches `target`?"""
    return m.matches(ctx.parent, m.Assign(targets=[m.AssignTarget(target=target)]))


class AttentionWeightsDetached(Rule):
    name = "attention-weights-detached"
    category = "gradients"
    description = (
        "The attention weights are detached after the softmax, so no gradient reaches"
        " the query and key projections: they keep their random init, attention stays"
        " nearly uniform and never learns to look one period back"
    )
    fix = "Keep the softmax output in the graph: att = F.softmax(att, dim=-1)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="att = F.softmax(att, dim=-1)\n",
            after="att = F.softmax(att, dim=-1).detach()\n",
        ),
    )
    untouched = (
        "probs = F.softmax(logits, dim=-1)\n",
        "att = F.softmax(att, dim=-1).detach()\n",
    )

    def find(self, node, ctx):
        return m.matches(
            node,
            m.Call(
                func=m.Attribute(attr=m.Name("softmax")),
                args=[m.Arg(value=m.Name("att")), m.ZeroOrMore()],
            ),
        ) and _assigns_to(ctx, m.Name("att"))

    def mutate(self, node, ctx):
        return _detached(node)


class ColumnShardWeightThroughData(Rule):
    name = "shard-weight-through-data"
    category = "gradients"
    description = (
        "The column-parallel layers multiply by w.data, a view of the weight that"
        " autograd does not track, so the q, k, v, first MLP and output-head shards"
        " never receive a gradient and stay at their random init"
    )
    fix = "Pass the parameter itself: LinearShard.apply(x_i, w)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "class ColumnParallelLinear:\n"
                "    def forward(self, x):\n"
                "        ys = [LinearShard.apply(x_i, w) for x_i, w in zip(xs, ws)]\n"
            ),
            after=(
                "class ColumnParallelLinear:\n"
                "    def forward(self, x):\n"
                "        ys = [LinearShard.apply(x_i, w.data) for x_i, w in zip(xs, ws)]\n"
            ),
        ),
    )
    # row-parallel layers (attention output, MLP down) trained to 97-100% with
    # frozen shards: the layers before them adapt to a fixed random projection
    untouched = (
        "class RowParallelLinear:\n"
        "    def forward(self, x):\n"
        "        ys = [LinearShard.apply(x_i, w) for x_i, w in zip(xs, ws)]\n",
    )

    def find(self, node, ctx):
        return ctx.scope == "ColumnParallelLinear.forward" and m.matches(
            node,
            m.Call(
                func=m.Attribute(value=m.Name("LinearShard"), attr=m.Name("apply")),
                args=[m.Arg(), m.Arg(value=m.Name())],
            ),
        )

    def mutate(self, node, ctx):
        weight = node.args[1]
        data = cst.Attribute(value=weight.value, attr=cst.Name("data"))
        return node.with_changes(args=[node.args[0], weight.with_changes(value=data)])


class AttentionBranchDetached(Rule):
    name = "attention-branch-detached"
    category = "gradients"
    description = (
        "The attention branch is detached before it is added to the residual stream,"
        " so the q, k, v and output projections never receive a gradient and"
        " attention never learns to look one period back"
    )
    fix = "Add the branch in the graph: x = x + self.attn(self.ln_1(x))"
    symptom = "no-learning"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="x = x + self.attn(self.ln_1(x))\n",
            after="x = x + self.attn(self.ln_1(x)).detach()\n",
        ),
    )
    # the MLP branch is not needed for the task: cutting it is not a bug that shows
    untouched = (
        "x = x + self.mlp(self.ln_2(x))\n",
        "x = x + self.attn(self.ln_1(x)).detach()\n",
    )

    def find(self, node, ctx):
        return m.matches(
            node, m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("attn")))
        ) and m.matches(ctx.parent, m.BinaryOperation(operator=m.Add()))

    def mutate(self, node, ctx):
        return _detached(node)


class SplitBackwardDropsInputGrad(Rule):
    name = "split-backward-drops-input-grad"
    category = "gradients"
    description = (
        "SplitToShards.backward returns None for its input, so nothing flows back"
        " through the attention output projection: v, q and k never receive a"
        " gradient and attention stays at its random init"
    )
    fix = "Return the shards' gradients joined: return torch.cat(grads, dim=-1), None"
    symptom = "degraded"
    nodes = (cst.Return,)
    examples = (
        Example(
            before=(
                "class SplitToShards:\n"
                "    def backward(ctx, *grads):\n"
                "        return torch.cat(grads, dim=-1), None\n"
            ),
            after=(
                "class SplitToShards:\n"
                "    def backward(ctx, *grads):\n"
                "        return None, None\n"
            ),
        ),
    )
    untouched = (
        "class SplitToShards:\n"
        "    def forward(ctx, x, num_shards):\n"
        "        return torch.cat(grads, dim=-1), None\n",
        "class SplitToShards:\n"
        "    def backward(ctx, *grads):\n"
        "        return None, None\n",
    )

    def find(self, node, ctx):
        return ctx.scope == "SplitToShards.backward" and m.matches(
            node,
            m.Return(
                value=m.Tuple(
                    elements=[m.Element(value=~m.Name("None")), m.ZeroOrMore()]
                )
            ),
        )

    def mutate(self, node, ctx):
        first = node.value.elements[0].with_changes(value=cst.Name("None"))
        return node.with_changes(
            value=node.value.with_changes(elements=[first, *node.value.elements[1:]])
        )


class BlockOutputDetached(Rule):
    name = "block-output-detached"
    category = "gradients"
    description = (
        "Each block's output is detached before it goes on, so the loss only reaches"
        " the final norm and the output head: no block and no embedding ever gets a"
        " gradient"
    )
    fix = "Keep the residual stream in the graph: x = block(x)"
    symptom = "no-learning"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="for block in self.blocks:\n    x = block(x)\n",
            after="for block in self.blocks:\n    x = block(x).detach()\n",
        ),
    )
    untouched = ("x = self.ln_f(x)\n", "x = block(x).detach()\n")

    def find(self, node, ctx):
        return m.matches(
            node, m.Call(func=m.Name("block"), args=[m.Arg(m.Name("x"))])
        ) and _assigns_to(ctx, m.Name("x"))

    def mutate(self, node, ctx):
        return _detached(node)
