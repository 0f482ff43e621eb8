"""``model/mode=full``: every weight of the network trains, from its initialisation or from released weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ldm.config_check import build_options
from ldm.interchange.pretrained import PretrainedWeights
from ldm.training.lora_training import check_lora_checkpoint


class FullTraining:
    """The network's every parameter is trained (the frozen VAE and text towers are not).

    ``pretrained`` (``PretrainedWeights`` or its fields): start from released weights (fine-tuning): ``path`` an
    original SD ``.ckpt``/``.safetensors`` or a diffusers folder; the network (its EMA copy with ``use_ema``), the
    VAE and, with ``text_encoder``, the text tower are loaded before the EMA copy is made.
    """

    trains_text_encoder = False
    lora = None

    def __init__(self, pretrained: PretrainedWeights | Mapping[str, Any] | None = None) -> None:
        self.pretrained = build_options(PretrainedWeights, pretrained, "model.mode.pretrained")

    def check_text_encoder(self, text_encoder: nn.Module) -> None:
        """Any text encoder can stay frozen beside a fully trained network."""

    def prepare(self, module: Any) -> None:
        """Nothing to add: the network trains as built."""

    def prepare_ema(self, module: Any) -> None:
        """The EMA copy averages every network weight."""

    def trainable_parameters(self, module: Any) -> list[nn.Parameter]:
        return [p for p in module.network.parameters() if p.requires_grad]

    def prefixes_left_out(self) -> tuple[str, ...]:
        """State-dict prefixes this mode leaves out of checkpoints: none, the network is what trains."""
        return ()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Nothing beyond the module's own state."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any], own_state: Mapping[str, Tensor]) -> None:
        """A checkpoint of LoRA adapters cannot resume a full training run."""
        if "ldm_lora" in checkpoint:
            check_lora_checkpoint(checkpoint, own_state, None)

    def pipeline_parts(self, module: Any, use_ema: bool) -> tuple[nn.Module, nn.Module, dict[str, Tensor] | None]:
        """(network: the EMA copy with ``use_ema`` if there is one, text encoder, the EMA state kept beside the raw
        network without ``use_ema``)."""
        ema = module.ema_network
        network = ema.module if (use_ema and ema is not None) else module.network
        ema_state = ema.module.state_dict() if (not use_ema and ema is not None) else None
        return network, module.text_encoder, ema_state
