"""FSDP for latent diffusion: the U-Net (and its EMA copy) sharded block by block; frozen encoders replicated."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ldm.interchange.build import build
from ldm.models.unet import TimestepEmbedSequential, UNetModel
from ldm.pipeline import TextToImagePipeline

FROZEN_ENCODERS = ("vae", "text_encoder")


def unet_wrap_policy() -> ModuleWrapPolicy:
    """One FSDP unit per U-Net block (``TimestepEmbedSequential``: a level's ResBlock + transformer, a
    down/upsampler, the middle block) and per UNetModel (its stem, embeddings and head).

    Units of a block's size keep the all-gathered memory small. The blocks' own layers are not
    wrapped: ``TimestepEmbedSequential`` routes its arguments by the layer's class, which a wrapper
    would hide. Wrapping ``UNetModel`` too gives the
    U-Net and its EMA copy each their own unit of identical layout, so that their local shards hold
    the same elements and the EMA update (an element-wise lerp) runs on the shards.
    """
    return ModuleWrapPolicy({UNetModel, TimestepEmbedSequential})


def frozen_encoders(model: nn.Module) -> list[nn.Module]:
    """The frozen ``vae`` and ``text_encoder`` of a LatentDiffusion module: FSDP leaves them out (``ignored_modules``).

    They take no gradients and no optimizer state, and run under ``no_grad`` on every rank: sharding
    them would only add an all-gather per batch. Raises if one of them has a trainable parameter.
    """
    modules = []
    for name in FROZEN_ENCODERS:
        module = getattr(model, name, None)
        if module is None:
            continue
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"model.{name} is left out of FSDP as frozen but has trainable parameters "
                             f"({trainable[:3]}...); freeze it or train with trainer=ddp")
        modules.append(module)
    return modules


class UNetFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with ``unet_wrap_policy`` and the frozen encoders left unsharded.

    ``use_orig_params=True`` keeps parameter names and lets the optimizer take the U-Net's
    parameters alone. Other keyword arguments are FSDPStrategy's (``sharding_strategy``,
    ``state_dict_type``: ``"sharded"`` writes a checkpoint folder per step, which
    ``python -m lightning.pytorch.utilities.consolidate_checkpoint FOLDER`` turns into one file).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("auto_wrap_policy", unet_wrap_policy())
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        ignored = frozen_encoders(model)
        for module in ignored:
            module.to(self.root_device)  # FSDP moves only the modules it manages
        self.kwargs["ignored_modules"] = ignored
        return super()._setup_model(model)


def fsdp_wrap(model: nn.Module, device: torch.device | None = None, **kwargs: Any) -> nn.Module:
    """Wrap ``model`` as ``UNetFSDPStrategy`` does (for tests and scripts that run without a Trainer)."""
    kwargs.setdefault("auto_wrap_policy", unet_wrap_policy())
    kwargs.setdefault("use_orig_params", True)
    return FullyShardedDataParallel(model, ignored_modules=frozen_encoders(model), device_id=device, **kwargs)


def whole_pipeline(wrapped: nn.Module, module: Any, use_ema: bool = True, rank0_only: bool = True,
                   ) -> TextToImagePipeline | None:
    """``module.pipeline(use_ema)`` with whole weights, for the callbacks that sample or export the model.

    ``wrapped``: the strategy's model (``trainer.strategy.model``). Without FSDP this is the module's own
    pipeline (on rank 0 alone when ``rank0_only``, else None there). Under FSDP the U-Net's parameters are
    shards, and a sharded module cannot run forward outside FSDP's own collectives, so every rank takes part
    in gathering the full state dict (onto the CPU) and the ranks that sample build a plain U-Net from the
    module's recorded config with it. Every rank must call this under FSDP.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    wanted = rank == 0 or not rank0_only
    if not isinstance(wrapped, FullyShardedDataParallel):
        return module.pipeline(use_ema=use_ema) if wanted else None
    if module.mode.lora or module.model_config is None:
        raise ValueError("sampling or exporting under trainer=fsdp needs a full (not LoRA) U-Net built from configs "
                         "(train.py does this); use trainer=ddp for LoRA runs")
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        state = wrapped.state_dict()
    if not wanted:
        return None
    prefix = "ema_network.module." if (use_ema and module.ema_network is not None) else "network."
    network = build(module.model_config["network"])
    network.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
    return module.pipeline(use_ema=use_ema, network=network.to(module.device).eval())
