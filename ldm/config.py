"""Hydra/OmegaConf glue: resolvers and instantiation helpers shared by the entry points."""

from __future__ import annotations

import os
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


def wandb_offline() -> bool:
    """W&B logs offline (to the run folder, `wandb sync` later) unless a key or online mode is set."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")


def register_resolvers() -> None:
    """Register the ``${ldm.*:}`` resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("ldm.wandb_offline"):
        OmegaConf.register_new_resolver("ldm.wandb_offline", wandb_offline)


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
