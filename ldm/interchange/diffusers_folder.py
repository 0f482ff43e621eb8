"""diffusers pipeline folders (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), written and read.

The folder written here is what ``StableDiffusionPipeline.from_pretrained`` loads, without a
safety checker; for an SDXL-class model (a ``TextConditioner`` of two towers with micro-conditioning) what
``StableDiffusionXLPipeline.from_pretrained`` loads (``text_encoder``, ``text_encoder_2`` with its
projection, ``tokenizer``, ``tokenizer_2``, a U-Net with ``addition_embed_type: text_time``). Writing needs neither diffusers nor transformers: configs come from
``ldm.interchange.diffusers_configs``, weights go through the key conversions, and the tokenizer
files are OpenCLIP's own BPE vocabulary in the CLIPTokenizer file format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.atomic import atomic_write
from ldm.checkpoints import read_state_dict, save_weights
from ldm.diffusion.schedules import NoiseSchedule
from ldm.interchange.clip_text import hf_text_to_open_clip, open_clip_text_to_hf
from ldm.interchange.diffusers_configs import (
    CLIP_BOS_TOKEN_ID,
    CLIP_EOS_TOKEN_ID,
    DIFFUSERS_VERSION,
    clip_text_config,
    scheduler_config,
    unet_config,
    vae_config,
)
from ldm.interchange.diffusers_keys import (
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
)
from ldm.models.conditioner import SIZE_CONDITIONS, TextConditioner
from ldm.models.text_encoders import FrozenOpenCLIPTextEncoder

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin")


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_tokenizer(tokenizer: Any, context_length: int, pad_token_id: int, folder: Path) -> None:
    """CLIPTokenizer files (``vocab.json``, ``merges.txt``, configs) for an OpenCLIP BPE tokenizer.

    The pad token is the one the model was trained with (``"!"``, id 0, as OpenCLIP pads; or the end
    token as SD 1.x): the U-Net attends to the padding tokens' states.
    """
    if not hasattr(tokenizer, "bpe_ranks"):
        raise ValueError(f"{type(tokenizer).__name__} is not OpenCLIP's BPE tokenizer; only that one exports "
                         "to CLIPTokenizer files")
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (CLIP_BOS_TOKEN_ID, CLIP_EOS_TOKEN_ID):
        raise ValueError(f"the tokenizer's start/end ids {tokenizer.sot_token_id}/{tokenizer.eot_token_id} are not "
                         f"CLIP's {CLIP_BOS_TOKEN_ID}/{CLIP_EOS_TOKEN_ID}")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    # OpenCLIP names its start/end tokens differently; CLIPTokenizer finds them by these names.
    renamed = {tokenizer.decoder[CLIP_BOS_TOKEN_ID]: special["bos_token"],
               tokenizer.decoder[CLIP_EOS_TOKEN_ID]: special["eos_token"]}
    vocab = {renamed.get(token, token): index for token, index in tokenizer.encoder.items()}
    special["pad_token"] = next(token for token, index in vocab.items() if index == pad_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", vocab)
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
        "do_lower_case": True, "clean_up_tokenization_spaces": True, "errors": "replace",
    })


def text_encoder_layers(text_encoder: FrozenOpenCLIPTextEncoder, pooled: bool = False) -> int:
    """Blocks of the tower that the context passes through (all but the last for ``penultimate``); all of
    them for a tower whose pooled embedding is used (``pooled``), which is taken after the last block."""
    blocks = len(text_encoder.tower.transformer.resblocks)
    return blocks - 1 if text_encoder.layer == "penultimate" and not pooled else blocks


def check_sdxl_conditioner(conditioner: TextConditioner) -> None:
    """ValueError unless diffusers' SDXL pipeline computes what ``conditioner`` does: two towers read at the
    penultimate layer without the final LayerNorm, the second's pooled embedding, the three size conditions."""
    towers = list(conditioner.text_encoders)
    if len(towers) != 2 or conditioner.pooled_encoder != 1 or conditioner.size_conditions != SIZE_CONDITIONS:
        raise ValueError(f"model.text_encoder: diffusers' SDXL pipeline has two towers, pools the second and embeds "
                         f"{list(SIZE_CONDITIONS)}; this conditioner has {len(towers)} towers, pooled_encoder="
                         f"{conditioner.pooled_encoder}, size_conditions={list(conditioner.size_conditions)}")
    for index, tower in enumerate(towers):
        if tower.layer != "penultimate" or tower.final_norm:
            raise ValueError(f"model.text_encoder.text_encoders[{index}]: layer={tower.layer!r}, final_norm="
                             f"{tower.final_norm}; diffusers' SDXL pipeline reads the penultimate layer without the "
                             "final LayerNorm (layer=penultimate, final_norm=false)")


def _write_text_tower(staging: Path, suffix: str, tower: FrozenOpenCLIPTextEncoder, num_layers: int,
                      with_projection: bool = False) -> None:
    """``text_encoder{suffix}/`` (config, weights) and ``tokenizer{suffix}/`` of one OpenCLIP tower."""
    _write_json(staging / f"text_encoder{suffix}/config.json",
                clip_text_config(tower.tower, num_layers, with_projection=with_projection))
    save_weights(open_clip_text_to_hf(tower.tower.state_dict(), num_layers=num_layers, with_projection=with_projection),
                 staging / f"text_encoder{suffix}/model.safetensors", metadata={"format": "pt"})
    write_tokenizer(tower.tokenizer, tower.context_length, tower.pad_token_id, staging / f"tokenizer{suffix}")


def write_diffusers_folder(
    out_dir: str | Path,
    unet_state: dict[str, Tensor],
    unet_args: Mapping[str, Any],
    vae_state: dict[str, Tensor],
    vae_args: Mapping[str, Any],
    text_encoder: FrozenOpenCLIPTextEncoder | TextConditioner,
    schedule: NoiseSchedule,
    prediction_type: str,
    latent_scale_factor: float,
    sampler_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write a StableDiffusionPipeline folder (a StableDiffusionXLPipeline folder for an SDXL-class
    ``TextConditioner``). ``*_state`` are ldm (original-layout) state dicts and ``*_args`` the full
    constructor arguments of the models. The folder appears whole or not at all: it is written beside
    ``out_dir`` and renamed into place; an existing ``out_dir`` is refused."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output folder or remove it")
    sdxl = isinstance(text_encoder, TextConditioner)
    if sdxl:
        check_sdxl_conditioner(text_encoder)
    elif not text_encoder.final_norm:
        raise ValueError("model.text_encoder.final_norm=false: diffusers' StableDiffusionPipeline applies the final "
                         "LayerNorm to the text states; export needs final_norm=true")
    with atomic_write(out_dir) as staging:
        vae_factor = 2 ** (len(vae_args["ch_mult"]) - 1)
        model_index = {**SDXL_MODEL_INDEX, "force_zeros_for_empty_prompt": text_encoder.zero_empty_prompt} if sdxl \
            else MODEL_INDEX
        _write_json(staging / "model_index.json", model_index)
        _write_json(staging / "unet/config.json", unet_config(
            unet_args, int(vae_args["resolution"]) // vae_factor,
            addition_time_embed_dim=text_encoder.size_embedding_dim if sdxl else None))
        save_weights(ldm_unet_to_diffusers(unet_state, int(unet_args["num_res_blocks"])),
                     staging / "unet/diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        _write_json(staging / "vae/config.json", vae_config(vae_args, latent_scale_factor))
        save_weights(ldm_vae_to_diffusers(vae_state, len(vae_args["ch_mult"])),
                     staging / "vae/diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        if sdxl:  # diffusers reads hidden_states[-2] of full towers, and text_encoder_2's projection
            first, second = text_encoder.text_encoders
            _write_text_tower(staging, "", first, len(first.tower.transformer.resblocks))
            _write_text_tower(staging, "_2", second, len(second.tower.transformer.resblocks), with_projection=True)
        else:
            _write_text_tower(staging, "", text_encoder, text_encoder_layers(text_encoder))
        _write_json(staging / "scheduler/scheduler_config.json",
                    scheduler_config(schedule, prediction_type, sampler_options))
    return out_dir


def _component_weights(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights and config of one component folder (``unet/``, ``vae/``, ``text_encoder/``)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a diffusers component folder")
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return read_state_dict(folder / name), json.loads(config_path.read_text())
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHTS_NAMES)}); sharded or "
                            "fp16-variant weights: save the pipeline again with safe_serialization and no variant")


def read_diffusers_folder(path: str | Path) -> dict[str, Any]:
    """A diffusers SD folder -> ``{"unet", "vae"}`` state dicts in ldm's layout, ``"text_encoder"`` in
    OpenCLIP's (when the folder has one; an SDXL folder: a list of its two towers, the second with its
    projection) and ``"latent_scale_factor"`` (the VAE's ``scaling_factor``)."""
    path = Path(path)
    unet_state, unet_cfg = _component_weights(path / "unet")
    vae_state, vae_cfg = _component_weights(path / "vae")
    parts: dict[str, Any] = {
        "unet": diffusers_unet_to_ldm(unet_state, int(unet_cfg["layers_per_block"])),
        "vae": diffusers_vae_to_ldm(vae_state, len(vae_cfg["block_out_channels"])),
        "latent_scale_factor": vae_cfg.get("scaling_factor"),
    }
    if (path / "text_encoder").is_dir():
        text_state, _ = _component_weights(path / "text_encoder")
        parts["text_encoder"] = hf_text_to_open_clip(text_state)
        if (path / "text_encoder_2").is_dir():
            second, _ = _component_weights(path / "text_encoder_2")
            parts["text_encoder"] = [parts["text_encoder"], hf_text_to_open_clip(second)]
    return parts
