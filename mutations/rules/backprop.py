"""Bugs in the hand-written backward of the sharding autograd Functions.

Every layer shares these Functions, so one wrong backward corrupts the gradient of
every layer that routes through it.
"""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule


class CopyBackwardOverwritesSum(Rule):
    name = "copy-backward-overwrites-sum"
    category = "backprop"
    description = (
        "CopyToShards.backward overwrites the running gradient with each shard's"
        " instead of adding it, so the input of every column-parallel layer (q, k, v,"
        " MLP, head) only gets the last shard's share and the layers below it follow"
        " a wrong gradient"
    )
    fix = "Sum the shards' gradients: grad = grad + g"
    symptom = "degraded"
    nodes = (cst.Assign,)
    examples = (
        Example(
            before=(
                "class CopyToShards:\n"
                "    def backward(ctx, *grads):\n"
                "        grad = grads[0]\n"
                "        for g in grads[1:]:\n"
                "            grad = grad + g\n"
                "        return grad, None\n"
            ),
            after=(
                "class CopyToShards:\n"
                "    def backward(ctx, *grads):\n"
                "        grad = grads[0]\n"
                "        for g in grads[1:]:\n"
                "            grad = g\n"
                "        return grad, None\n"
            ),
        ),
    )
    untouched = (
        "class ReduceFromShards:\n"
        "    def forward(ctx, *xs):\n"
        "        for x in xs[1:]:\n"
        "            out = out + x\n",
    )

    def find(self, node, ctx):
        if ctx.scope != "CopyToShards.backward":
            return False
        return m.matches(
            node,
            m.Assign(
                targets=[m.AssignTarget(target=m.Name("grad"))],
                value=m.BinaryOperation(left=m.Name("grad"), operator=m.Add()),
            ),
        )

    def mutate(self, node, ctx):
        return node.with_changes(value=node.value.right)


class GatherBackwardSlicesReversed(Rule):
    name = "gather-backward-slices-reversed"
    category = "backprop"
    description = (
        "GatherFromShards.backward hands the gradient slices back in reverse order, so"
        " each shard is trained with another shard's gradient: the output head's"
        " shards push up the logits of the wrong half of the vocabulary and q, k, v"
        " heads swap their gradients"
    )
    fix = (
        "Return the slices in shard order: tuple(g.contiguous() for g in"
        " grad.split(ctx.sizes, dim=-1))"
    )
    symptom = "no-learning"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "class GatherFromShards:\n"
                "    def backward(ctx, grad):\n"
                "        return tuple(g for g in grad.split(ctx.sizes, dim=-1))\n"
            ),
            after=(
                "class GatherFromShards:\n"
                "    def backward(ctx, grad):\n"
                "        return tuple(g for g in reversed(grad.split(ctx.sizes, dim=-1)))\n"
            ),
        ),
    )
    untouched = (
        "class GatherFromShards:\n"
        "    def forward(ctx, *xs):\n"
        "        return tuple(g for g in grad.split(ctx.sizes, dim=-1))\n",
    )

    def find(self, node, ctx):
        return (
            ctx.scope == "GatherFromShards.backward"
            and m.matches(node, m.Call(func=m.Attribute(attr=m.Name("split"))))
            and m.matches(ctx.parent, m.CompFor())
        )

    def mutate(self, node, ctx):
        return cst.Call(func=cst.Name("reversed"), args=[cst.Arg(node)])


# `x, weight = ctx.saved_tensors`
_UNPACK_SAVED = m.SimpleStatementLine(
    body=[
        m.Assign(
            targets=[
                m.AssignTarget(
                    target=m.Tuple(elements=[m.Element(m.Name("x")), m.Element()])
                )
            ],
            value=m.Attribute(attr=m.Name("saved_tensors")),
        )
    ]
)
# `grad_weight = ...`
_WEIGHT_GRAD = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(target=m.Name("grad_weight"))])]
)


class _Rename(cst.CSTTransformer):
    """Renames every plain name `old` to `new`."""

    def __init__(self, old, new):
        super().__init__()
        self.old, self.new = old, new

    def leave_Name(self, original_node, updated_node):
        if updated_node.value == self.old:
            return updated_node.with_changes(value=self.new)
        return updated_node

    def leave_Attribute(self, original_node, updated_node):
        # `y.x` names an attribute, not the variable
        return updated_node.with_changes(attr=original_node.attr)


class WeightGradUsesInputGrad(Rule):
    name = "weight-grad-uses-input-grad"
    category = "backprop"
    description = (
        "LinearShard.backward builds the weight gradient from grad_x, the gradient it"
        " just computed for the input, instead of the saved input x, so the weight"
        " updates carry nothing about the input and the loss stays at chance"
    )
    fix = (
        "Use the saved input: x, weight = ctx.saved_tensors and grad_weight ="
        " grad.flatten(0, -2).t() @ x.flatten(0, -2)"
    )
    symptom = "no-learning"
    # the site is the whole body: the saved input goes unpacked as `_` too, or
    # nothing would use it
    nodes = (cst.IndentedBlock,)
    examples = (
        Example(
            before=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        x, weight = ctx.saved_tensors\n"
                "        grad_x = grad @ weight\n"
                "        grad_weight = grad.t() @ x\n"
                "        return grad_x, grad_weight\n"
            ),
            after=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        _, weight = ctx.saved_tensors\n"
                "        grad_x = grad @ weight\n"
                "        grad_weight = grad.t() @ grad_x\n"
                "        return grad_x, grad_weight\n"
            ),
        ),
    )
    untouched = (
        "class LinearShard:\n"
        "    def backward(ctx, grad):\n"
        "        x, weight = ctx.saved_tensors\n"
        "        grad_x = grad @ weight\n",
        "class LinearShard:\n"
        "    def forward(ctx, grad):\n"
        "        x, weight = ctx.saved_tensors\n"
        "        grad_weight = grad.t() @ x\n",
    )

    def find(self, node, ctx):
        return (
            ctx.scope == "LinearShard.backward"
            and isinstance(ctx.parent, cst.FunctionDef)
            and any(m.matches(s, _UNPACK_SAVED) for s in node.body)
            and any(
                m.matches(s, _WEIGHT_GRAD) and m.findall(s, m.Name("x"))
                for s in node.body
            )
        )

    def mutate(self, node, ctx):
        body = []
        for statement in node.body:
            if m.matches(statement, _UNPACK_SAVED):
                statement = statement.visit(_Rename("x", "_"))
            elif m.matches(statement, _WEIGHT_GRAD):
                statement = statement.visit(_Rename("x", "grad_x"))
            body.append(statement)
        return node.with_changes(body=body)


class InputGradSignFlipped(Rule):
    name = "input-grad-sign-flipped"
    category = "backprop"
    description = (
        "LinearShard.backward negates the gradient it passes to its input, so every"
        " layer below a linear is pushed uphill on the loss while the weights above"
        " it go downhill"
    )
    fix = "The input gradient of x @ w.T is grad @ w, without a minus sign"
    symptom = "no-learning"
    nodes = (cst.BinaryOperation,)
    examples = (
        Example(
            before=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        grad_x = grad @ weight\n"
            ),
            after=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        grad_x = -grad @ weight\n"
            ),
        ),
    )
    untouched = (
        "class LinearShard:\n"
        "    def forward(ctx, x, weight):\n"
        "        grad_x = grad @ weight\n",
    )

    def find(self, node, ctx):
        return (
            ctx.scope == "LinearShard.backward"
            and m.matches(
                node,
                m.BinaryOperation(left=m.Name("grad"), operator=m.MatrixMultiply()),
            )
            and m.matches(
                ctx.parent, m.Assign(targets=[m.AssignTarget(target=m.Name("grad_x"))])
            )
        )

    def mutate(self, node, ctx):
        return node.with_changes(left=cst.UnaryOperation(cst.Minus(), node.left))


class WeightGradTransposed(Rule):
    name = "weight-grad-transposed"
    category = "backprop"
    description = (
        "LinearShard.backward computes the weight gradient as x.T @ grad, the formula"
        " for a weight stored (in, out), but the shards are stored (out, in): the"
        " gradient has the transposed shape and autograd rejects it"
    )
    fix = "For y = x @ w.T the weight gradient is grad.T @ x (shape (out, in))"
    symptom = "crash"
    nodes = (cst.BinaryOperation,)
    examples = (
        Example(
            before=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2)\n"
            ),
            after=(
                "class LinearShard:\n"
                "    def backward(ctx, grad):\n"
                "        grad_weight = x.flatten(0, -2).t() @ grad.flatten(0, -2)\n"
            ),
        ),
    )
    untouched = (
        "class LinearShard:\n"
        "    def backward(ctx, grad):\n"
        "        grad_x = grad @ weight\n",
    )

    def find(self, node, ctx):
        transposed = m.Call(func=m.Attribute(value=m.Call(), attr=m.Name("t")))
        return (
            ctx.scope == "LinearShard.backward"
            and m.matches(
                node,
                m.BinaryOperation(
                    left=transposed, operator=m.MatrixMultiply(), right=m.Call()
                ),
            )
            and m.matches(
                ctx.parent,
                m.Assign(targets=[m.AssignTarget(target=m.Name("grad_weight"))]),
            )
        )

    def mutate(self, node, ctx):
        grad = node.left.func.value  # grad.flatten(0, -2)
        x = node.right  # x.flatten(0, -2)
        left = node.left.with_changes(func=node.left.func.with_changes(value=x))
        return node.with_changes(left=left, right=grad)
