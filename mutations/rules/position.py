"""Bugs in the position signal: the sinusoidal table and how it joins the tokens."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule

# `self.pos_emb[...]`: the fixed position table, however it is sliced
POS_TABLE = m.Subscript(value=m.Attribute(value=m.Name("self"), attr=m.Name("pos_emb")))
# `self.pos_emb[:T]`: the first T rows, one per position of the input
POS_ROWS = m.Subscript(
    value=m.Attribute(value=m.Name("self"), attr=m.Name("pos_emb")),
    slice=[m.SubscriptElement(slice=m.Slice(lower=None, upper=m.Name(), step=None))],
)


def _function_has_param(ctx, name):
    """Does the innermost enclosing function take a parameter called `name`?"""
    function = ctx.function_node
    return function is not None and any(
        p.name.value == name for p in function.params.params
    )


def _function_assigns(ctx, name):
    """Does the innermost enclosing function assign to the plain name `name`?"""
    function = ctx.function_node
    target = m.Assign(targets=[m.AssignTarget(target=m.Name(name))])
    return function is not None and bool(m.findall(function, target))


class PositionTableIndexedByToken(Rule):
    name = "position-table-indexed-by-token"
    category = "position"
    description = (
        "The position table is indexed with the token ids instead of the positions"
        " 0..T-1, so each token gets a vector that says which token it is, not where"
        " it stands: the model has no position information and cannot find the token"
        " one period back (it only runs because vocab_size == block_size here)"
    )
    fix = "Take the first T rows of the table: self.pos_emb[:T]"
    symptom = "degraded"
    nodes = (cst.Subscript,)
    examples = (
        Example(
            before=(
                "def forward(self, idx):\n"
                "    x = self.tok_emb(idx) + self.pos_emb[:T]  # (B, T, C)\n"
            ),
            after=(
                "def forward(self, idx):\n    x = self.tok_emb(idx) + self.pos_emb[idx]\n"
            ),
        ),
    )
    untouched = (
        "def forward(self, tokens):\n    x = self.tok_emb(tokens) + self.pos_emb[:T]\n",
        "def forward(self, idx):\n    x = self.tok_emb(idx) + self.pos_emb[idx]\n",
    )

    def find(self, node, ctx):
        return m.matches(node, POS_ROWS) and _function_has_param(ctx, "idx")

    def mutate(self, node, ctx):
        return node.with_changes(
            slice=[cst.SubscriptElement(slice=cst.Index(cst.Name("idx")))]
        )


class PositionEmbeddingNotAdded(Rule):
    name = "position-embedding-not-added"
    category = "position"
    description = (
        "The position table is never added to the token embeddings, so the model sees"
        " an unordered bag of tokens (the causal mask alone gives it only a vague sense"
        " of position) and cannot pick out the token exactly one period back"
    )
    fix = "Add the position rows: x = self.tok_emb(idx) + self.pos_emb[:T]"
    symptom = "degraded"
    nodes = (cst.BinaryOperation,)
    # with the table unused, any bug in how sinusoidal_positions builds it is masked
    conflicts = ("frequency-divided-outside-exp", "position-table-integer-dtype")
    examples = (
        Example(
            before="x = self.tok_emb(idx) + self.pos_emb[:T]  # (B, T, C)\n",
            after="x = self.tok_emb(idx)\n",
        ),
    )
    untouched = ("x = self.tok_emb(idx) + self.seg_emb[:T]\n",)

    def find(self, node, ctx):
        return m.matches(node, m.BinaryOperation(operator=m.Add(), right=POS_TABLE))

    def mutate(self, node, ctx):
        return node.left


class FrequencyDividedOutsideExp(Rule):
    name = "frequency-divided-outside-exp"
    category = "position"
    description = (
        "The division by dim sits outside the exp instead of in the exponent, so"
        " freq = 10000^(-2i) / dim: the first frequency is 1/dim and all the others"
        " underflow to zero, the table barely changes across the block, and the"
        " model can hardly tell one position from another"
    )
    fix = (
        "Divide inside the exponent: torch.exp(torch.arange(0, dim, 2)"
        " * (-math.log(10000.0) / dim))"
    )
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))\n"
            ),
            after=(
                "freq = torch.exp(torch.arange(0, dim, 2) * -math.log(10000.0)) / dim\n"
            ),
        ),
    )
    untouched = (
        "freq = torch.exp(torch.arange(0, dim, 2) * -math.log(10000.0)) / dim\n",
        "y = torch.exp(x * (a / b))\n",
    )

    def find(self, node, ctx):
        # exp(arange(...) * (-log(base) / dim))
        scaled = m.BinaryOperation(
            left=m.Call(func=m.Attribute(attr=m.Name("arange"))),
            operator=m.Multiply(),
            right=m.BinaryOperation(
                left=m.UnaryOperation(
                    operator=m.Minus(),
                    expression=m.Call(func=m.Attribute(attr=m.Name("log"))),
                ),
                operator=m.Divide(),
                lpar=[m.AtLeastN(n=1)],
            ),
        )
        return ctx.assigns_to("freq") and m.matches(
            node,
            m.Call(func=m.Attribute(attr=m.Name("exp")), args=[m.Arg(value=scaled)]),
        )

    def mutate(self, node, ctx):
        scaled = node.args[0].value
        quotient = scaled.right
        exponent = scaled.with_changes(right=quotient.left)
        exp = node.with_changes(args=[node.args[0].with_changes(value=exponent)])
        return cst.BinaryOperation(
            left=exp, operator=quotient.operator, right=quotient.right
        )


class PositionTableIntegerDtype(Rule):
    name = "position-table-integer-dtype"
    category = "position"
    description = (
        "The table is allocated with position.new_zeros, which inherits the int64"
        " dtype of the arange, so every sin and cos value written into it is"
        " truncated to 0 (only cos at position 0 stays 1): the positions after the"
        " first are indistinguishable and the model cannot tell them apart"
    )
    fix = "Allocate a float table: pe = torch.zeros(num_positions, dim)"
    symptom = "degraded"
    nodes = (cst.Call,)
    # an integer table truncates whatever frequencies it is given: the two would mask
    conflicts = ("frequency-divided-outside-exp",)
    examples = (
        Example(
            before=(
                "def sinusoidal_positions(num_positions, dim):\n"
                "    position = torch.arange(num_positions).unsqueeze(1)\n"
                "    pe = torch.zeros(num_positions, dim)\n"
            ),
            after=(
                "def sinusoidal_positions(num_positions, dim):\n"
                "    position = torch.arange(num_positions).unsqueeze(1)\n"
                "    pe = position.new_zeros(num_positions, dim)\n"
            ),
        ),
    )
    untouched = (
        "def f(num_positions, dim):\n    pe = torch.zeros(num_positions, dim)\n",
        "def f(position, dim):\n    out = torch.zeros(3, dim)\n",
    )

    def find(self, node, ctx):
        return (
            ctx.assigns_to("pe")
            and m.matches(
                node,
                m.Call(
                    func=m.Attribute(value=m.Name("torch"), attr=m.Name("zeros")),
                    args=[m.Arg(keyword=None), m.Arg(keyword=None)],
                ),
            )
            and _function_assigns(ctx, "position")
        )

    def mutate(self, node, ctx):
        return node.with_changes(
            func=node.func.with_changes(
                value=cst.Name("position"), attr=cst.Name("new_zeros")
            )
        )
