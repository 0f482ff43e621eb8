"""State-dict keys between diffusers' layout (UNet2DConditionModel, AutoencoderKL) and ldm's, which is the
original Stable Diffusion layout: the one conversion table of the project, both directions.

Each function raises ``CheckpointMismatchError`` naming every key that is not part of the layout it reads.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ldm.checkpoints import CheckpointMismatchError

# ------------------------------------------------------------------ diffusers -> original layout
DIFFUSERS_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
DIFFUSERS_UNET_FIXED_NAMES = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL's extra vector (addition_embed_type "text_time"): the original nests it one level deeper.
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
DIFFUSERS_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _convert_keys(
    state_dict: dict[str, Tensor], convert_one: Callable[[str, Tensor], tuple[str, Tensor]], source: str
) -> dict[str, Tensor]:
    """Apply ``convert_one(key, tensor) -> (key, tensor)`` to every entry; name all keys it cannot place."""
    converted, unplaced = {}, []
    for key, tensor in state_dict.items():
        try:
            new_key, new_tensor = convert_one(key, tensor)
        except (KeyError, IndexError, ValueError):
            unplaced.append(key)
            continue
        converted[new_key] = new_tensor
    if unplaced:
        raise CheckpointMismatchError(f"{len(unplaced)} key(s) are not part of the {source} layout: "
                                      + ", ".join(sorted(unplaced)[:20]))
    return converted


def diffusers_unet_to_ldm(state_dict: dict[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict -> the original SD (``model.diffusion_model.``) layout.

    Raises ``CheckpointMismatchError`` naming every key that is not part of diffusers' U-Net layout.
    """
    per_level = layers_per_block + 1  # input blocks per level (ResBlocks + downsampler), output blocks per level
    up_levels_with_attention = {key.split(".")[1] for key in state_dict if key.startswith("up_blocks.")
                                and ".attentions." in key}

    def convert_one(key: str, tensor: Tensor) -> tuple[str, Tensor]:
        head, _, leaf = key.rpartition(".")
        if head in DIFFUSERS_UNET_FIXED_NAMES:
            return f"{DIFFUSERS_UNET_FIXED_NAMES[head]}.{leaf}", tensor
        parts = key.split(".")
        if parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            prefix = f"middle_block.{1 if kind == 'attentions' else 2 * index}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind not in ("resnets", "attentions", "downsamplers", "upsamplers"):
                raise KeyError(key)
            sub = 0 if kind == "resnets" else 1
            if parts[0] == "down_blocks":
                prefix = f"input_blocks.{1 + level * per_level + index}.{sub}"
                if kind == "downsamplers":
                    prefix, rest = f"input_blocks.{(level + 1) * per_level}.0.op", rest[1:]
            else:
                prefix = f"output_blocks.{level * per_level + index}.{sub}"
                if kind == "upsamplers":
                    position = 2 if parts[1] in up_levels_with_attention else 1
                    prefix = f"output_blocks.{level * per_level + layers_per_block}.{position}"
        else:
            raise KeyError(key)
        if kind == "resnets":
            rest = [DIFFUSERS_UNET_RESNET_NAMES[rest[0]], *rest[1:]]
        return ".".join([prefix, *rest]), tensor

    return _convert_keys(state_dict, convert_one, "diffusers UNet2DConditionModel")


def _vae_coder_and_rest(key: str) -> tuple[str, list[str]]:
    """``"encoder.a.b"`` -> ``("encoder", ["a", "b"])``; the VAE's other keys (quant convs) never get here."""
    coder, *rest = key.split(".")
    if coder not in ("encoder", "decoder") or not rest:
        raise KeyError(key)
    return coder, rest


def _flip_vae_level(kind: str, level: int, num_levels: int) -> int:
    """Decoder levels count from the top in the original layout and from the bottom in diffusers'."""
    return level if kind.startswith("down") else num_levels - 1 - level


def diffusers_vae_to_ldm(state_dict: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict -> the original SD (``first_stage_model.``) layout.

    Raises ``CheckpointMismatchError`` naming every key that is not part of diffusers' VAE layout.
    """

    def convert_one(key: str, tensor: Tensor) -> tuple[str, Tensor]:
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):  # the same in both layouts
            return key, tensor
        coder, rest = _vae_coder_and_rest(key)
        if rest[0] in ("down_blocks", "up_blocks"):
            level = _flip_vae_level(rest[0], int(rest[1]), num_levels)
            stage = f"{'down' if rest[0] == 'down_blocks' else 'up'}.{level}"
            if rest[2] == "resnets":
                rest = [stage, "block", rest[3], *rest[4:]]
            else:  # downsamplers.0.conv / upsamplers.0.conv
                rest = [stage, "downsample" if rest[0] == "down_blocks" else "upsample", *rest[4:]]
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            rest = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        elif rest[0] == "mid_block":  # attentions.0.<layer>: linear layers become 1x1 convolutions
            layer = ".".join(rest[3:-1])
            rest = ["mid", "attn_1", DIFFUSERS_VAE_ATTENTION_NAMES[layer], rest[-1]]
            if tensor.ndim == 2 and layer != "group_norm":
                tensor = tensor[:, :, None, None]
        elif rest[0] == "conv_norm_out":
            rest = ["norm_out", *rest[1:]]
        rest = [{"conv_shortcut": "nin_shortcut"}.get(part, part) for part in rest]
        return ".".join([coder, *rest]), tensor

    return _convert_keys(state_dict, convert_one, "diffusers AutoencoderKL")


# ------------------------------------------------------------------ original layout -> diffusers
def _inverse(names: dict[str, str]) -> dict[str, str]:
    return {value: key for key, value in names.items()}


def ldm_unet_to_diffusers(state_dict: dict[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """ldm's (= the original SD) U-Net state dict -> diffusers' UNet2DConditionModel layout.

    The inverse of ``diffusers_unet_to_ldm``; raises ``CheckpointMismatchError`` naming unplaceable keys.
    """
    per_level = layers_per_block + 1
    fixed = _inverse(DIFFUSERS_UNET_FIXED_NAMES)
    resnet_names = _inverse(DIFFUSERS_UNET_RESNET_NAMES)

    def resnet(prefix: str, rest: list[str]) -> str:
        # ResBlock sub-layers have two-part names ("in_layers.0") except the skip connection
        name, tail = (rest[0], rest[1:]) if rest[0] == "skip_connection" else (".".join(rest[:2]), rest[2:])
        return ".".join([prefix, resnet_names[name], *tail])

    def convert_one(key: str, tensor: Tensor) -> tuple[str, Tensor]:
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            return f"{fixed[head]}.{leaf}", tensor
        parts = key.split(".")
        block, number = parts[0], int(parts[1])
        if block == "middle_block":
            if number == 1:
                return ".".join(["mid_block.attentions.0", *parts[2:]]), tensor
            return resnet(f"mid_block.resnets.{number // 2}", parts[2:]), tensor
        sub, rest = int(parts[2]), parts[3:]
        if block == "input_blocks":
            level, index = divmod(number - 1, per_level)
            if index == layers_per_block:  # the downsampler that ends a level
                if parts[2:4] != ["0", "op"]:
                    raise KeyError(key)
                return f"down_blocks.{level}.downsamplers.0.conv.{parts[-1]}", tensor
            if sub == 0:
                return resnet(f"down_blocks.{level}.resnets.{index}", rest), tensor
            return ".".join([f"down_blocks.{level}.attentions.{index}", *rest]), tensor
        if block == "output_blocks":
            level, index = divmod(number, per_level)
            if sub == 0:
                return resnet(f"up_blocks.{level}.resnets.{index}", rest), tensor
            if rest[0] == "conv":  # the upsampler, after the attention block where the level has one
                return f"up_blocks.{level}.upsamplers.0.conv.{rest[-1]}", tensor
            return ".".join([f"up_blocks.{level}.attentions.{index}", *rest]), tensor
        raise KeyError(key)

    return _convert_keys(state_dict, convert_one, "original SD U-Net")


def ldm_vae_to_diffusers(state_dict: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """ldm's (= the original SD) VAE state dict -> diffusers' AutoencoderKL layout.

    The inverse of ``diffusers_vae_to_ldm``; raises ``CheckpointMismatchError`` naming unplaceable keys.
    """
    attention_names = _inverse(DIFFUSERS_VAE_ATTENTION_NAMES)

    def convert_one(key: str, tensor: Tensor) -> tuple[str, Tensor]:
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):  # the same in both layouts
            return key, tensor
        coder, rest = _vae_coder_and_rest(key)
        if rest[0] in ("down", "up"):
            level = _flip_vae_level(rest[0], int(rest[1]), num_levels)
            stage = f"{rest[0]}_blocks.{level}"
            if rest[2] == "block":
                rest = [stage, "resnets", rest[3], *rest[4:]]
            elif rest[2] in ("downsample", "upsample"):
                rest = [stage, f"{rest[2]}rs", "0", *rest[3:]]
            else:
                raise KeyError(key)
        elif rest[0] == "mid" and rest[1].startswith("block_"):
            rest = ["mid_block", "resnets", str(int(rest[1].removeprefix("block_")) - 1), *rest[2:]]
        elif rest[0] == "mid" and rest[1] == "attn_1":  # 1x1 convolutions become linear layers
            layer = attention_names[rest[2]]
            rest = ["mid_block", "attentions", "0", layer, *rest[3:]]
            if tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
        elif rest[0] == "norm_out":
            rest = ["conv_norm_out", *rest[1:]]
        rest = [{"nin_shortcut": "conv_shortcut"}.get(part, part) for part in rest]
        return ".".join([coder, *rest]), tensor

    return _convert_keys(state_dict, convert_one, "original SD VAE")
