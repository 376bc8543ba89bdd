"""What a mutation rule is: one class that finds sites in a CST and rewrites one node.

A rule plants one kind of bug. It names the bug, says which family it belongs to,
what is wrong and how to fix it (the annotation text), the symptom it should cause
when it stands alone, and carries before/after examples that the test suite runs.
Defining a subclass in any module under `mutations/rules/` registers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

CATEGORIES = (
    "gradients",
    "init",
    "backprop",
    "shape",
    "attention",
    "position",
    "loss",
    "generate",
    "training",
)
SYMPTOMS = ("crash", "nan", "no-learning", "degraded", "wrong-generation")


@dataclass(frozen=True)
class Example:
    """`before` is a source snippet with at least one site; `after` is `before` with
    its first site mutated. The snippet is parsed as a module, so wrap code in the
    class and function it needs when the rule looks at the enclosing scope."""

    before: str
    after: str


@dataclass
class Context:
    """Where the traversal is when a rule looks at a node."""

    scope: str  # qualified name of the enclosing function or class, or "<module>"
    ancestors: list[cst.CSTNode] = field(default_factory=list)  # root first

    @property
    def parent(self) -> cst.CSTNode | None:
        return self.ancestors[-1] if self.ancestors else None

    @property
    def function(self) -> str:
        """The innermost enclosing function's own name ("" at module level)."""
        return self.scope.rsplit(".", 1)[-1] if self.scope != "<module>" else ""

    @property
    def function_node(self) -> cst.FunctionDef | None:
        """The innermost enclosing function definition."""
        for node in reversed(self.ancestors):
            if isinstance(node, cst.FunctionDef):
                return node
        return None

    def assigns_to(self, target: str | m.BaseMatcherNode) -> bool:
        """Is the node the value of an assignment whose single target is `target`
        (a plain name, or a matcher such as `self.weight`)?"""
        if isinstance(target, str):
            target = m.Name(target)
        return m.matches(self.parent, m.Assign(targets=[m.AssignTarget(target=target)]))

    def inside_assignment_to(self, name: str) -> bool:
        """Does the node sit anywhere inside the value of an assignment to `name`?"""
        pattern = m.Assign(targets=[m.AssignTarget(target=m.Name(name))])
        return any(m.matches(a, pattern) for a in self.ancestors)


class Rule:
    """Subclass and fill in the class attributes, `find` and `mutate`."""

    name: str = ""  # kebab-case, names the bug: "softmax-over-queries"
    category: str = ""  # one of CATEGORIES
    description: str = ""  # what is wrong and why it breaks learning (one sentence)
    fix: str = ""  # how to fix it (one sentence)
    symptom: str = ""  # one of SYMPTOMS: what training shows when this bug stands alone
    # the libcst node classes `find` looks at; the walker offers a rule no others
    nodes: tuple[type[cst.CSTNode], ...] = ()
    examples: tuple[Example, ...] = ()
    # source snippets where the rule must find no site (Fixit's VALID list)
    untouched: tuple[str, ...] = ()
    # names of other rules this one must not share an exercise with (they mask or
    # cancel each other); the relation is made symmetric by the planner
    conflicts: tuple[str, ...] = ()

    def find(self, node: cst.CSTNode, ctx: Context) -> bool:
        """Is `node` a site of this rule?"""
        raise NotImplementedError

    def mutate(self, node: cst.CSTNode, ctx: Context) -> cst.CSTNode:
        """The buggy replacement for a node that `find` accepted."""
        raise NotImplementedError


def all_rules() -> list[Rule]:
    """One instance of every rule defined under mutations/rules, sorted by name."""
    import importlib
    import pkgutil

    from mutations import rules as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found: dict[str, type[Rule]] = {}
    stack = list(Rule.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.name:
            if cls.name in found and found[cls.name] is not cls:
                raise ValueError(f"two rules are named {cls.name!r}")
            found[cls.name] = cls
    return [found[name]() for name in sorted(found)]
