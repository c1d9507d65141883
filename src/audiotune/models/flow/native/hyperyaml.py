"""Reading CosyVoice / Step-Audio-EditX release yamls (hyperpyyaml) as data, never as code.

A release ``cosyvoice.yaml`` is written for ``hyperpyyaml.load_hyperpyyaml``, which imports and
calls every class and function the file names (``!new:``, ``!name:``, ``!apply:``). A yaml is
user input, so we parse it with PyYAML's ``SafeLoader`` plus constructors that turn those tags
into inert records:

* ``!new:dotted.Class`` → :class:`New` (the class name and its keyword / positional arguments);
* ``!name:dotted.fn`` → :class:`Name` (a function with bound keyword arguments, e.g. ``feat_extractor``);
* ``!apply:dotted.fn`` → :class:`Apply`, never evaluated (``__set_seed1: !apply:random.seed``);
* ``!ref <key>`` / ``!copy <key>`` → the referenced value; an expression such as
  ``!ref <chunk_size> * <token_mel_ratio>`` is evaluated as arithmetic on numbers only;
* ``!tuple`` → a tuple; ``!new:omegaconf.DictConfig {content: …}`` → the plain ``content`` dict.

Only the sections asked for (by default ``flow``, ``hift`` and the mel settings) have their
references resolved; the rest of the file (the ``llm:`` section, the data pipeline, tokenizer
getters) is parsed but left alone. ``!!python/…`` tags and any other unknown tag are refused with
one line naming them. Nothing named in the file is imported or executed: builders dispatch on
:attr:`New.cls` against a fixed set of supported class names. (hyperpyyaml itself cannot be used:
loading *is* executing in it.)
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from audiotune.errors import ModelLoadError

DEFAULT_SECTIONS = ("flow", "hift", "feat_extractor", "mel_conf")
_REF = re.compile(r"<([^<>]+)>")


class ReleaseYamlError(ModelLoadError, ValueError):
    """A release yaml that cannot be read as data (bad YAML, a forbidden tag, a dangling ``!ref``)."""


@dataclass(frozen=True)
class New:
    """``!new:cls`` — the class to build and its arguments (plain data or nested nodes)."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: tuple = ()

    @property
    def short(self) -> str:
        """The class's own name, e.g. ``MaskedDiffWithXvec``."""
        return self.cls.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        """A keyword argument, or ``default`` when the yaml omits it."""
        return self.kwargs.get(key, default)


@dataclass(frozen=True)
class Name:
    """``!name:target`` — a function with bound keyword arguments (not called)."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Apply:
    """``!apply:target`` — a call the file asks for at load time; never evaluated here."""

    target: str
    args: Any = None


@dataclass(frozen=True)
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    """SafeLoader plus inert constructors for the hyperpyyaml tags."""


# YAML 1.2 floats such as ``1e-06`` (hyperpyyaml reads with ruamel, YAML 1.2); PyYAML's 1.1 rules read them as strings.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _value(loader: _Loader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def _new(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
    value = _value(loader, node)
    if isinstance(value, dict):
        if suffix == "omegaconf.DictConfig":
            return dict(value.get("content", {}))
        return New(suffix, {str(k): v for k, v in value.items()})
    if isinstance(value, list):
        return New(suffix, {}, tuple(value))
    return New(suffix, {}, () if value in ("", None) else (value,))


def _name(loader: _Loader, suffix: str, node: yaml.Node) -> Name:
    value = _value(loader, node)
    return Name(suffix, {str(k): v for k, v in value.items()} if isinstance(value, dict) else {})


def _apply(loader: _Loader, suffix: str, node: yaml.Node) -> Apply:
    return Apply(suffix, _value(loader, node))


def _ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


def _tuple(loader: _Loader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


def _forbidden(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
    raise ReleaseYamlError(f"tag {node.tag!r} (line {node.start_mark.line + 1}) is not allowed: "
                           "a release yaml is read as data and nothing it names is imported")


_Loader.add_multi_constructor("!new:", _new)
_Loader.add_multi_constructor("!name:", _name)
_Loader.add_multi_constructor("!apply:", _apply)
_Loader.add_constructor("!ref", _ref)
_Loader.add_constructor("!copy", _ref)
_Loader.add_constructor("!tuple", _tuple)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _forbidden)
_Loader.add_multi_constructor("!", _forbidden)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _arithmetic(expr: str) -> int | float:
    """Evaluate ``expr`` if it is numbers and + - * / // % ** only (no names, no calls)."""
    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ReleaseYamlError(f"!ref expression {expr!r} is not plain arithmetic")
    try:
        return ev(ast.parse(expr, mode="eval"))
    except SyntaxError:
        raise ReleaseYamlError(f"!ref expression {expr!r} is not plain arithmetic") from None


class _Resolver:
    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.doc, self.source, self.active = doc, source, set()

    def lookup(self, key: str) -> Any:
        parts = [p for p in re.split(r"[.\[\]]", key.strip()) if p]
        if key in self.active:
            raise ReleaseYamlError(f"{self.source}: !ref <{key}> refers to itself")
        value: Any = self.doc
        for part in parts:
            if isinstance(value, New):
                value = value.kwargs
            if not isinstance(value, dict) or part not in value:
                raise ReleaseYamlError(f"{self.source}: !ref <{key}> names nothing in the file")
            value = value[part]
        self.active.add(key)
        try:
            return self.resolve(value)
        finally:
            self.active.discard(key)

    def ref(self, expr: str) -> Any:
        whole = _REF.fullmatch(expr.strip())
        if whole:
            return self.lookup(whole.group(1))

        def number(match: re.Match) -> str:
            value = self.lookup(match.group(1))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ReleaseYamlError(f"{self.source}: !ref {expr!r}: <{match.group(1)}> is not a number")
            return repr(value)
        try:
            return _arithmetic(_REF.sub(number, expr))
        except ReleaseYamlError as err:
            raise ReleaseYamlError(f"{self.source}: {err}") from None

    def resolve(self, value: Any) -> Any:
        if isinstance(value, _Ref):
            return self.ref(value.expr)
        if isinstance(value, New):
            return New(value.cls, {k: self.resolve(v) for k, v in value.kwargs.items()},
                       tuple(self.resolve(v) for v in value.args))
        if isinstance(value, Name):
            return Name(value.target, {k: self.resolve(v) for k, v in value.kwargs.items()})
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.resolve(v) for v in value)
        return value


def parse_release_yaml(text: str, source: str = "<yaml>",
                       sections: tuple[str, ...] = DEFAULT_SECTIONS) -> dict[str, Any]:
    """Parse a release yaml's text; see :func:`load_release_yaml`."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader with inert constructors
    except ReleaseYamlError as err:
        raise ReleaseYamlError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ReleaseYamlError(f"{source}: not readable YAML ({' '.join(str(err).split())})") from None
    if not isinstance(doc, dict):
        raise ReleaseYamlError(f"{source}: expected a mapping at the top level, got {type(doc).__name__}")
    resolver = _Resolver(doc, source)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in sections:
            out[key] = resolver.resolve(value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        elif isinstance(value, _Ref):
            try:
                resolved = resolver.resolve(value)
            except ReleaseYamlError:
                continue
            if isinstance(resolved, (int, float, str, bool)):
                out[key] = resolved
    return out


def load_release_yaml(path: str | Path, sections: tuple[str, ...] = DEFAULT_SECTIONS) -> dict[str, Any]:
    """Read a hyperpyyaml release file as data.

    Args:
        path: The yaml (``cosyvoice.yaml``, ``cosyvoice2.yaml``, …).
        sections: Top-level sections to return with their references resolved; every other
            top-level entry is returned only when it is (or refers to) a plain scalar.

    Returns:
        The requested sections (as :class:`New` / :class:`Name` / plain data) and the top-level scalars.

    Raises:
        ReleaseYamlError: Unreadable YAML, a ``!!python/…`` or unknown tag, a dangling or
            non-arithmetic ``!ref`` inside a requested section.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ReleaseYamlError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_release_yaml(text, str(path), sections)
