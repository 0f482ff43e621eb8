"""Start-up checks of a composed config against the constructors it calls.

Every node with a ``_target_`` is compared with the signature of the class or function it names:
a key that is no argument, or a value whose type the annotation rules out, stops the run with one
line naming the key, before any data is read or model built. A plain mapping given for an argument
annotated with an options dataclass (``data.filters``, ``data.synthetic``, ``model.mode.pretrained``) is
checked against that dataclass's fields and built, so its range checks (``__post_init__``) run too.
Library code turns such mappings into the dataclass with ``build_options``, the same check.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import pathlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")

_SKIP = object()  # a value the checks leave to another node (a nested ``_target_``)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message is one line that names the key."""


def check_number(key: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False) -> float:
    """``value`` as a float if it is a finite real number in range, else ``ConfigError`` naming ``key``.

    ``minimum``/``maximum`` are inclusive; ``strict_minimum`` makes the lower bound exclusive (``> minimum``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict_minimum else '>='} {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}={value!r} must be <= {maximum:g}")
    return float(value)


def locate(path: str, key: str) -> Callable[..., Any]:
    """The object that a dotted ``_target_`` path names; ``ConfigError`` naming ``key`` if there is none."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        try:
            for name in parts[split:]:
                found = getattr(found, name)
        except AttributeError:
            break
        return found
    raise ConfigError(f"{key}._target_={path!r} names nothing importable; check the spelling")


def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # annotations that do not evaluate here (a library's forward references): no type checks
        return {}


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _options_class(annotation: Any) -> type | None:
    """The dataclass among the members of ``annotation``, if one is."""
    for member in _union_members(annotation):
        if dataclasses.is_dataclass(member) and inspect.isclass(member):
            return member
    return None


def _matches(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` (plain Python data) fits ``annotation``; None where the checks cannot judge."""
    if annotation is Any:
        return True
    members = _union_members(annotation)
    if len(members) > 1:
        verdicts = [_matches(value, member) for member in members]
        return True if True in verdicts else (None if None in verdicts else False)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, pathlib.Path):
        return isinstance(value, (str, pathlib.Path))
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        arguments = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if len(arguments) == 1:
            verdicts = [_matches(item, arguments[0]) for item in value]
            return False if False in verdicts else (None if None in verdicts else True)
        return True
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return None


def _describe(annotation: Any) -> str:
    names = []
    for member in _union_members(annotation):
        if member is type(None):
            names.append("null")
        elif inspect.isclass(member) and typing.get_origin(member) is None:
            names.append(member.__name__)
        else:
            names.append(str(member).replace("typing.", ""))
    return " or ".join(names)


def check_arguments(target: Callable[..., Any], values: Mapping[str, Any], key: str,
                    sources: Mapping[str, str] | None = None) -> None:
    """Raise ``ConfigError`` naming ``key.name`` for a name that is no argument of ``target`` or a value
    whose type its annotation rules out; a mapping for an options-dataclass argument is checked (and
    built) in turn. ``values`` hold plain Python data; entries equal to ``_SKIP`` are not judged.
    ``sources``: the interpolation a value came from, by name, so the error names where to fix it."""
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    hints = _type_hints(target)
    target_name = getattr(target, "__qualname__", repr(target))
    for name, value in values.items():
        full_key = f"{key}.{name}" if key else name
        if name not in parameters:
            if takes_any:
                continue
            accepted = [p for p in parameters if p != "self"]
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean {key}.{close[0]}? " if close else ""
            raise ConfigError(f"{full_key} is not an argument of {target_name}; {hint}it takes: {', '.join(accepted)}")
        if value is _SKIP or name not in hints:
            continue
        options = _options_class(hints[name])
        if options is not None and isinstance(value, Mapping):
            build_options(options, value, full_key)
        elif _matches(value, hints[name]) is False:
            source = f" (set by {sources[name]})" if sources and name in sources else ""
            raise ConfigError(f"{full_key}={value!r}{source} has the wrong type: it must be {_describe(hints[name])}")


def build_options(cls: type[T], values: T | Mapping[str, Any] | None, key: str) -> T | None:
    """``values`` as an instance of the options dataclass ``cls``: a mapping is checked field by field
    (``check_arguments``) and built (``__post_init__`` checks ranges); an instance or None passes.
    Errors name ``key`` and the field."""
    if values is None or isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{key}={values!r} must be a mapping of {cls.__name__}'s fields")
    plain = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
    check_arguments(cls, plain, key)
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in plain]
    if required:
        raise ConfigError(f"{key}.{required[0]} is required: {cls.__name__} has no default for it")
    try:
        return cls(**plain)
    except ConfigError:
        raise
    except ValueError as error:  # a range check in __post_init__; its message names the key already or not
        message = str(error)
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from error


def _plain(node: Any, key: str) -> Any:
    if isinstance(node, DictConfig) and "_target_" in node:
        return _SKIP
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception as error:  # an interpolation that does not resolve, a missing value deeper down
            raise ConfigError(f"{key}: {error}".splitlines()[0]) from error
    return node


def check_config(cfg: DictConfig, key: str = "") -> None:
    """Check every ``_target_`` node of ``cfg`` (recursively) against the signature it calls; see the module."""
    if isinstance(cfg, ListConfig):
        for index, item in enumerate(cfg):
            check_config(item, f"{key}[{index}]")
        return
    if not isinstance(cfg, DictConfig):
        return
    if "_target_" in cfg:
        target = locate(str(cfg._target_), key)
        values, sources = {}, {}
        for name in cfg:
            if str(name).startswith("_"):
                continue
            full_key = f"{key}.{name}" if key else str(name)
            if OmegaConf.is_missing(cfg, name):
                raise ConfigError(f"{full_key} is required and has no value; set it, e.g. on the command line")
            try:
                value = cfg[name]
            except Exception as error:  # an interpolation that does not resolve
                raise ConfigError(f"{full_key}: {error}".splitlines()[0]) from error
            values[str(name)] = _plain(value, full_key)
            if OmegaConf.is_interpolation(cfg, name):
                sources[str(name)] = str(cfg._get_node(name)._value())
        check_arguments(target, values, key, sources)
    for name in cfg:
        if OmegaConf.is_missing(cfg, name) or OmegaConf.is_interpolation(cfg, name):
            continue
        child = cfg[name]
        if isinstance(child, (DictConfig, ListConfig)):
            check_config(child, f"{key}.{name}" if key else str(name))


def check_root_keys(cfg: DictConfig, config_file: str | pathlib.Path) -> None:
    """Refuse a top-level key that the primary config ``config_file`` (train.yaml, eval.yaml) neither sets nor
    composes from a group (``+ckpt_pth=...``, a typo of ckpt_path), as a nested unknown key is refused."""
    primary = OmegaConf.load(config_file)
    known = {str(name) for name in primary if name != "defaults"} | {"hydra"}
    for entry in primary.get("defaults", []):
        if isinstance(entry, (DictConfig, dict)):
            for group in entry:
                group = str(group).removeprefix("override ")
                known.add(group.split("@", 1)[1] if "@" in group else group.split("/", 1)[0])
    for name in cfg:
        if str(name) not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{name} is not a key of {pathlib.Path(config_file).name}; {hint}its keys: "
                              f"{', '.join(sorted(known - {'hydra'}))}")


# Lightning Trainer arguments that are numbers: (minimum, strict); -1 is Lightning's "no limit" where allowed.
_TRAINER_NUMBERS = {
    "max_steps": (1, False), "max_epochs": (1, False), "min_steps": (0, False), "min_epochs": (0, False),
    "val_check_interval": (0, True), "check_val_every_n_epoch": (1, False), "log_every_n_steps": (1, False),
    "accumulate_grad_batches": (1, False), "gradient_clip_val": (0, False), "num_nodes": (1, False),
    "limit_train_batches": (0, False), "limit_val_batches": (0, False), "num_sanity_val_steps": (0, False),
}
_NO_LIMIT = {"max_steps", "max_epochs", "num_sanity_val_steps"}


def check_run_numbers(cfg: DictConfig) -> None:
    """The numbers of a run that no ldm constructor checks: ``seed`` and the Lightning Trainer's step counts,
    intervals and limits (finite, in range), each refused naming its key (``trainer.max_steps=0`` is refused
    as such, not later as a learning-rate schedule without steps)."""
    if "seed" in cfg and cfg.seed is not None:
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
            raise ConfigError(f"seed={cfg.seed!r} must be an integer")
        check_number("seed", cfg.seed, minimum=0, maximum=2**32 - 1)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    for name, (minimum, strict) in _TRAINER_NUMBERS.items():
        value = trainer.get(name)
        if value is None or (name in _NO_LIMIT and value == -1):
            continue
        check_number(f"trainer.{name}", value, minimum=minimum, strict_minimum=strict)
