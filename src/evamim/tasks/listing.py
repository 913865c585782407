"""``evamim list models|teachers|objectives|recipes``: what evamim can build, one table per kind.

Each kind imports only what it describes: ``list recipes`` reads the packaged YAML files and imports no
model code.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Callable, Mapping


def table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table (the last column is not padded)."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [[c for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in zip(columns, line)).rstrip() for line in lines)


def list_models() -> str:
    """The presets of ``evamim.create_model``: size, grid and parameter count (counted on the meta device)."""
    from evamim.models.presets import create_model, list_models as names

    rows = []
    for name in names():
        model = create_model(name, device="meta")
        config = model.config
        size = config.img_size
        image = size[0] if isinstance(size, (tuple, list)) and len(set(size)) == 1 else size
        rows.append({"model": name, "patch": config.patch_size, "image": image,
                     "width": config.embed_dim, "depth": config.depth, "heads": config.num_heads,
                     "params": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"})
    return table(rows, ["model", "params", "patch", "image", "width", "depth", "heads"])


# backend -> (spec form, the Python package it needs)
_SPEC_FORMS = {
    "open_clip": ("open_clip:MODEL/PRETRAINED (a tag, a weights file, or 'random')", "open_clip"),
    "hf": ("hf:MODEL_ID_OR_DIR", "transformers"),
    "timm": ("timm:MODEL[.TAG][/FILE]", "timm"),
    "local": ("local:DIR (an evamim model directory)", None),
}


def list_teachers() -> str:
    """The teacher backends: spec form, an example, the options ``teacher.options`` takes, and whether the
    backend's package is installed."""
    import importlib.util

    from evamim.teachers import factory

    install = getattr(factory, "_PACKAGES", {})
    rows = []
    for backend, (_, example) in factory.BACKENDS.items():
        form, package = _SPEC_FORMS.get(backend, (f"{backend}:TARGET", None))
        installed = package is None or importlib.util.find_spec(package) is not None
        rows.append({"backend": backend, "spec": form, "example": example,
                     "options": ", ".join(factory.accepted_options(backend) + list(factory.TEACHER_OPTIONS)),
                     "installed": "yes" if installed else f"no ({install.get(backend, package)})"})
    named = getattr(factory, "TEACHERS", None) or getattr(factory, "PRESETS", None) or {}
    text = table(rows, ["backend", "spec", "example", "options", "installed"])
    if named:
        text += "\n\nnamed teachers:\n" + table([{"name": k, "spec": v} for k, v in sorted(named.items())],
                                               ["name", "spec"])
    return text + "\n\nset with teacher.spec=SPEC and teacher.options={...} (docs/teachers.md)"


# properties shown first, in this order, when an objective has them (any other yes/no property follows)
_OBJECTIVE_COLUMNS = ("needs_teacher", "uses_masks", "uses_mask_token", "head")


def _objective_properties(name: str) -> tuple[dict[str, Any], str, list[str]]:
    """(properties, one-line description, option names) of a registered objective, from what its registry
    entry carries."""
    import dataclasses
    import inspect

    from evamim.pretrain import objectives

    lookup = getattr(objectives, "objective_spec", None) or objectives.get_objective
    try:
        entry = lookup(name)
    except (TypeError, ValueError):  # an objective that cannot be built without options: its name alone
        return {}, "", []
    entry = getattr(entry, "spec", entry)
    names = [field.name for field in dataclasses.fields(entry)] if dataclasses.is_dataclass(entry) else []
    properties = {key: getattr(entry, key) for key in _OBJECTIVE_COLUMNS if hasattr(entry, key)}
    properties.update({key: getattr(entry, key) for key in names
                       if key not in properties and isinstance(getattr(entry, key), bool)})
    fn = getattr(entry, "fn", None)
    description = getattr(entry, "description", None) or getattr(fn, "__doc__", None) or ""
    options = [p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is inspect.Parameter.KEYWORD_ONLY] if callable(fn) else []
    return properties, (description.strip().splitlines() or [""])[0], options


def list_objectives() -> str:
    """The pre-training objectives (``objective: NAME``): their properties, options and what each one does."""
    from evamim.pretrain import objectives

    rows, columns = [], []
    for name in objectives.list_objectives():
        properties, description, options = _objective_properties(name)
        columns += [key for key in properties if key not in columns]
        rows.append({"objective": name, **{k: ("yes" if v is True else "no" if v is False else v)
                                           for k, v in properties.items()},
                     "options": ", ".join(options) or "-", "description": description})
    return table(rows, ["objective", *columns, "options", "description"])


def list_recipes() -> str:
    """The recipes shipped with evamim, per command: ``--config NAME`` and the recipe's first comment line."""
    from evamim import recipes

    rows = [{"command": command, "recipe": name, "summary": recipes.summary(command, name)}
            for command in recipes.commands() for name in recipes.names(command)]
    return table(rows, ["command", "recipe", "summary"]) + "\n\nuse with: evamim COMMAND --config RECIPE key=value ..."


KINDS: dict[str, Callable[[], str]] = {
    "models": list_models,
    "teachers": list_teachers,
    "objectives": list_objectives,
    "recipes": list_recipes,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", nargs="?", metavar="KIND", help=f"what to list: {', '.join(KINDS)}")


def run(args: argparse.Namespace) -> int:
    kinds = ", ".join(KINDS)
    if args.kind is None:
        print(f"evamim list: say what to list: evamim list KIND with KIND one of {kinds}", file=sys.stderr)
        return 2
    if args.kind not in KINDS:
        close = difflib.get_close_matches(args.kind, list(KINDS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"evamim list: unknown kind {args.kind!r}{hint}; valid kinds: {kinds}", file=sys.stderr)
        return 2
    print(KINDS[args.kind]())
    return 0
