"""A trained text-to-image model from any of its forms, built without training code.

``load_model(source)`` reads a diffusers folder, an original SD single file (ldm's own export, whose
metadata carries the model config, or a released file, whose config is read from its shapes) or an
ldm training checkpoint (``ldm_model_config`` plus weights; frozen weights it left out are found again
through the records it keeps of them) and returns the denoising network, VAE, text encoder (conditioner),
noise schedule, prediction type and latent scale factor. Neither Lightning nor Hydra is imported. A training
checkpoint builds whatever network family its config names; SD files and diffusers folders hold U-Nets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.checkpoints import check_state_dict, read_metadata, read_state_dict, read_torch_file
from ldm.diffusion.schedules import NoiseSchedule
from ldm.interchange.build import build, full_config
from ldm.interchange.checkpoint_versions import upgrade_checkpoint, upgrade_model_config
from ldm.interchange.diffusers_configs import (
    noise_schedule_config,
    objective_of_scheduler,
    sdxl_conditioner_model_config,
    text_encoder_model_config,
    unet_model_config,
    vae_model_config,
)
from ldm.interchange.diffusers_folder import read_diffusers_folder
from ldm.interchange.frozen_files import default_search_dirs, resolve_frozen_file
from ldm.interchange.lora_files import LoraNames, LoraWeights, adapters_from_layout, merge_lora, plain_key, read_lora_file
from ldm.interchange.original_configs import (
    sdxl_conditioner_config_from_weights,
    text_encoder_config_from_weights,
    unet_config_from_weights,
    vae_config_from_weights,
)
from ldm.interchange.original_file import HF_TEXT_PREFIX, split_original_file
from ldm.interchange.pretrained import load_text_tower, read_pretrained

COMPONENTS = ("network", "vae", "text_encoder", "noise_schedule")
SD_LATENT_SCALE_FACTOR = 0.18215
SDXL_LATENT_SCALE_FACTOR = 0.13025  # generative-models' sd_xl_base.yaml scale_factor
SD_NOISE_SCHEDULE = {"_target_": "ldm.diffusion.schedules.NoiseSchedule", "schedule": "scaled_linear",
                     "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
# The options that supply a frozen file, by the name a checkpoint records it under.
DEFAULT_OPTIONS = {"vae_weights": "--vae-weights", "pretrained": "--pretrained"}


@dataclass
class LoadedModel:
    """What a text-to-image model consists of. ``model_config``: the ``_target_`` config of each component
    with every argument spelled out (what an exporter writes); ``ema_state``: the EMA network's weights when
    the source has them and ``network`` holds the raw ones (an SD export keeps both)."""

    network: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    noise_schedule: NoiseSchedule
    prediction_type: str
    latent_scale_factor: float
    model_config: dict[str, dict[str, Any]]
    source: str
    ema_state: dict[str, Tensor] | None = field(default=None)
    sampler_options: dict[str, Any] = field(default_factory=dict)  # the objective's (flow: shift; EDM: sigmas)


def source_kind(source: str | Path) -> str:
    """``"diffusers"`` (a folder with ``model_index.json``), ``"original"`` (an SD single file) or ``"checkpoint"``
    (an ldm training checkpoint: a torch file holding ``ldm_model_config``)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without model_index.json: not a diffusers model folder")
        return "diffusers"
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path}: give a diffusers folder, an SD .safetensors/.ckpt file or "
                                "an ldm training checkpoint")
    if path.suffix == ".safetensors":
        return "original"
    contents = read_torch_file(path)
    if isinstance(contents, dict) and "ldm_model_config" in contents:
        return "checkpoint"
    return "original"


def load_model(
    source: str | Path,
    use_ema: bool | None = None,
    vae_weights: str | Path | None = None,
    pretrained: str | Path | None = None,
    model_config: Mapping[str, Mapping[str, Any]] | None = None,
    prediction_type: str | None = None,
    search_dirs: Iterable[str | Path] | None = None,
    options: Mapping[str, str] | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> LoadedModel:
    """Build the model ``source`` holds; see the module docstring for the forms.

    ``use_ema``: None takes the EMA network where the source has one apart from its main network (else the main
    one, which in an exported model is the EMA already); True requires it; False takes the raw weights.

    ``vae_weights`` / ``pretrained``: the frozen files a training checkpoint left out, when they are not
    where it recorded them (else they are searched for in ``search_dirs``, by default ``LDM_ROOT``,
    ``models/`` and the checkpoint's folders). ``model_config`` overrides component configs of a released
    SD file; ``prediction_type`` that of a file that does not record it (SD 2.x 768 px: ``v_prediction``).
    ``options``: how the caller's user gives each frozen file, for error messages.
    ``lora``: a LoRA file (diffusers or kohya layout, ``ldm.interchange.lora_files``) merged into the weights
    at ``lora_scale``; a LoRA run's checkpoint is merged with its own adapters.
    """
    unknown = sorted(set(model_config or {}) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"model_config names {unknown}: the components are {list(COMPONENTS)}")
    kind = source_kind(source)
    if kind == "diffusers":
        model = _from_diffusers_folder(Path(source), use_ema)
    elif kind == "original":
        model = _from_original_file(Path(source), use_ema, model_config or {})
    else:
        search = list(search_dirs) if search_dirs is not None else default_search_dirs(source)
        model = _from_training_checkpoint(Path(source), use_ema, {"vae_weights": vae_weights, "pretrained": pretrained},
                                          search, {**DEFAULT_OPTIONS, **(options or {})})
    if prediction_type is not None:
        model.prediction_type = prediction_type
    if lora is not None:
        if hasattr(model.text_encoder, "text_encoders"):
            raise ValueError(f"lora={lora}: LoRA files of SDXL-class models (several text towers) are not supported; "
                             f"{source} is one")
        adapters = read_lora_file(lora, LoraNames(model.network, model.text_encoder))
        merge_lora({"unet": model.network, "text_encoder": model.text_encoder.tower}, adapters, scale=lora_scale)
        model.source = f"{model.source} + LoRA {lora}"
    for module in (model.network, model.vae, model.text_encoder):
        module.eval().requires_grad_(False)
    return model


def _load(module: nn.Module, state: dict[str, Tensor], source: str) -> nn.Module:
    check_state_dict(module, state, source=source)
    module.load_state_dict(state)
    return module


def _build_all(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {name: build(configs[name]) for name in COMPONENTS}


def vocab_and_pad_token(tokenizer: Path) -> str:
    """The pad token a CLIPTokenizer folder names (its ``special_tokens_map.json``; the end token if unnamed)."""
    pad_token = json.loads((tokenizer / "special_tokens_map.json").read_text()).get("pad_token", "<|endoftext|>")
    return pad_token["content"] if isinstance(pad_token, dict) else pad_token


def _pad_token_id(tokenizer: Path) -> int:
    """The id of a CLIPTokenizer folder's pad token."""
    return int(json.loads((tokenizer / "vocab.json").read_text())[vocab_and_pad_token(tokenizer)])


def _from_diffusers_folder(path: Path, use_ema: bool | None) -> LoadedModel:
    """A diffusers folder holds one U-Net (the network), used whatever ``use_ema`` says."""
    read_json = lambda name: json.loads((path / name).read_text())  # noqa: E731
    scheduler = read_json("scheduler/scheduler_config.json")
    configs = {
        "network": unet_model_config(read_json("unet/config.json")),
        "vae": vae_model_config(read_json("vae/config.json")),
        "text_encoder": text_encoder_model_config(read_json("text_encoder/config.json"), _pad_token_id(path / "tokenizer")),
        "noise_schedule": noise_schedule_config(scheduler),
    }
    if (path / "text_encoder_2").is_dir():  # SDXL: two towers read at hidden_states[-2], the second pooled
        towers = [text_encoder_model_config(read_json(f"text_encoder{suffix}/config.json"),
                                            _pad_token_id(path / f"tokenizer{suffix}"), sdxl=True)
                  for suffix in ("", "_2")]
        configs["text_encoder"] = sdxl_conditioner_model_config(
            towers, read_json("unet/config.json"),
            zero_empty_prompt=read_json("model_index.json").get("force_zeros_for_empty_prompt", True))
    parts = read_diffusers_folder(path)
    built = _build_all(configs)
    _load(built["network"], parts["unet"], f"{path}/unet")
    _load(built["vae"], parts["vae"], f"{path}/vae")
    load_text_tower(built["text_encoder"], parts["text_encoder"], source=f"{path}/text_encoder")
    prediction_type, sampler_options = objective_of_scheduler(scheduler)
    return LoadedModel(**built, prediction_type=prediction_type,
                       latent_scale_factor=float(parts["latent_scale_factor"] or SD_LATENT_SCALE_FACTOR),
                       model_config={name: full_config(config) for name, config in configs.items()}, source=str(path),
                       sampler_options=sampler_options)


def _from_original_file(path: Path, use_ema: bool | None, overrides: Mapping[str, Mapping[str, Any]]) -> LoadedModel:
    metadata = read_metadata(path)
    recorded = upgrade_model_config(json.loads(metadata["ldm_model_config"])) if "ldm_model_config" in metadata else None
    state = read_state_dict(path)
    parts = split_original_file(state, use_ema=bool(use_ema))
    if use_ema is None and "ema_unet" in parts:
        parts["unet"], parts["ema_unet"] = parts.pop("ema_unet"), None
    if "text_encoder" not in parts:
        raise ValueError(f"{path} holds no text encoder: ldm generates from files with U-Net, VAE and text encoder")
    if recorded is not None:
        configs = {name: recorded[name] for name in COMPONENTS}
    else:
        sd1_layout = any(key.startswith(HF_TEXT_PREFIX) for key in state)
        unet_config = unet_config_from_weights(parts["unet"])
        if isinstance(parts["text_encoder"], list):  # SDXL's two towers
            text_config = sdxl_conditioner_config_from_weights(parts["text_encoder"], unet_config["adm_in_channels"] or 0)
        else:
            text_config = text_encoder_config_from_weights(parts["text_encoder"], sd1_layout)
        configs = {"network": unet_config, "vae": vae_config_from_weights(parts["vae"]), "text_encoder": text_config,
                   "noise_schedule": SD_NOISE_SCHEDULE}
    configs = {name: {**configs[name], **overrides.get(name, {})} for name in COMPONENTS}
    built = _build_all(configs)
    _load(built["network"], parts["unet"], f"{path} (unet)")
    _load(built["vae"], parts["vae"], f"{path} (vae)")
    load_text_tower(built["text_encoder"], parts["text_encoder"], source=f"{path} (text encoder)")
    default_scale = SDXL_LATENT_SCALE_FACTOR if isinstance(parts["text_encoder"], list) else SD_LATENT_SCALE_FACTOR
    scale = float(metadata.get("latent_scale_factor", default_scale))
    recorded_objective = (recorded or {}).get("objective") or {}
    prediction_type = metadata.get("prediction_type", recorded_objective.get("prediction_type", "epsilon"))
    ema_state = parts.get("ema_unet") if use_ema is False else None
    sampler_options = json.loads(metadata["ldm_sampler_options"]) if "ldm_sampler_options" in metadata else {}
    return LoadedModel(**built, prediction_type=prediction_type, latent_scale_factor=scale,
                       model_config={name: full_config(config) for name, config in configs.items()},
                       source=str(path), ema_state=ema_state, sampler_options=sampler_options)


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def frozen_file_records(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The records of the frozen files a training checkpoint left out, by option name (``vae_weights``,
    ``pretrained``). Checkpoints written before records existed name the path only (no hash to check)."""
    if "ldm_frozen_files" in checkpoint:
        return dict(checkpoint["ldm_frozen_files"])
    legacy = checkpoint.get("ldm_frozen_from_files") or {}
    records = {}
    if legacy.get("vae"):
        records["vae_weights"] = {"path": legacy["vae"], "resolved_path": legacy["vae"], "sha256": None}
    if legacy.get("pretrained"):
        path = legacy["pretrained"]["path"]
        records["pretrained"] = {"path": path, "resolved_path": path, "sha256": None,
                                 "use_ema": legacy["pretrained"].get("use_ema", False),
                                 "text_encoder": legacy["pretrained"].get("text_encoder", True)}
    return records


def checkpoint_adapters(checkpoint: Mapping[str, Any], names: LoraNames, use_ema: bool, source: str
                        ) -> dict[str, LoraWeights]:
    """The adapters of a LoRA run's checkpoint (peft's keys; the network's from its EMA copy with ``use_ema``)."""
    if "ldm_lora" not in checkpoint:
        raise ValueError(f"{source} is not a LoRA run's checkpoint (no model/mode=lora): it holds no adapters")
    checkpoint = upgrade_checkpoint(dict(checkpoint))
    alpha = float(checkpoint["ldm_lora"]["alpha"])
    unet_prefix = "ema_network.module." if use_ema else "network."
    renamed: dict[str, Tensor] = {}
    for key, value in checkpoint["state_dict"].items():
        if ".lora_" not in key:
            continue
        if key.startswith(unet_prefix):
            renamed["unet." + key.removeprefix(unet_prefix)] = value
        elif key.startswith("text_encoder.tower."):
            renamed["text_encoder." + key.removeprefix("text_encoder.tower.")] = value
    stems = {key.split(".lora_")[0] for key in renamed}
    renamed.update({f"{stem}.alpha": torch.tensor(alpha) for stem in stems})
    return adapters_from_layout(renamed, names, source=f"{source} (LoRA adapters)")


def _merge_run_adapters(built: Mapping[str, Any], checkpoint: Mapping[str, Any], use_ema: bool, source: str) -> None:
    """Merge a LoRA run's adapters into the base network and text tower."""
    adapters = checkpoint_adapters(checkpoint, LoraNames(built["network"], built["text_encoder"]), use_ema, source)
    merge_lora({"unet": built["network"], "text_encoder": built["text_encoder"].tower}, adapters)


def _from_training_checkpoint(path: Path, use_ema: bool | None, given: Mapping[str, Any], search_dirs: list,
                              options: Mapping[str, str]) -> LoadedModel:
    checkpoint = upgrade_checkpoint(read_torch_file(path))
    config = checkpoint["ldm_model_config"]
    state = checkpoint["state_dict"]
    built = _build_all(config)
    lora_state = {key: value for key, value in state.items() if ".lora_" in key}
    state = {plain_key(key): value for key, value in state.items() if ".lora_" not in key}
    ema = _under(state, "ema_network.module.")
    has_ema = bool(ema) or any(key.startswith("ema_network.module.") for key in lora_state)
    if use_ema is None:
        use_ema = has_ema
    if use_ema and not has_ema:
        raise ValueError(f"{path} has no EMA weights (model.ema_decay was null); load it with use_ema off "
                         "(--no-ema, use_ema=false)")
    records = frozen_file_records(checkpoint)
    if "ldm_lora" not in checkpoint:  # a LoRA run's network is the pretrained file's, below
        _load(built["network"], ema if use_ema else _under(state, "network."), f"{path} (network)")
    for name, value in given.items():
        if value is not None and name not in records:
            raise ValueError(f"{options[name]}={value}: {path} holds its own {name.split('_')[0]} weights, "
                             "so no file is needed")
    files = {name: resolve_frozen_file(record, options[name], given.get(name), search_dirs)
             for name, record in records.items()}
    vae_state, text_state = _under(state, "vae."), _under(state, "text_encoder.")
    if "pretrained" in files:
        released = read_pretrained(files["pretrained"], use_ema=bool(records["pretrained"].get("use_ema", False)))
        vae_state = vae_state or released["vae"]
        if "ldm_lora" in checkpoint:
            _load(built["network"], released["unet"], f"{files['pretrained']} (unet)")
        if not text_state and records["pretrained"].get("text_encoder", True):
            load_text_tower(built["text_encoder"], released["text_encoder"], source=str(files["pretrained"]))
    if "vae_weights" in files:
        vae_state = read_state_dict(files["vae_weights"])
    _load(built["vae"], vae_state, f"{path} (vae)")
    if text_state:
        _load(built["text_encoder"], text_state, f"{path} (text encoder)")
    ema_state = None if use_ema else (ema or None)
    if "ldm_lora" in checkpoint:
        _merge_run_adapters(built, checkpoint, use_ema, str(path))
        ema_state = None
    objective = build(config["objective"])  # it decides the prediction type and the sampler's settings
    return LoadedModel(**built, prediction_type=objective.prediction_type,
                       latent_scale_factor=float(state["latent_scale_factor"]),
                       model_config={name: full_config(config[name]) for name in COMPONENTS},
                       source=str(path), ema_state=ema_state, sampler_options=objective.sampler_options())
