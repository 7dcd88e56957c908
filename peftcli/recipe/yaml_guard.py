"""Bounds on a YAML text, checked on its parse events before it is composed into nodes or built
into Python values.

PyYAML's composer and constructor (and pydantic after them) recurse once per nesting level, and
anchors let a few hundred bytes stand for billions of values ("billion laughs") or for a list that
contains itself. The parser itself is iterative, so one pass over its events can refuse all of
that with the line it happens on, in time and memory linear in the text:
- nesting deeper than MAX_DEPTH (aliases expanded),
- more than MAX_VALUES values once aliases are expanded (sizes are memoised per anchor, so the
  expansion is counted, never done),
- an alias inside the very node it refers to (a cycle),
- a list or mapping as a mapping key (Python cannot hash it), or a key YAML reads as something
  other than a name (`on:` is a boolean, `1:` a number),
- a number or date Python refuses to build (a 5,000-digit integer, month 13).
Ordinary anchors, aliases and merge keys (`<<: *defaults`) pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    MappingStartEvent,
    ScalarEvent,
)

MAX_DEPTH = 50  # a recipe nests 3 or 4 levels
MAX_VALUES = 100_000  # a recipe holds a few dozen

_TAG = "tag:yaml.org,2002:"
_KEY_TAGS = (_TAG + "str", _TAG + "merge")
_BUILT_TAGS = (_TAG + "int", _TAG + "float", _TAG + "timestamp")
_READ_AS = {"bool": "a boolean", "int": "a number", "float": "a number", "null": "null", "timestamp": "a date"}
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = SafeConstructor()


class YamlProblem(Exception):
    """What is wrong and on which line (1-based; None when it has no single line)."""

    def __init__(self, line: int | None, message: str, hint: str | None = None):
        super().__init__(message)
        self.line = line
        self.message = message
        self.hint = hint

    def where(self, prefix: str) -> str:
        return f"{prefix}line {self.line}: {self.message}" if self.line else f"{prefix}{self.message}"


@dataclass
class _Node:
    """A value: its size (values) and height (levels) once its aliases are expanded."""

    line: int
    collection: bool
    size: int = 1
    height: int = 0
    open: bool = True


@dataclass
class _Frame:
    node: _Node
    mapping: bool
    key_next: bool = True  # in a mapping, keys and values alternate


def check_yaml(text: str) -> None:
    """Raise YamlProblem when `text` is unsafe to compose and build (see the module docstring).

    Syntax errors are left to the composer, which reports them with their context."""
    anchors: dict[str, _Node] = {}
    stack: list[_Frame] = []
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, CollectionEndEvent):
                _close(stack)
            elif isinstance(event, (ScalarEvent, AliasEvent, CollectionStartEvent)):
                _visit(event, stack, anchors)
    except yaml.YAMLError:
        return


def _visit(event, stack: list[_Frame], anchors: dict[str, _Node]) -> None:
    line = event.start_mark.line + 1
    parent = stack[-1] if stack else None
    is_key = parent is not None and parent.mapping and parent.key_next
    if parent is not None and parent.mapping:
        parent.key_next = not parent.key_next

    if isinstance(event, AliasEvent):
        node = anchors.get(event.anchor or "")
        if node is None:
            return  # undefined alias: the composer says so
        if node.open:
            raise YamlProblem(
                line,
                f"alias *{event.anchor} refers to the list or mapping that contains it (an endless loop)",
                hint=f"an alias can only repeat a value defined before it, outside it (anchor &{event.anchor} "
                f"is on line {node.line})",
            )
        if is_key and node.collection:
            raise _key_problem(line, "a list or mapping")
        _add(stack, node, line)
        return

    if isinstance(event, ScalarEvent):
        tag = event.tag
        if tag in (None, "!"):  # as the composer resolves it
            tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
        if is_key and tag not in _KEY_TAGS:
            shown = _READ_AS.get(tag.removeprefix(_TAG), tag)
            raise _key_problem(line, f"{shown} ({event.value!r})", quote=event.value)
        if tag in _BUILT_TAGS:
            _check_buildable(event, tag, line)
        node = _Node(line, collection=False)
        if event.anchor:
            anchors[event.anchor] = node
        _add(stack, node, line)
        return

    # a list or mapping opens
    if is_key:
        raise _key_problem(line, "a list or mapping")
    if len(stack) >= MAX_DEPTH:
        raise _too_deep(line)
    node = _Node(line, collection=True, height=1)
    if event.anchor:
        anchors[event.anchor] = node
    stack.append(_Frame(node, mapping=isinstance(event, MappingStartEvent)))


def _close(stack: list[_Frame]) -> None:
    node = stack.pop().node
    node.open = False
    if stack:
        _add(stack, node, node.line)


def _add(stack: list[_Frame], child: _Node, line: int) -> None:
    """Count `child` (expanded) into every open collection's size: the work is one step per event."""
    if not stack:
        return
    parent = stack[-1].node
    if len(stack) + child.height > MAX_DEPTH:  # the child's levels hang below every open one
        raise _too_deep(line)
    parent.height = max(parent.height, child.height + 1)
    parent.size += child.size
    # Each open collection holds its closed children; together they are everything counted so far.
    if sum(frame.node.size for frame in stack) > MAX_VALUES:
        raise YamlProblem(
            line,
            f"the document expands to more than {MAX_VALUES:,} values (aliases repeated in aliases?)",
            hint="a recipe holds a few dozen values; write each one once",
        )


def _check_buildable(event: ScalarEvent, tag: str, line: int) -> None:
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)  # type: ignore[arg-type]
    try:
        SafeConstructor.yaml_constructors[tag](_CONSTRUCTOR, node)
    except (ValueError, OverflowError) as exc:
        shown = event.value if len(event.value) <= 40 else f"{event.value[:20]}...({len(event.value)} characters)"
        raise YamlProblem(
            line,
            f"cannot read {shown} as {_READ_AS[tag.removeprefix(_TAG)]} ({str(exc).split(';')[0]})",
            hint="quote it if it is text",
        ) from None


def _key_problem(line: int, what: str, quote: str | None = None) -> YamlProblem:
    hint = f"quote it ('{quote}') if it is a name" if quote is not None else "a recipe key is a plain name"
    return YamlProblem(line, f"a mapping key here is {what}; keys must be names", hint=hint)


def _too_deep(line: int) -> YamlProblem:
    return YamlProblem(
        line,
        f"nested more than {MAX_DEPTH} levels deep (aliases expanded)",
        hint="a recipe nests a few levels: section, key, value",
    )


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which YAML would otherwise silently resolve to the last."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise YamlProblem(
                    key_node.start_mark.line + 1,
                    f"duplicate key '{key}' (first set on line {seen[key] + 1})",
                    hint="YAML keeps only the last value; delete one of them",
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_checked(text: str) -> tuple[Any, yaml.Node | None]:
    """The value of a YAML document and its composed node (for line numbers), after `check_yaml`.

    Raises YamlProblem, or yaml.YAMLError for a syntax error."""
    check_yaml(text)
    loader = StrictLoader(text)  # a SafeLoader: no Python objects, ever
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()
