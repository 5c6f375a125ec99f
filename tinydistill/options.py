"""Options defined once: the mechanism.

Each run's options are the fields of a config dataclass (``GenConfig``, ``TrainConfig`` in
:mod:`tinydistill.config`, ``AugSpec``): name, type, default and help live there, in
:func:`option` fields. The click
commands are generated from them (:func:`click_options`), recipes are read by one loader
(:func:`load_recipe`), and library errors name fields in backticks (`no_kd`), which the CLI
shows as flags (--no-kd). A new option is one line in one place.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

from .errors import one_line

SECTIONS = ("gen_logits", "train_student", "verify", "quickstart")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable | None = None,
           flag: str | None = None, cli: bool = True, convert: Callable | None = None, cli_default: Any = None,
           **click_kw) -> Any:
    """A config field with its command-line help. ``flag`` renames the option (default
    ``--field-name``); ``cli=False`` keeps it out of the CLI; ``convert`` maps the CLI value to
    the field's (``cli_default`` is then the CLI's default); other keywords go to
    ``click.option`` (type, metavar, multiple, ...)."""
    if cli_default is not None:
        click_kw["default"] = cli_default
    md = {"help": help, "flag": flag, "cli": cli, "convert": convert, "click": click_kw}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _click_type(hint):
    """click type from a type hint: int, float, str, bool, Optional[...], tuple[float, float]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return tuple(typing.get_args(hint))
    return hint if hint in (int, float, str, bool) else None


def click_options(cls, *, exclude: tuple[str, ...] = (), defaults: bool = True):
    """Decorator adding one click option per CLI field of ``cls``, in field order.

    With ``defaults=False`` every option defaults to None (not given), and the help shows the
    field's default instead: for options that fill a nested config (the augmentation spec).
    """
    import click

    hints = typing.get_type_hints(cls, globalns=vars(importlib.import_module(cls.__module__)))

    def deco(fn):
        for f in reversed(dataclasses.fields(cls)):
            md = f.metadata
            if not md.get("cli", False) or f.name in exclude:
                continue
            kw = dict(md.get("click", {}))
            kw.setdefault("help", md.get("help", ""))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            hint = hints.get(f.name)
            if hint is bool or (typing.get_args(hint) and bool in typing.get_args(hint) and "type" not in kw):
                decls = [f"{flag_of(f)}/--no-{f.name.replace('_', '-')}" if default else flag_of(f), f.name]
                fn = click.option(*decls, default=bool(default), is_flag=True, help=kw["help"])(fn)
                continue
            if "type" not in kw and _click_type(hint) is not None:
                kw["type"] = _click_type(hint)
            if required:
                kw["required"] = True
            elif not defaults:
                kw["default"] = None
                if default is not None:
                    kw["help"] += f"  [default: {default}]"
            elif default is not None and not kw.get("multiple"):
                kw.setdefault("default", default)
                kw.setdefault("show_default", True)
            fn = click.option(flag_of(f), f.name, **kw)(fn)
        return fn

    return deco


def from_options(cls, opts: dict, **extra):
    """Build ``cls`` from the CLI's values for its fields (``convert`` applied), plus ``extra``."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in opts and f.metadata.get("cli", False):
            v = opts[f.name]
            conv = f.metadata.get("convert")
            kw[f.name] = conv(v) if conv is not None else v
    return cls(**{**kw, **extra})


def cli_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def flags_in(message: str) -> str:
    """A library message with `field` names, as the CLI says it: --field-name."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m.group(1).replace("_", "-"), message)


class RecipeError(ValueError):
    """A recipe file that cannot be read, or that names options a command does not have."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (a recipe, an augmentation spec)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({one_line(e)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of option names to values")
    return raw


def load_recipe(path: str | Path, command: str, known: set[str] | None = None) -> dict[str, Any]:
    """A YAML recipe's values for one command, flat: top-level keys, the ``augmentation:``
    section and the command's own section (``gen_logits:``, ``train_student:``), in that order
    of precedence (later wins). Other commands' sections are ignored. ``known`` (field names)
    makes unknown keys an error."""
    raw = read_yaml(path)
    section = command.replace("-", "_")
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        k = str(k).replace("-", "_")
        if k in ("augmentation", section) and isinstance(v, dict):
            flat.update({str(kk).replace("-", "_"): vv for kk, vv in v.items()})
        elif k not in SECTIONS:
            flat[k] = v
    if known is not None:
        unknown = sorted(set(flat) - known)
        if unknown:
            raise RecipeError(f"{path}: unknown option(s) {unknown} for {command}")
    return flat
