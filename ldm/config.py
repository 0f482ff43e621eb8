"""Hydra/OmegaConf glue shared by the entry points: resolvers, instantiation helpers, one-line config errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.config_check import ConfigError, check_config, check_root_keys, check_run_numbers

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = _PACKAGE_DIR.parent / "configs"


def wandb_offline() -> bool:
    """W&B logs offline (to the run folder, `wandb sync` later) unless a key or online mode is set."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")


def register_resolvers() -> None:
    """Register the ``${ldm.*:}`` resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("ldm.wandb_offline"):
        OmegaConf.register_new_resolver("ldm.wandb_offline", wandb_offline)


def check_run_config(cfg: DictConfig, config_name: str) -> None:
    """Every start-up check of a composed ``config_name`` config (train, eval), before anything is built: no
    unknown top-level key, every ``_target_`` node's keys and types (``check_config``), the run's numbers."""
    check_root_keys(cfg, CONFIG_DIR / f"{config_name}.yaml")
    check_config(cfg)
    check_run_numbers(cfg)


def instantiate_module(model_cfg: DictConfig) -> Any:
    """Build the LightningModule of ``model_cfg`` and attach its resolved config for checkpoints."""
    module = hydra.utils.instantiate(model_cfg)
    module.model_config = OmegaConf.to_container(model_cfg, resolve=True)
    return module


def instantiate_group(group_cfg: DictConfig | None) -> list[Any]:
    """Instantiate each entry with a ``_target_`` in a config group such as callbacks or logger."""
    if not group_cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in group_cfg.values() if entry and "_target_" in entry]


def _raised_in_ldm(error: BaseException) -> bool:
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def config_error_message(error: BaseException) -> str | None:
    """One line for a configuration error (a bad key or value, a missing file), else None (a bug).

    Hydra's ``InstantiationException`` is unwrapped to the error it wraps. Configuration errors are
    ``ConfigError``, ``FileNotFoundError``, ``FileExistsError`` (an output that ``overwrite=true`` would
    replace), OmegaConf's errors, and ``ValueError`` raised in ldm's
    own code (whose messages name the key); any other exception is left to show its traceback.
    """
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    if not (isinstance(error, (ConfigError, FileNotFoundError, FileExistsError, OmegaConfBaseException))
            or (isinstance(error, ValueError) and _raised_in_ldm(error))):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextmanager
def one_line_config_errors() -> Iterator[None]:
    """Run the block; a configuration error (``config_error_message``) prints ``error: ...`` on stderr
    and exits with status 1, without a traceback. Other exceptions pass unchanged."""
    try:
        yield
    except Exception as error:
        message = config_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
