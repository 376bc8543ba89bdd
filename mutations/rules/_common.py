"""Matchers and node builders that several rule families share (no rules here)."""

import libcst as cst
import libcst.matchers as m

LINE_LENGTH = 88  # ruff's, from pyproject.toml

# `-1` as written in the source
MINUS_ONE = m.UnaryOperation(operator=m.Minus(), expression=m.Integer("1"))
# `@torch.no_grad()`
NO_GRAD = m.Decorator(
    decorator=m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("no_grad")))
)
# `, ` between two arguments
COMMA = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))


def method_call(name, receiver=m.DoNotCare(), args=m.DoNotCare()):
    """`<receiver>.<name>(<args>)`"""
    return m.Call(func=m.Attribute(value=receiver, attr=m.Name(name)), args=args)


def negative(n):
    """The literal `-n`."""
    return cst.UnaryOperation(operator=cst.Minus(), expression=cst.Integer(str(n)))


def keyword_arg(name, value):
    """`name=value`, spaced as ruff formats a keyword argument."""
    return cst.Arg(
        keyword=cst.Name(name),
        value=value,
        equal=cst.AssignEqual(
            whitespace_before=cst.SimpleWhitespace(""),
            whitespace_after=cst.SimpleWhitespace(""),
        ),
    )


def mirrored_colon(piece):
    """The slice's colon with its spacing swapped, for when its bound moves to the
    other side (`-n :` becomes `: n`)."""
    colon = piece.first_colon
    return colon.with_changes(
        whitespace_before=colon.whitespace_after,
        whitespace_after=colon.whitespace_before,
    )


def code(node):
    """The source text of a node."""
    return cst.Module(body=[]).code_for_node(node)


def statement_indent(ctx):
    """Width of the indentation of the statement the node sits in."""
    unit = ctx.ancestors[0].default_indent if ctx.ancestors else "    "
    return sum(
        len(unit if block.indent is None else block.indent)
        for block in ctx.ancestors
        if isinstance(block, cst.IndentedBlock)
    )


def fits_on_one_line(ctx, value):
    """Would the assignment the node is the value of fit on one line with `value`?"""
    line = code(ctx.parent.with_changes(value=value))
    return statement_indent(ctx) + len(line) <= LINE_LENGTH


def is_shard_list(ctx):
    """Is the node the shard list of a ParallelLinear (self.weight = ...)?"""
    return ctx.scope == "ParallelLinear.__init__" and ctx.assigns_to(
        m.Attribute(value=m.Name("self"), attr=m.Name("weight"))
    )
