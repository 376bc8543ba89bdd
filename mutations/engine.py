"""The data path: clean source -> sites -> plan -> apply -> emit.

Each arrow is one function with plain data between them. Finding and rewriting
share one traversal (`_Walker`), so a site id names the same node in both. Nothing
here imports torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import libcst as cst

from mutations.base import Context, Rule, all_rules

CLEAN_SOURCE = Path(__file__).resolve().parent.parent / "clean_model" / "transformer.py"

# Classes that make up the hand-written tensor parallelism.
SHARDED_CLASSES = frozenset(
    {
        "CopyToShards",
        "ReduceFromShards",
        "SplitToShards",
        "GatherFromShards",
        "LinearShard",
        "ParallelLinear",
        "ColumnParallelLinear",
        "RowParallelLinear",
    }
)
POSITION_SCOPES = frozenset({"sinusoidal_positions"})
DEFAULT_BUGS = (8, 12)
# The planner keeps every exercise to at least one bug of each of these families.
REQUIRED_CATEGORIES = ("gradients", "init", "backprop", "shape")
# How many greedy draws the planner tries before it says a request cannot be met.
PLAN_ATTEMPTS = 20


class PlanError(ValueError):
    """The request cannot be met (unknown rule, too many bugs, ...)."""


class RuleError(PlanError):
    """A rule failed to rewrite its site, or rewrote it into code that does not compile."""


@dataclass(frozen=True)
class Site:
    id: str  # rule name + enclosing qualified name + ordinal: stable across edits elsewhere
    rule: str
    category: str
    scope: str
    line: int  # for people only; never used to address the site
    statement: tuple[int, int]  # (first line, last line) of the innermost statement
    # the node's subtree as a preorder interval [first, last]: exact, unlike lines
    span: tuple[int, int]

    @property
    def sharded(self) -> bool:
        return self.scope.split(".", 1)[0] in SHARDED_CLASSES

    @property
    def positional(self) -> bool:
        return self.category == "position" or self.scope in POSITION_SCOPES

    def overlaps(self, other: Site) -> bool:
        """Same statement, or one node inside the other: two bugs here would interact."""
        if self.statement == other.statement:
            return True
        (a0, a1), (b0, b1) = self.span, other.span
        return a0 <= b1 and b0 <= a1


@dataclass(frozen=True)
class Plan:
    seed: int | None
    site_ids: tuple[str, ...]


@dataclass(frozen=True)
class Mutant:
    plan: Plan
    sites: tuple[Site, ...]  # the planted sites, in source order
    module: cst.Module  # the buggy module with one annotation comment per bug


def parse(source: str) -> cst.Module:
    return cst.parse_module(source)


def rules_by_name(rules: list[Rule] | None = None) -> dict[str, Rule]:
    return {r.name: r for r in (rules if rules is not None else all_rules())}


def _annotation(rule: Rule) -> str:
    description = rule.description.rstrip(".")
    fix = rule.fix.rstrip(".")
    return f"# BUG[{rule.category}]: {description}. Fix: {fix}."


def _is_statement(node: cst.CSTNode) -> bool:
    return isinstance(node, (cst.SimpleStatementLine, cst.BaseCompoundStatement))


class _Walker(cst.CSTTransformer):
    """Visits every node once with every rule; records sites, and rewrites the
    planted ones (with an annotation above their statement) when given a plan.

    Lines are counted from the Newline nodes and multi-line strings passed on the
    way, which costs far less than libcst's position metadata; overlap between
    sites is decided on preorder intervals, which are exact."""

    def __init__(self, rules: list[Rule], planted: frozenset[str] = frozenset()):
        super().__init__()
        self.rules = rules
        self.planted = planted
        self._by_type: dict[type, list[Rule]] = {}
        self._scopes: list[str] = []
        self._ancestors: list[cst.CSTNode] = []
        self._statements: list[tuple[cst.CSTNode, int]] = []  # (node, first line)
        self._counts: dict[tuple[str, str], int] = {}
        self._line = 1
        self._order = 0
        self._found: list[dict] = []
        self._ends: dict[int, tuple[int, int]] = {}  # id(node) -> (preorder end, line)
        self._to_mutate: dict[int, tuple[Rule, Context]] = {}
        self._to_annotate: dict[int, Rule] = {}

    @property
    def sites(self) -> list[Site]:
        return [
            Site(
                id=f["id"],
                rule=f["rule"].name,
                category=f["rule"].category,
                scope=f["scope"],
                line=f["line"],
                statement=(f["stmt_line"], self._ends[f["stmt"]][1] - 1),
                span=(f["start"], self._ends[f["node"]][0]),
            )
            for f in self._found
        ]

    def _rules_for(self, node_type: type) -> list[Rule]:
        rules = self._by_type.get(node_type)
        if rules is None:
            rules = [r for r in self.rules if issubclass(node_type, r.nodes)]
            self._by_type[node_type] = rules
        return rules

    def on_visit(self, node: cst.CSTNode) -> bool:
        self._order += 1
        if _is_statement(node):
            self._statements.append((node, self._line + len(node.leading_lines)))
        rules = self._rules_for(type(node))
        if rules:
            ctx = Context(".".join(self._scopes) or "<module>", list(self._ancestors))
            for rule in rules:
                if rule.find(node, ctx):
                    self._record(rule, node, ctx)
        if isinstance(node, (cst.FunctionDef, cst.ClassDef)):
            self._scopes.append(node.name.value)
        self._ancestors.append(node)
        return True

    def _record(self, rule: Rule, node: cst.CSTNode, ctx: Context) -> None:
        key = (rule.name, ctx.scope)
        ordinal = self._counts.get(key, 0)
        self._counts[key] = ordinal + 1
        site_id = f"{rule.name}:{ctx.scope}:{ordinal}"
        stmt, stmt_line = self._statements[-1] if self._statements else (node, 1)
        self._found.append(
            {
                "id": site_id,
                "rule": rule,
                "scope": ctx.scope,
                "line": self._line,
                "start": self._order,
                "node": id(node),
                "stmt": id(stmt),
                "stmt_line": stmt_line,
            }
        )
        self._ends[id(node)] = self._ends[id(stmt)] = (0, 0)  # filled in on leave
        if site_id in self.planted:
            self._to_mutate[id(node)] = (rule, ctx)
            self._to_annotate[id(stmt)] = rule

    def on_leave(self, original_node, updated_node):
        self._ancestors.pop()
        if isinstance(original_node, cst.Newline):
            self._line += 1
        elif isinstance(
            original_node,
            (cst.SimpleString, cst.SimpleWhitespace, cst.FormattedStringText),
        ):
            self._line += original_node.value.count("\n")
        elif isinstance(original_node, (cst.FunctionDef, cst.ClassDef)):
            self._scopes.pop()
        if id(original_node) in self._ends:
            self._ends[id(original_node)] = (self._order, self._line)
        planted = self._to_mutate.get(id(original_node))
        if planted is not None:
            rule, ctx = planted
            try:
                updated_node = rule.mutate(updated_node, ctx)
            except Exception as e:
                raise RuleError(
                    f"rule {rule.name} failed to rewrite its site: {e}"
                ) from e
            if not isinstance(updated_node, cst.CSTNode):
                kind = type(updated_node).__name__
                raise RuleError(
                    f"rule {rule.name} returned a {kind}, not a libcst node"
                )
        if _is_statement(original_node):
            self._statements.pop()
            rule = self._to_annotate.get(id(original_node))
            if rule is not None:
                comment = cst.EmptyLine(
                    indent=True, comment=cst.Comment(_annotation(rule))
                )
                lines = [*updated_node.leading_lines, comment]
                updated_node = updated_node.with_changes(leading_lines=lines)
        return updated_node


def find_sites(module: cst.Module, rules: list[Rule] | None = None) -> list[Site]:
    """Every site of every rule in `module`, in source order."""
    walker = _Walker(rules if rules is not None else all_rules())
    module.visit(walker)
    return walker.sites


def apply(module: cst.Module, plan: Plan, rules: list[Rule] | None = None) -> Mutant:
    """Rewrite the planted sites of `module`, one annotation comment above each.

    Only the planted sites' rules run: a site's ordinal counts its own rule's
    matches alone, so their ids come out the same as in `find_sites`."""
    wanted = {site_id.split(":", 1)[0] for site_id in plan.site_ids}
    rules = [
        r for r in (rules if rules is not None else all_rules()) if r.name in wanted
    ]
    walker = _Walker(rules, frozenset(plan.site_ids))
    mutated = module.visit(walker)
    planted = tuple(s for s in walker.sites if s.id in plan.site_ids)
    missing = set(plan.site_ids) - {s.id for s in planted}
    if missing:
        raise PlanError(f"no such site: {sorted(missing)[0]}")
    return Mutant(plan=plan, sites=planted, module=mutated)


# ----------------------------------------------------------------------------- emit


class _StripComments(cst.CSTTransformer):
    """Removes every comment, and the line it stood on, without touching anything else."""

    def leave_EmptyLine(self, original_node, updated_node):
        if updated_node.comment is not None:
            return cst.RemoveFromParent()
        return updated_node

    def leave_TrailingWhitespace(self, original_node, updated_node):
        if updated_node.comment is not None:
            return updated_node.with_changes(
                whitespace=cst.SimpleWhitespace(""), comment=None
            )
        return updated_node


def strip_comments(module: cst.Module) -> cst.Module:
    return module.visit(_StripComments())


def header(plan: Plan) -> list[cst.EmptyLine]:
    text = [
        f"# bugforge exercise, seed {plan.seed}; planted bugs: {len(plan.site_ids)}",
        *(f"#   {site_id}" for site_id in plan.site_ids),
    ]
    return [cst.EmptyLine(comment=cst.Comment(line)) for line in text]


def emit_annotated(mutant: Mutant) -> str:
    module = mutant.module
    return module.with_changes(header=[*header(mutant.plan), *module.header]).code


def emit_stripped(mutant: Mutant) -> str:
    return strip_comments(mutant.module).code


def emit_clean(module: cst.Module) -> str:
    return strip_comments(module).code


# ----------------------------------------------------------------------------- plan


def _conflicting_rules(rules: dict[str, Rule]) -> set[frozenset[str]]:
    pairs = set()
    for rule in rules.values():
        for other in rule.conflicts:
            pairs.add(frozenset((rule.name, other)))
    return pairs


def make_plan(
    seed: int,
    sites: list[Site],
    n_bugs: int | None = None,
    rules: list[Rule] | None = None,
    only: set[str] | None = None,
) -> Plan:
    """Draw a seeded, non-overlapping set of sites.

    Deterministic for a seed: the draw runs on the sites sorted by id with
    `random.Random(seed)`. At most one site per rule (two sites of one rule can
    cancel, as a transpose in the split and in the merge of heads would), never two
    in one statement, no pair of rules that declare a conflict, never a majority of
    crash bugs, and at least one of each REQUIRED_CATEGORIES, one in the sharded code
    and one in the positional embedding when the candidates allow. `only` restricts
    the candidates to these rule names or categories; without `n_bugs` it then plants
    as many of them as fit, up to the default. A greedy draw can paint itself into a
    corner (a site spanning a whole method blocks every other site in it), so a draw
    that falls short is retried, still from the same generator.
    """
    by_name = rules_by_name(rules)
    rng = random.Random(seed)
    candidates = sorted(
        (s for s in sites if only is None or s.rule in only or s.category in only),
        key=lambda s: s.id,
    )
    exact = n_bugs is not None
    if n_bugs is None:
        n_bugs = rng.randint(*DEFAULT_BUGS)
        if only is not None:
            n_bugs = min(n_bugs, len({s.rule for s in candidates}))
    if n_bugs < 1:
        raise PlanError(
            f"--bugs must be at least 1, not {n_bugs}"
            if exact
            else "no selectable site matches the request"
        )
    conflicts = _conflicting_rules(by_name)
    best: list[Site] = []
    for _ in range(PLAN_ATTEMPTS):
        chosen = _draw(rng, candidates, n_bugs, by_name, conflicts)
        if len(chosen) > len(best):
            best = chosen
        if len(best) == n_bugs:
            break
    if len(best) < n_bugs and (exact or not best):
        raise PlanError(
            f"at most {len(best)} non-overlapping bugs could be planted here"
            f" (best of {PLAN_ATTEMPTS} draws), not {n_bugs}"
        )
    best.sort(key=lambda s: (s.line, s.id))
    return Plan(seed=seed, site_ids=tuple(s.id for s in best))


def _draw(
    rng: random.Random,
    candidates: list[Site],
    n_bugs: int,
    by_name: dict[str, Rule],
    conflicts: set[frozenset[str]],
) -> list[Site]:
    """One greedy draw: the required kinds of site first, then the rest at random."""
    chosen: list[Site] = []

    def compatible(site: Site) -> bool:
        if by_name[site.rule].symptom == "crash":
            crashes = sum(by_name[c.rule].symptom == "crash" for c in chosen)
            if 2 * (crashes + 1) > n_bugs:
                return False
        return all(
            site.rule != c.rule
            and not site.overlaps(c)
            and frozenset((site.rule, c.rule)) not in conflicts
            for c in chosen
        )

    requirements = [
        *(lambda s, c=c: s.category == c for c in REQUIRED_CATEGORIES),
        lambda s: s.sharded,
        lambda s: s.positional,
    ]
    for wanted in requirements:
        if len(chosen) >= n_bugs or any(wanted(c) for c in chosen):
            continue
        pool = [s for s in candidates if wanted(s) and compatible(s)]
        if pool:
            chosen.append(rng.choice(pool))
    rest = [s for s in candidates if s not in chosen]
    rng.shuffle(rest)
    for site in rest:
        if len(chosen) >= n_bugs:
            break
        if compatible(site):
            chosen.append(site)
    return chosen
