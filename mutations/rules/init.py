"""Bugs in weight initialisation: scales, means, symmetry, dead parameters."""

import libcst as cst
import libcst.matchers as m

from mutations.base import Example, Rule
from mutations.rules._common import NO_GRAD, fits_on_one_line, is_shard_list

# nn.init.normal_(full, mean=..., std=<literal>): the init of a sharded linear's
# full weight, before it is cut into shards
_LINEAR_NORMAL_INIT = m.Call(
    func=m.Attribute(attr=m.Name("normal_")),
    args=[
        m.Arg(value=m.Name(), keyword=None),
        m.Arg(keyword=m.Name("mean")),
        m.Arg(keyword=m.Name("std"), value=m.Float()),
    ],
)


# `nn.init.normal_(module.weight, ..., std=<float>)` inside `if isinstance(module, nn.Embedding):`
_EMBEDDING_STD = m.Call(
    func=m.Attribute(attr=m.Name("normal_")),
    args=[
        m.Arg(value=m.Attribute(attr=m.Name("weight")), keyword=None),
        m.ZeroOrMore(),
        m.Arg(keyword=m.Name("std"), value=m.Float()),
    ],
)
_EMBEDDING_BRANCH = m.If(
    test=m.Call(
        func=m.Name("isinstance"),
        args=[m.Arg(), m.Arg(value=m.Attribute(attr=m.Name("Embedding")))],
    )
)


def _is_embedding_std(node, ctx):
    return m.matches(node, _EMBEDDING_STD) and any(
        m.matches(a, _EMBEDDING_BRANCH) for a in ctx.ancestors
    )


class NormalInitPositionalMean(Rule):
    name = "normal-init-positional-mean"
    category = "init"
    description = (
        "nn.init.normal_'s second positional argument is the mean, not the std, so"
        " every linear weight is drawn from N(0.02, 1) instead of N(0, 0.02): 50 times"
        " too large, so the attention scores and logits start huge, the softmaxes"
        " saturate and their gradients vanish, and training crawls"
    )
    fix = "Pass the spread by keyword: nn.init.normal_(full, mean=0.0, std=0.02)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="nn.init.normal_(full, mean=0.0, std=0.02)\n",
            after="nn.init.normal_(full, 0.02)\n",
        ),
    )
    untouched = (
        "nn.init.normal_(full, mean=0.0, std=residual_std)\n",
        "nn.init.normal_(module.weight, mean=0.0, std=0.3)\n",
    )

    def find(self, node, ctx):
        return m.matches(node, _LINEAR_NORMAL_INIT)

    def mutate(self, node, ctx):
        target, _, std = node.args
        return node.with_changes(args=[target, cst.Arg(value=std.value)])


class ConstantWeightInit(Rule):
    name = "constant-weight-init"
    category = "init"
    description = (
        "Every linear weight is set to the same constant, so all units of a layer"
        " start identical; the query and key features of a head only meet each other,"
        " so they also get identical gradients forever, and each head's scores stay"
        " a product of two numbers per token that cannot express 'look k steps back'"
    )
    fix = "Draw the weights at random: nn.init.normal_(full, mean=0.0, std=0.02)"
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before="nn.init.normal_(full, mean=0.0, std=0.02)\n",
            after="nn.init.constant_(full, 0.02)\n",
        ),
    )
    untouched = ("nn.init.normal_(full, mean=0.0, std=residual_std)\n",)

    def find(self, node, ctx):
        return m.matches(node, _LINEAR_NORMAL_INIT)

    def mutate(self, node, ctx):
        target, _, std = node.args
        return node.with_changes(
            func=node.func.with_changes(attr=cst.Name("constant_")),
            args=[target, cst.Arg(value=std.value)],
        )


class TokenEmbeddingInitTooSmall(Rule):
    name = "token-embedding-init-too-small"
    category = "init"
    description = (
        "The token embedding is drawn with std 0.02 while the sinusoidal positions"
        " it is added to have unit size, so the token identity is a faint ripple on"
        " the position signal and attention cannot tell tokens apart for most of"
        " training"
    )
    fix = (
        "Draw the token embedding on the scale of the position table, e.g."
        " nn.init.normal_(module.weight, mean=0.0, std=0.3)"
    )
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "if isinstance(module, nn.Embedding):\n"
                "    nn.init.normal_(module.weight, mean=0.0, std=0.3)\n"
            ),
            after=(
                "if isinstance(module, nn.Embedding):\n"
                "    nn.init.normal_(module.weight, mean=0.0, std=0.02)\n"
            ),
        ),
    )
    untouched = (
        "if isinstance(module, nn.Linear):\n"
        "    nn.init.normal_(module.weight, mean=0.0, std=0.3)\n",
        "nn.init.normal_(full, mean=0.0, std=0.02)\n",
    )

    def find(self, node, ctx):
        return _is_embedding_std(node, ctx)

    def mutate(self, node, ctx):
        *rest, std = node.args
        return node.with_changes(
            args=[*rest, std.with_changes(value=cst.Float("0.02"))]
        )


class _PairZeroInit(Rule):
    """Zeroes two attention layers of every block after the other inits ran."""

    name = ""  # a base, not a rule
    category = "init"
    nodes = (cst.For,)
    layers: tuple[str, str] = ("", "")  # the two attention layers zeroed
    untouched = (
        "for block in self.blocks:\n    x = block(x)\n",
        "for block in blocks:\n    for layer in (block.a, block.b):\n        pass\n",
    )

    def find(self, node, ctx):
        # the loop over the blocks that re-initialises some of each block's layers
        return m.matches(
            node,
            m.For(
                target=m.Name(),
                iter=m.Attribute(value=m.Name("self"), attr=m.Name("blocks")),
                body=m.IndentedBlock(body=[m.ZeroOrMore(), m.For(), m.ZeroOrMore()]),
            ),
        )

    def mutate(self, node, ctx):
        block = node.target.value
        first, second = (f"{block}.attn.{layer}" for layer in self.layers)
        zero_init = cst.parse_statement(
            f"for layer in ({first}, {second}):\n"
            "    for w in layer.weight:\n"
            "        nn.init.zeros_(w)\n"
        )
        body = node.body
        return node.with_changes(body=body.with_changes(body=[*body.body, zero_init]))


class QueryKeyZeroInit(_PairZeroInit):
    name = "query-key-zero-init"
    layers = ("q", "k")
    description = (
        "Both the query and the key projections start at zero (their biases are zero"
        " too), so every attention score is 0, and the gradient reaching the queries"
        " is proportional to the keys and vice versa: both stay zero forever,"
        " attention stays uniform over the past, and no token can be looked up"
    )
    fix = (
        "Drop the zero init of q and k (zeroing the query alone would still let the"
        " key, and then the query, learn)"
    )
    symptom = "degraded"
    examples = (
        Example(
            before=(
                "for block in self.blocks:\n"
                "    for layer in (block.attn.proj, block.mlp.fc2):\n"
                "        layer.reset()\n"
            ),
            after=(
                "for block in self.blocks:\n"
                "    for layer in (block.attn.proj, block.mlp.fc2):\n"
                "        layer.reset()\n"
                "    for layer in (block.attn.q, block.attn.k):\n"
                "        for w in layer.weight:\n"
                "            nn.init.zeros_(w)\n"
            ),
        ),
    )


class ParameterCopyWithoutNoGrad(Rule):
    name = "parameter-copy-without-no-grad"
    category = "init"
    description = (
        "The method that copies initial values into the weight shards runs with"
        " autograd on, and an in-place copy_ into a leaf parameter that requires grad"
        " is refused, so the model cannot even be built"
    )
    fix = "Decorate the method with @torch.no_grad() (or copy inside `with torch.no_grad():`)"
    symptom = "crash"
    nodes = (cst.FunctionDef,)
    examples = (
        Example(
            before=(
                "class P:\n"
                "    @torch.no_grad()\n"
                "    def load(self, full):\n"
                "        self.w.copy_(full)\n"
            ),
            after=("class P:\n    def load(self, full):\n        self.w.copy_(full)\n"),
        ),
    )
    untouched = (
        # generating without no_grad only wastes memory
        "class M:\n    @torch.no_grad()\n    def generate(self, idx):\n"
        "        return self(idx)\n",
        "class P:\n    def load(self, full):\n        self.w.copy_(full)\n",
    )

    def find(self, node, ctx):
        return any(m.matches(d, NO_GRAD) for d in node.decorators) and bool(
            m.findall(node.body, m.Call(func=m.Attribute(attr=m.Name("copy_"))))
        )

    def mutate(self, node, ctx):
        decorators = [d for d in node.decorators if not m.matches(d, NO_GRAD)]
        return node.with_changes(decorators=decorators)


class TokenEmbeddingInitTooLarge(Rule):
    name = "token-embedding-init-too-large"
    category = "init"
    description = (
        "The token embedding is drawn with std sqrt(dim) (the original Transformer's"
        " 'multiply the embeddings by sqrt(d_model)' folded into the init), so each"
        " token vector is about eight times the size of the unit-size sinusoids it"
        " is added to; after the pre-norm the position is a faint ripple on the token,"
        " Adam's small steps cannot shrink the table in time, and attention cannot"
        " find the token one period back"
    )
    fix = (
        "Draw the token embedding on the scale of the position table:"
        " nn.init.normal_(module.weight, mean=0.0, std=0.3)"
    )
    symptom = "degraded"
    nodes = (cst.Call,)
    examples = (
        Example(
            before=(
                "if isinstance(module, nn.Embedding):\n"
                "    nn.init.normal_(module.weight, mean=0.0, std=0.3)\n"
            ),
            after=(
                "if isinstance(module, nn.Embedding):\n"
                "    nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**0.5)\n"
            ),
        ),
    )
    untouched = (
        "if isinstance(module, nn.Linear):\n"
        "    nn.init.normal_(module.weight, mean=0.0, std=0.3)\n",
        "nn.init.normal_(full, mean=0.0, std=0.02)\n",
    )

    def find(self, node, ctx):
        return _is_embedding_std(node, ctx)

    def mutate(self, node, ctx):
        *rest, std = node.args
        # module.weight -> module.embedding_dim**0.5
        dim = rest[0].value.with_changes(attr=cst.Name("embedding_dim"))
        scale = cst.BinaryOperation(
            left=dim,
            operator=cst.Power(
                whitespace_before=cst.SimpleWhitespace(""),
                whitespace_after=cst.SimpleWhitespace(""),
            ),
            right=cst.Float("0.5"),
        )
        return node.with_changes(args=[*rest, std.with_changes(value=scale)])


class ValueAndOutputProjectionZeroInit(_PairZeroInit):
    name = "value-and-output-projection-zero-init"
    layers = ("v", "proj")
    description = (
        "Both the value projection and the output projection of every attention layer"
        " start at zero (the 'zero-init the residual branch' trick applied to two"
        " layers in a row): the gradient reaching v goes through proj's weight and the"
        " gradient reaching proj is proportional to the values, so both stay zero"
        " forever, attention adds nothing to the residual stream and no earlier token"
        " can be copied"
    )
    fix = (
        "Zero at most one of the two (the output projection alone is the usual"
        " choice) and keep the value projection random"
    )
    symptom = "no-learning"
    examples = (
        Example(
            before=(
                "for block in self.blocks:\n"
                "    for layer in (block.attn.proj, block.mlp.fc2):\n"
                "        layer.reset()\n"
            ),
            after=(
                "for block in self.blocks:\n"
                "    for layer in (block.attn.proj, block.mlp.fc2):\n"
                "        layer.reset()\n"
                "    for layer in (block.attn.v, block.attn.proj):\n"
                "        for w in layer.weight:\n"
                "            nn.init.zeros_(w)\n"
            ),
        ),
    )


class WeightShardsAliased(Rule):
    name = "weight-shards-aliased"
    category = "init"
    description = (
        "[nn.Parameter(...)] * num_shards repeats one Parameter object instead of"
        " making num_shards of them, so all shards of a linear are the same tensor:"
        " they start equal and, sharing one gradient, stay equal forever; the output"
        " head then gives token i and token i + vocab_size / 2 the same logit up to a"
        " bias, and the two attention heads are one head"
    )
    fix = (
        "Make a fresh Parameter per shard: nn.ParameterList(nn.Parameter(...) for _"
        " in range(num_shards))"
    )
    symptom = "degraded"
    nodes = (cst.Call,)
    # with one tensor behind every shard, swapping the shards' gradients changes
    # nothing but the biases: the reversed gather is masked
    conflicts = ("gather-backward-slices-reversed",)
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
                "        self.weight = nn.ParameterList("
                "[nn.Parameter(torch.empty(shape))] * num_shards)\n"
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
                "        self.weight = nn.ParameterList(\n"
                "            [nn.Parameter(torch.empty(shape, dtype=torch.float32))]"
                " * num_shards\n"
                "        )\n"
            ),
        ),
    )
    untouched = (
        # the biases start at zero and get different gradients per shard anyway
        "class ColumnParallelLinear:\n"
        "    def __init__(self):\n"
        "        self.bias = nn.ParameterList(\n"
        "            nn.Parameter(torch.zeros(w.size(0))) for w in self.weight\n"
        "        )\n",
        "class ParallelLinear:\n"
        "    def __init__(self, shape, num_shards):\n"
        "        self.weight = [nn.Parameter(torch.empty(shape)) for _ in range(n)]\n",
    )

    _SHARDS = m.Call(
        func=m.Attribute(value=m.Name("nn"), attr=m.Name("ParameterList")),
        args=[
            m.Arg(
                keyword=None,
                value=m.GeneratorExp(
                    elt=m.Call(func=m.Attribute(attr=m.Name("Parameter"))),
                    for_in=m.CompFor(
                        target=m.Name("_"),
                        iter=m.Call(func=m.Name("range"), args=[m.Arg()]),
                    ),
                ),
            )
        ],
    )

    def find(self, node, ctx):
        return m.matches(node, self._SHARDS) and is_shard_list(ctx)

    def mutate(self, node, ctx):
        (arg,) = node.args
        generator = arg.value
        (count,) = generator.for_in.iter.args
        repeated = cst.BinaryOperation(
            left=cst.List([cst.Element(generator.elt)]),
            operator=cst.Multiply(),
            right=count.value,
        )
        flat = node.with_changes(
            args=[cst.Arg(value=repeated)],
            whitespace_before_args=cst.SimpleWhitespace(""),
        )
        if fits_on_one_line(ctx, flat):
            return flat
        # too long for one line: keep the call's layout inside the brackets
        return node.with_changes(args=[arg.with_changes(value=repeated)])
