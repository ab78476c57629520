"""Machinery that maps YAML onto a tree of dataclasses, with typed knobs and early errors.

Every knob is declared with :func:`knob` (a ``dataclasses.field`` carrying its help text and
its constraints). :func:`build` turns a nested dict into the dataclass tree, checking types,
choices and bounds, and names the full key path of anything wrong. Cross-field checks live in
each section's ``validate(path)`` method.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Iterator, Optional

import yaml

from ..errors import ConfigError
from ..registry import Registry

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def knob(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, ge=None, gt=None,
         le=None, path: Optional[str] = None, default_factory: Any = dataclasses.MISSING):
    """A config field: default, help text (for the reference), allowed choices and bounds.
    ``choices``: a list, or a :class:`~repo_megatron.registry.Registry` (the names registered
    when the config is built; the reference lists its built-in ones). ``path``: ``"input"`` (a
    relative value resolves against the config file's directory), ``"gguf"`` (likewise, unless
    it is a packaged name or relative to ``hf_path``) or ``"output"`` (resolves against the
    working directory)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "path": path}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, help: str = ""):
    """A nested section field whose default is the section's defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


_FMT_MAX = 120


def fmt(value: Any) -> str:
    """A value as it would be written in YAML, on one line of at most 120 characters (for
    error messages and the reference)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if value else "''"
    elif isinstance(value, int) and abs(value) >= 10 ** 30:
        text = f"{value:.6g}" if abs(value) < 10 ** 308 else f"an integer of {len(str(abs(value)))} digits"
    else:
        try:
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
        except (yaml.YAMLError, RecursionError, ValueError):
            text = repr(value)
        text = text.removesuffix("\n...")
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text
    return text if len(text) <= _FMT_MAX else text[:_FMT_MAX - 3] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):      # a list item that is itself a section
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={fmt(value)} must be {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={fmt(value)} must be a list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={fmt(value)} must be a mapping")
        return dict(value)
    if tp is float:
        # PyYAML (YAML 1.1) reads "1e-6" (no dot) as a string: accept numeric strings.
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric or (isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip())):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key}={fmt(value)} must be a finite number")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}={fmt(value)} must be {_type_name(tp)}")


def _check_bounds(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if isinstance(choices, Registry):
        choices.check(value, key)
    elif choices is not None and value not in choices:
        raise ConfigError(f"{key}={fmt(value)} must be one of {', '.join(map(fmt, choices))}")
    for name, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<=")):
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key}={fmt(value)} must be {word} {fmt(bound)}")
    # Any integer knob ends up in C code (torch, Arrow, an HTTP server) as a 64-bit integer.
    if isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
        raise ConfigError(f"{key}={fmt(value)} must be a 64-bit integer")


def build(cls: type, data: Optional[dict], path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys, types, choices and bounds."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'} must be a mapping, got {fmt(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        known = ", ".join(fields)
        raise ConfigError(f"{key} is not a known key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if f.metadata.get("section"):
            kwargs[name] = build(hints[name], data.get(name), key)
        elif name in data:
            value = _coerce(data[name], hints[name], key)
            _check_bounds(value, f.metadata, key)
            kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> dict:
    """The dataclass tree as plain YAML-ready data."""
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "a.b.c", v)`` sets ``d["a"]["b"]["c"] = v``, creating mappings."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section (cannot set {dotted})")
        node = child
    node[parts[-1]] = value


def iter_knobs(cls: type, path: str = "") -> Iterator[tuple[str, str, Any, str, dict]]:
    """Yield ``(key, type name, default, help, metadata)`` for every knob, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if f.metadata.get("section"):
            yield key, "section", None, f.metadata.get("help", ""), dict(f.metadata)
            yield from iter_knobs(hints[f.name], key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield key, _type_name(hints[f.name]), default, f.metadata.get("help", ""), dict(f.metadata)
        item = (typing.get_args(hints[f.name]) or (None,))[0]
        if typing.get_origin(hints[f.name]) is list and dataclasses.is_dataclass(item):
            yield from iter_knobs(item, f"{key}[]")   # the keys of each list item


def reference_markdown(cls: type, title: str) -> str:
    """A Markdown table of every knob: key, type, default, meaning (the config reference)."""
    lines = [f"# {title}", "",
             "Generated from the dataclasses in `repo_megatron/config/` by "
             "`python -m repo_megatron.config --reference`; do not edit by hand.", "",
             "Paths: relative input paths written in a config file (data, models, checkpoints "
             "to load) resolve against the config file's directory, so a config works from "
             "any directory. Outputs (run directory, checkpoints, caches) and every path "
             "given as a `key=value` override resolve against the working directory. `~` is "
             "expanded.", "",
             "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, help_text, meta in iter_knobs(cls):
        if type_name == "section":
            lines += ["", f"## `{key}`", "", help_text, "", "| key | type | default | meaning |",
                      "| --- | --- | --- | --- |"]
            continue
        extra = []
        choices = meta.get("choices")
        if isinstance(choices, Registry):
            extra.append("built in: " + ", ".join(f"`{c}`" for c in choices.builtins))
        elif choices:
            extra.append("one of " + ", ".join(f"`{fmt(c)}`" for c in choices))
        for name, word in (("ge", ">="), ("gt", ">"), ("le", "<=")):
            if meta.get(name) is not None:
                extra.append(f"{word} {fmt(meta[name])}")
        text = help_text + {"input": ". A relative path resolves against the config file's "
                                     "directory",
                            "gguf": ". A relative path resolves against hf_path if set, else "
                                    "against the config file's directory",
                            "output": ". A relative path resolves against the working "
                                      "directory"}.get(meta.get("path"), "")
        text = (text + (f" ({'; '.join(extra)})" if extra else "")).replace("|", r"\|")
        lines.append(f"| `{key}` | {type_name} | `{fmt(default)}` | {text} |")
    return "\n".join(lines) + "\n"
