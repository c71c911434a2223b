"""The grammar of the shapes dataset's referring expressions: build, parse and resolve.

An expression names a target by attributes ("the small red circle"), by position among its
kind ("the leftmost square", "the green triangle at the top") or by relation to an anchor
("the star left of the blue circle"). `resolve` returns every object an expression could
mean; the generator keeps an expression only when that is exactly its target.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("circle", "square", "triangle", "star")
COLORS = {"red": (215, 45, 40), "green": (40, 170, 60), "blue": (45, 85, 215), "yellow": (225, 200, 35)}
SIZES = ("small", "big")
POSITIONS = ("leftmost", "rightmost", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
MARGIN = 8.0  # px: positions closer than this are not told apart


@dataclass(frozen=True)
class Desc:
    kind: str | None  # None only in generalised expressions: any kind ("the red shapes")
    color: str | None = None
    size: str | None = None

    def text(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.kind) if w)

    def matches(self, obj: dict) -> bool:
        return (obj["kind"] == self.kind and self.color in (None, obj["color"])
                and self.size in (None, obj["size"]))


@dataclass(frozen=True)
class Expression:
    target: Desc
    position: str | None = None
    relation: str | None = None
    anchor: Desc | None = None

    @property
    def type(self) -> str:
        return "relation" if self.relation else "position" if self.position else "attribute"

    def text(self) -> str:
        if self.position in ("leftmost", "rightmost"):
            return f"the {self.position} {self.target.text()}"
        if self.position:
            return f"the {self.target.text()} at the {self.position}"
        if self.relation:
            return f"the {self.target.text()} {self.relation} the {self.anchor.text()}"
        return f"the {self.target.text()}"


_DESC = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join(KINDS)})"
_PATTERNS = [
    (re.compile(rf"the (leftmost|rightmost) {_DESC}"), "position_prefix"),
    (re.compile(rf"the {_DESC} at the (top|bottom)"), "position_suffix"),
    (re.compile(rf"the {_DESC} ({'|'.join(RELATIONS)}) the {_DESC}"), "relation"),
    (re.compile(rf"the {_DESC}"), "attribute"),
]


def parse(text: str) -> Expression:
    """Parse an expression produced by `Expression.text()` (or its left/right mirror)."""
    for pattern, form in _PATTERNS:
        m = pattern.fullmatch(text.strip())
        if m is None:
            continue
        g = m.groups()
        if form == "position_prefix":
            return Expression(Desc(g[3], g[2], g[1]), position=g[0])
        if form == "position_suffix":
            return Expression(Desc(g[2], g[1], g[0]), position=g[3])
        if form == "relation":
            return Expression(Desc(g[2], g[1], g[0]), relation=g[3], anchor=Desc(g[6], g[5], g[4]))
        return Expression(Desc(g[2], g[1], g[0]))
    raise ValueError(f"not a shapes expression: {text!r}")


def _center(obj: dict) -> tuple[float, float]:
    return obj["cx"], obj["cy"]


def resolve(expr: Expression, objects: list[dict]) -> list[int]:
    """Indices of every object `expr` may refer to; a clear reference returns exactly one.

    Positional comparisons are only decisive beyond `MARGIN` pixels; anything closer counts as
    a possible match, which makes the expression ambiguous.
    """
    cands = [i for i, o in enumerate(objects) if expr.target.matches(o)]
    if expr.position:
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "top": (1, 1), "bottom": (1, -1)}[expr.position]
        key = {i: sign * _center(objects[i])[axis] for i in cands}
        best = min(key.values(), default=0.0)
        return [i for i in cands if key[i] < best + MARGIN]
    if expr.relation:
        anchors = [i for i, o in enumerate(objects) if expr.anchor.matches(o)]
        if len(anchors) != 1:
            return []  # the anchor itself must be unambiguous
        a = _center(objects[anchors[0]])
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[expr.relation]
        # offset > 0 means "in the named direction"; only beyond MARGIN is it decisive.
        offsets = {i: sign * (_center(objects[i])[axis] - a[axis]) for i in cands if i != anchors[0]}
        possible = [i for i, off in offsets.items() if off > -MARGIN]
        if len(possible) == 1 and offsets[possible[0]] <= MARGIN:
            return []  # the only candidate is too close to the anchor to be clearly there
        return possible
    return cands


# ---- generalised expressions: zero, one or many referred objects ----------------------------

QUANTIFIERS = ("the", "all the", "every", "both")  # plural "the", "all the"; singular "every"; exactly two "both"


@dataclass(frozen=True)
class SetExpression:
    """An expression naming every object its description matches: "the red shapes", "all the
    small stars", "every blue circle", "both squares"; or, with `singular`, "the green
    triangle" (used for expressions that name nothing in the image).

    A description without a kind ("the red shapes") matches objects of any kind.
    """

    target: Desc
    quantifier: str = "the"
    singular: bool = False

    def text(self) -> str:
        words = [w for w in (self.target.size, self.target.color) if w]
        noun = self.target.kind or "shape"
        if self.singular:
            return " ".join(["the", *words, noun])
        if self.quantifier == "every":
            return " ".join(["every", *words, noun])
        return " ".join([self.quantifier, *words, noun + "s"])

    def resolve(self, objects: list[dict]) -> list[int]:
        """Indices of every object the expression names; `both` names its pair only when
        exactly two objects match, else nothing certain (returns [])."""
        found = [i for i, o in enumerate(objects) if set_matches(self.target, o)]
        if self.quantifier == "both" and not self.singular and len(found) != 2:
            return []
        return found


def set_matches(desc: Desc, obj: dict) -> bool:
    """`Desc.matches`, with a missing kind matching any kind."""
    return (desc.kind in (None, obj["kind"]) and desc.color in (None, obj["color"])
            and desc.size in (None, obj["size"]))


_SET_DESC = rf"(?:({'|'.join(SIZES)}) )?(?:({'|'.join(COLORS)}) )?({'|'.join((*KINDS, 'shape'))})"
_SET_PATTERNS = [
    (re.compile(rf"(the|all the|both) {_SET_DESC}s"), False),
    (re.compile(rf"(every) {_SET_DESC}"), False),
    (re.compile(rf"(the) {_SET_DESC}"), True),
]


def parse_set(text: str) -> SetExpression:
    """Parse a `SetExpression.text()` (which is also how a singular no-target one reads)."""
    for pattern, singular in _SET_PATTERNS:
        m = pattern.fullmatch(text.strip())
        if m:
            q, size, color, kind = m.groups()
            return SetExpression(Desc(None if kind == "shape" else kind, color, size), q, singular)
    raise ValueError(f"not a generalised shapes expression: {text!r}")
