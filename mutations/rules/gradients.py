"""Bugs that cut the gradient flow: detached tensors, untracked weights, dropped grads."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import (
    COMMA,
    LINE_LENGTH,
    NO_GRAD,
    code,
    fits_on_one_line,
    is_shard_list,
    keyword_arg,
    statement_indent,
)

# self.weight = nn.ParameterList(<generator>): the shards of a ParallelLinear
_SHARD_LIST = m.Call(
    func=m.Attribute(value=m.Name("nn"), attr=m.Name("ParameterList")),
    args=[m.Arg(value=m.GeneratorExp(), keyword=None)],
)


def _on_own_line(indent):
    """The whitespace that starts a new line, `indent` deeper than the statement."""
    return cst.ParenthesizedWhitespace(
        first_line=cst.TrailingWhitespace(),
        indent=True,
        last_line=cst.SimpleWhitespace(indent),
    )


def _detached(node):
    return cst.Call(func=cst.Attribute(value=node, attr=cst.Name("detach")))


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
        ) and ctx.assigns_to(m.Name("att"))

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
        "SplitToShards.backward guards its input's gradient with"
        " ctx.needs_input_grad[1], the flag of num_shards (always False for an int),"
        " instead of x's flag [0], so it always returns None for its input: nothing"
        " flows back through the attention output projection, v, q and k never"
        " receive a gradient and attention stays at its random init"
    )
    fix = (
        "Check the input's own flag, ctx.needs_input_grad[0], or simply return"
        " torch.cat(grads, dim=-1), None"
    )
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
                "        return torch.cat(grads, dim=-1) if ctx.needs_input_grad[1]"
                " else None, None\n"
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
                    elements=[
                        m.Element(value=~(m.Name("None") | m.IfExp())),
                        m.ZeroOrMore(),
                    ]
                )
            ),
        )

    def mutate(self, node, ctx):
        # the flag of the function's second input: num_shards, not x
        saved = ctx.function_node.params.params[0].name
        flag = cst.Subscript(
            value=cst.Attribute(value=saved, attr=cst.Name("needs_input_grad")),
            slice=[cst.SubscriptElement(slice=cst.Index(cst.Integer("1")))],
        )
        first = node.value.elements[0]
        guarded = cst.IfExp(test=flag, body=first.value, orelse=cst.Name("None"))
        return node.with_changes(
            value=node.value.with_changes(
                elements=[first.with_changes(value=guarded), *node.value.elements[1:]]
            )
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
        ) and ctx.assigns_to(m.Name("x"))

    def mutate(self, node, ctx):
        return _detached(node)


class ShardsInPlainList(Rule):
    name = "shards-in-plain-list"
    category = "gradients"
    description = (
        "The weight shards are kept in a plain Python list instead of an"
        " nn.ParameterList, so the module never registers them: model.parameters()"
        " leaves them out, the optimizer never updates them and every linear layer"
        " keeps its random init"
    )
    fix = (
        "Register the shards: self.weight = nn.ParameterList(nn.Parameter(...) for _"
        " in range(num_shards))"
    )
    symptom = "no-learning"
    nodes = (cst.Call,)
    conflicts = ("shard-weight-through-data",)  # the shards are frozen either way
    examples = (
        Example(
            before=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape)) for _ in range(num_shards)\n"
                "        )\n"
            ),
            after=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = [nn.Parameter(torch.empty(shape)) for _ in range(num_shards)]\n"
            ),
        ),
        Example(
            before=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape, dtype=torch.float32))\n"
                "            for _ in range(num_shards)\n"
                "        )\n"
            ),
            after=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = [\n"
                "            nn.Parameter(torch.empty(shape, dtype=torch.float32))\n"
                "            for _ in range(num_shards)\n"
                "        ]\n"
            ),
        ),
    )
    # the biases start at zero and the weights alone carry the layer: freezing them
    # is not a bug that shows
    untouched = (
        "class ColumnParallelLinear:\n"
        "    def __init__(self):\n"
        "        self.bias = nn.ParameterList(\n"
        "            nn.Parameter(torch.zeros(w.size(0))) for w in self.weight\n"
        "        )\n",
        "class ParallelLinear:\n"
        "    def __init__(self, shape, num_shards):\n"
        "        self.weight = [nn.Parameter(torch.empty(shape)) for _ in range(n)]\n",
    )

    def find(self, node, ctx):
        return m.matches(node, _SHARD_LIST) and is_shard_list(ctx)

    def mutate(self, node, ctx):
        (arg,) = node.args
        generator = arg.value
        flat = cst.ListComp(
            elt=generator.elt,
            for_in=generator.for_in.with_changes(
                whitespace_before=cst.SimpleWhitespace(" ")
            ),
        )
        if fits_on_one_line(ctx, flat):
            return flat
        # too long for one line: keep the call's layout inside the brackets
        return cst.ListComp(
            elt=generator.elt,
            for_in=generator.for_in,
            lbracket=cst.LeftSquareBracket(
                whitespace_after=node.whitespace_before_args
            ),
            rbracket=cst.RightSquareBracket(whitespace_before=arg.whitespace_after_arg),
        )


class WeightShardsFrozen(Rule):
    name = "weight-shards-frozen"
    category = "gradients"
    description = (
        "The weight shards are created with requires_grad=False, so autograd never"
        " computes a gradient for them and every linear layer keeps its random init:"
        " only the embeddings, norms and biases train"
    )
    fix = "Leave the shards trainable: nn.Parameter(torch.empty(shape))"
    symptom = "no-learning"
    nodes = (cst.Call,)
    conflicts = ("shard-weight-through-data",)  # the shards are frozen either way
    examples = (
        Example(
            before=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape)) for _ in range(num_shards)\n"
                "        )\n"
            ),
            after=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, num_shards):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape), requires_grad=False)\n"
                "            for _ in range(num_shards)\n"
                "        )\n"
            ),
        ),
        Example(
            before=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, n):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape)) for _ in range(n)\n"
                "        )\n"
            ),
            after=(
                "class ParallelLinear:\n"
                "    def __init__(self, shape, n):\n"
                "        self.weight = nn.ParameterList(\n"
                "            nn.Parameter(torch.empty(shape), requires_grad=False) for _ in range(n)\n"
                "        )\n"
            ),
        ),
    )
    untouched = (
        "class ParallelLinear:\n"
        "    def __init__(self, shape, n):\n"
        "        self.weight = nn.ParameterList(\n"
        "            nn.Parameter(torch.empty(shape), requires_grad=False)\n"
        "            for _ in range(n)\n"
        "        )\n",
    )

    def find(self, node, ctx):
        parameter = m.Call(
            func=m.Attribute(value=m.Name("nn"), attr=m.Name("Parameter")),
            args=[m.Arg(keyword=None)],
        )
        return (
            m.matches(node, _SHARD_LIST)
            and m.matches(node.args[0].value.elt, parameter)
            and is_shard_list(ctx)
        )

    def mutate(self, node, ctx):
        (arg,) = node.args
        generator = arg.value
        (data,) = generator.elt.args
        frozen = keyword_arg("requires_grad", cst.Name("False"))
        elt = generator.elt.with_changes(args=[data.with_changes(comma=COMMA), frozen])
        generator = generator.with_changes(elt=elt)
        inside = node.whitespace_before_args
        if isinstance(inside, cst.ParenthesizedWhitespace):
            width = (
                statement_indent(ctx)
                + len(inside.last_line.value)
                + len(code(generator))
            )
            if width > LINE_LENGTH:
                # ruff splits a comprehension that does not fit before its `for`
                for_in = generator.for_in.with_changes(
                    whitespace_before=_on_own_line(inside.last_line.value)
                )
                generator = generator.with_changes(for_in=for_in)
        return node.with_changes(args=[arg.with_changes(value=generator)])


class AttentionForwardWithoutGrad(Rule):
    name = "attention-forward-without-grad"
    category = "gradients"
    description = (
        "The attention forward runs under torch.no_grad(), so its output carries no"
        " graph: the q, k, v and output projections never receive a gradient, none"
        " flows back through attention to the layers below, and attention never"
        " learns to look one period back"
    )
    fix = (
        "Drop the decorator from CausalSelfAttention.forward: no_grad belongs on"
        " generate, not on a forward that training goes through"
    )
    symptom = "no-learning"
    nodes = (cst.FunctionDef,)
    # each of these already cuts every gradient that the decorator would cut
    conflicts = (
        "attention-branch-detached",
        "block-output-detached",
        "split-backward-drops-input-grad",
    )
    examples = (
        Example(
            before=(
                "class CausalSelfAttention:\n"
                "    def __init__(self, dim):\n"
                "        self.dim = dim\n"
                "\n"
                "    def forward(self, x):\n"
                "        return self.proj(x)\n"
            ),
            after=(
                "class CausalSelfAttention:\n"
                "    def __init__(self, dim):\n"
                "        self.dim = dim\n"
                "\n"
                "    @torch.no_grad()\n"
                "    def forward(self, x):\n"
                "        return self.proj(x)\n"
            ),
        ),
    )
    # generate already runs without a graph; the MLP is not needed for the task
    untouched = (
        "class CausalSelfAttention:\n"
        "    @torch.no_grad()\n"
        "    def forward(self, x):\n"
        "        return self.proj(x)\n",
        "class MLP:\n    def forward(self, x):\n        return self.fc2(x)\n",
        "def forward(x):\n    return x\n",
    )

    def find(self, node, ctx):
        return (
            ctx.scope == "CausalSelfAttention"
            and node.name.value == "forward"
            and not any(m.matches(d, NO_GRAD) for d in node.decorators)
        )

    def mutate(self, node, ctx):
        no_grad = cst.Call(
            func=cst.Attribute(value=cst.Name("torch"), attr=cst.Name("no_grad"))
        )
        return node.with_changes(
            decorators=[cst.Decorator(decorator=no_grad), *node.decorators]
        )
