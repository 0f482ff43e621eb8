"""Build ldm's models from the ``_target_`` configs a checkpoint or a model folder records.

Inference must not need Hydra, so this is a small instantiation of its own: a config is a mapping with
``_target_`` (a class path) and the class's constructor arguments. Only classes under ``ldm.models`` and
``ldm.diffusion`` are built: a config read from a file names what is built, and a file must never make
the loader import or call arbitrary code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

ALLOWED_PACKAGES = ("ldm.models.", "ldm.diffusion.")


def resolve_target(target: str) -> type:
    """The class a ``_target_`` string names (``package.module.Class``), from ldm's model packages only."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PACKAGES):
        raise ValueError(f"_target_={target!r}: a model config may only build classes under "
                         f"{' or '.join(p.rstrip('.') for p in ALLOWED_PACKAGES)}")
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"_target_={target!r} names no class ({error})") from error
    if not inspect.isclass(cls):
        raise ValueError(f"_target_={target!r} is not a class")
    return cls


def constructor_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every constructor argument of the class a ``_target_`` config builds: the config's values, the
    class's defaults for the rest (what an exporter needs to describe the built model)."""
    cls = resolve_target(config["_target_"])
    given = {key: value for key, value in config.items() if not key.startswith("_")}
    try:
        bound = inspect.signature(cls).bind_partial(**given)
    except TypeError as error:
        raise ValueError(f"{config['_target_']}: {error}") from error
    bound.apply_defaults()
    return dict(bound.arguments)


def _is_config(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _nested(value: Any, apply: Any) -> Any:
    """``apply`` on an argument that is a ``_target_`` config, or on each config of a list of them (the text
    towers of a ``TextConditioner``); any other value unchanged."""
    if _is_config(value):
        return apply(value)
    if isinstance(value, (list, tuple)) and any(_is_config(item) for item in value):
        return [_nested(item, apply) for item in value]
    return value


def build(config: Mapping[str, Any]) -> Any:
    """Instantiate a ``_target_`` config; arguments that are ``_target_`` configs, or lists of them, are built first."""
    arguments = constructor_arguments(config)
    return resolve_target(config["_target_"])(**{key: _nested(value, build) for key, value in arguments.items()})


def full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``_target_`` config with every constructor argument spelled out (defaults filled), nested ones too."""
    return {"_target_": config["_target_"],
            **{key: _nested(value, full_config) for key, value in constructor_arguments(config).items()}}
