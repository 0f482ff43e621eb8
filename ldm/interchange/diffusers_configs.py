"""The ``config.json`` contents diffusers and transformers read, computed from ldm's model arguments.

Written as plain dictionaries, so exporting needs neither diffusers nor transformers installed.
Architectures that diffusers cannot express (attention inside the VAE's levels, a U-Net without
cross-attention) raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm.diffusion.schedules import NoiseSchedule

DIFFUSERS_VERSION = "0.42.1"
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
CLIP_BOS_TOKEN_ID, CLIP_EOS_TOKEN_ID = 49406, 49407


def unet_config(args: Mapping[str, Any], sample_size: int, addition_time_embed_dim: int | None = None
                ) -> dict[str, Any]:
    """``UNet2DConditionModel`` config for a ``UNetModel`` built with ``args`` (all of them, defaults filled).

    ``sample_size``: the latent side length the model is trained at. diffusers' legacy
    ``attention_head_dim`` holds the number of heads (one value, or one per level). A U-Net with
    ``adm_in_channels`` (SDXL) becomes ``addition_embed_type: text_time``, whose size embeddings are
    ``addition_time_embed_dim`` wide (the conditioner's ``size_embedding_dim``, SDXL 256).
    """
    if args["context_dim"] is None:
        raise ValueError("model.network.context_dim=None: diffusers' UNet2DConditionModel needs cross-attention")
    mult, channels = list(args["channel_mult"]), int(args["model_channels"])
    depth = args["transformer_depth"]
    depth = int(depth) if isinstance(depth, int) else [int(value) for value in depth]
    last_depth = depth if isinstance(depth, int) else depth[-1]
    middle_depth = args.get("transformer_depth_middle")
    if middle_depth is not None and int(middle_depth) != last_depth:
        raise ValueError(f"model.network.transformer_depth_middle={middle_depth}: diffusers' U-Net gives the middle block "
                         f"the last level's depth ({last_depth}); export needs them equal")
    addition: dict[str, Any] = {}
    if args.get("adm_in_channels") is not None:
        if addition_time_embed_dim is None:
            raise ValueError("model.network.adm_in_channels is set but the text encoder has no size embeddings: "
                             "diffusers' text_time embedding needs a conditioner with micro-conditioning")
        addition = {"addition_embed_type": "text_time", "addition_time_embed_dim": int(addition_time_embed_dim),
                    "projection_class_embeddings_input_dim": int(args["adm_in_channels"])}
    attention_levels = [2**level in set(args["attention_resolutions"]) for level in range(len(mult))]
    if args["num_head_channels"] > 0:
        heads: int | list[int] = [channels * m // args["num_head_channels"] for m in mult]
    else:
        heads = int(args["num_heads"])
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": args["in_channels"], "out_channels": args["out_channels"],
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        "only_cross_attention": False, "block_out_channels": [channels * m for m in mult],
        "layers_per_block": args["num_res_blocks"], "downsample_padding": 1, "mid_block_scale_factor": 1,
        "act_fn": "silu", "norm_num_groups": args["norm_num_groups"], "norm_eps": 1e-5,
        "cross_attention_dim": args["context_dim"], "transformer_layers_per_block": depth,
        "attention_head_dim": heads, "dual_cross_attention": False,
        "use_linear_projection": bool(args["use_linear_in_transformer"]),
        "upcast_attention": bool(args["upcast_attention"]),
        "resnet_time_scale_shift": "scale_shift" if args["use_scale_shift_norm"] else "default",
        **addition,
    }


def vae_config(args: Mapping[str, Any], scaling_factor: float) -> dict[str, Any]:
    """``AutoencoderKL`` config for an ldm ``AutoencoderKL`` built with ``args`` (all of them, defaults filled)."""
    if list(args["attn_resolutions"]):
        raise ValueError(f"model.vae.attn_resolutions={list(args['attn_resolutions'])}: diffusers' AutoencoderKL "
                         "has attention only in the middle block; export needs attn_resolutions=[]")
    if args["z_channels"] != args["embed_dim"]:
        raise ValueError(f"model.vae.z_channels={args['z_channels']} != embed_dim={args['embed_dim']}: diffusers' "
                         "AutoencoderKL has one latent_channels for both")
    levels = len(args["ch_mult"])
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": args["in_channels"], "out_channels": args["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [args["ch"] * m for m in args["ch_mult"]], "layers_per_block": args["num_res_blocks"],
        "act_fn": "silu", "latent_channels": args["embed_dim"], "norm_num_groups": args["norm_num_groups"],
        "sample_size": args["resolution"], "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": bool(args["mid_attention"]), "force_upcast": True,
    }


def scheduler_config(
    schedule: NoiseSchedule, prediction_type: str, sampler_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The diffusers scheduler config that samples a model of ``prediction_type`` as ldm does.

    Discrete diffusion (epsilon / v_prediction / sample): ``DDIMScheduler``, reproducing ldm's schedule and
    its DDIM sampler step for step. ldm's DDIM ends at alpha 1 (``set_alpha_to_one=True``) with "leading"
    spacing. The offset is SD's ``steps_offset=1`` because StableDiffusionPipeline rewrites any other value
    to 1 on loading; ldm's DDIM gives the same images with ``steps_offset=1``.

    Flow matching (``flow``, ``sampler_options`` with its ``shift``): ``FlowMatchEulerDiscreteScheduler``,
    equal to ldm's flow_euler step for step. StableDiffusionPipeline cannot run it (the scheduler has no
    ``init_noise_sigma``); a caller drives the loop itself or uses a flow pipeline.

    EDM (``edm``, ``sampler_options`` with sigma_data, sigma_min, sigma_max, rho): ``EDMEulerScheduler`` with
    ``prediction_type="epsilon"``, diffusers' name for EDM's F, equal to ldm's edm_euler step for step from the
    same start; StableDiffusionPipeline starts it at sqrt(sigma_max^2 + 1) z instead of sigma_max z.
    """
    options = dict(sampler_options or {})
    if prediction_type == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": schedule.num_train_timesteps, "shift": float(options.get("shift", 1.0)),
                "use_dynamic_shifting": False}
    if prediction_type == "edm":
        missing = sorted({"sigma_data", "sigma_min", "sigma_max", "rho"} - set(options))
        if missing:
            raise ValueError(f"an EDM scheduler config needs the objective's {missing} (model.objective)")
        return {"_class_name": "EDMEulerScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                "sigma_data": float(options["sigma_data"]), "sigma_min": float(options["sigma_min"]),
                "sigma_max": float(options["sigma_max"]), "rho": float(options["rho"]), "sigma_schedule": "karras",
                "num_train_timesteps": schedule.num_train_timesteps, "prediction_type": "epsilon",
                "final_sigmas_type": "zero"}
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "beta_schedule": DIFFUSERS_BETA_SCHEDULES[schedule.schedule],
        "prediction_type": prediction_type, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 1,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": schedule.zero_terminal_snr, "thresholding": False,
    }


def clip_text_config(tower: nn.Module, num_layers: int, with_projection: bool = False) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` for an OpenCLIP text tower (a ``CLIP`` or ``TextTransformer``),
    keeping its first ``num_layers`` blocks; ``with_projection``: a ``CLIPTextModelWithProjection``
    (SDXL's second tower), whose ``projection_dim`` is the tower's pooled width."""
    import open_clip  # deferred: the rest of this module needs only the model arguments

    transformer = tower.transformer
    block = transformer.resblocks[0]
    if not isinstance(block.ls_1, nn.Identity):
        raise ValueError("the text tower uses layer scale (ls_init_value), which CLIPTextModel does not have")
    activation = block.mlp.gelu
    projection_dim = int(tower.text_projection.shape[1]) if with_projection else int(transformer.width)
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tower.token_embedding.num_embeddings), "hidden_size": int(transformer.width),
        "intermediate_size": int(block.mlp.c_fc.out_features), "num_hidden_layers": num_layers,
        "num_attention_heads": int(block.attn.num_heads),
        "max_position_embeddings": int(tower.positional_embedding.shape[0]),
        "hidden_act": "quick_gelu" if isinstance(activation, open_clip.transformer.QuickGELU) else "gelu",
        "layer_norm_eps": float(block.ln_1.eps), "attention_dropout": 0.0, "dropout": 0.0,
        "projection_dim": projection_dim, "bos_token_id": CLIP_BOS_TOKEN_ID,
        "eos_token_id": CLIP_EOS_TOKEN_ID, "pad_token_id": 0, "torch_dtype": "float32",
    }


# ------------------------------------------------------------------ diffusers configs -> ldm model configs
UNSUPPORTED_UNET_KEYS = ("class_embed_type", "encoder_hid_dim", "time_cond_proj_dim",
                         "reverse_transformer_layers_per_block")


def _refuse_unsupported(config: Mapping[str, Any], keys: tuple[str, ...], component: str) -> None:
    for key in keys:
        if config.get(key) not in (None, False):
            raise ValueError(f"{component}/config.json sets {key}={config[key]!r}, which ldm's "
                             f"{component} model does not have")


def unet_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ldm ``UNetModel`` config (``_target_`` and arguments) from a ``UNet2DConditionModel`` config.json.

    The inverse of ``unet_config``: diffusers' legacy ``attention_head_dim`` holds the number of heads,
    one value for all levels (ldm's ``num_heads``) or one per level (a fixed head width,
    ``num_head_channels``).
    """
    _refuse_unsupported(config, UNSUPPORTED_UNET_KEYS, "unet")
    widths = list(config["block_out_channels"])
    channels = widths[0]
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    if isinstance(heads, (list, tuple)):
        # diffusers reads a level's head count only where that level has attention, and the last level's
        # for the middle block (always cross-attention): the counts elsewhere are never used.
        attention_levels = [level for level, kind in enumerate(config["down_block_types"])
                            if kind.startswith("CrossAttn")] + [len(widths) - 1]
        used = {level: int(heads[level]) for level in dict.fromkeys(attention_levels)}
        head_widths = {widths[level] // count for level, count in used.items()}
        if len(head_widths) != 1 or any(widths[level] % count for level, count in used.items()):
            raise ValueError(f"unet/config.json: heads {list(heads)} over widths {widths} give head widths "
                             f"{sorted(widths[level] / count for level, count in used.items())} at the attention "
                             f"levels and middle block (heads by level: {used}); ldm's UNetModel keeps one whole "
                             f"head width for all of them")
        num_heads, num_head_channels = -1, head_widths.pop()
    else:
        num_heads, num_head_channels = int(heads), -1
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(value, (list, tuple)) for value in depth):
            raise ValueError(f"unet/config.json: transformer_layers_per_block={list(depth)} gives depths per block; "
                             "ldm's UNetModel takes one depth per level")
        depth = [int(value) for value in depth]
    else:
        depth = int(depth)
    addition_type = config.get("addition_embed_type")
    if addition_type not in (None, "text_time"):
        raise ValueError(f"unet/config.json sets addition_embed_type={addition_type!r}; ldm's U-Net has 'text_time' "
                         "(SDXL) or none")
    return {
        "_target_": "ldm.models.unet.UNetModel",
        "in_channels": int(config["in_channels"]), "out_channels": int(config["out_channels"]),
        "model_channels": channels, "num_res_blocks": int(config["layers_per_block"]),
        "attention_resolutions": [2**level for level, kind in enumerate(config["down_block_types"])
                                  if kind.startswith("CrossAttn")],
        "channel_mult": [width // channels for width in widths],
        "num_heads": num_heads, "num_head_channels": num_head_channels,
        "context_dim": int(config["cross_attention_dim"]), "transformer_depth": depth,
        "transformer_depth_middle": None,
        "adm_in_channels": (int(config["projection_class_embeddings_input_dim"]) if addition_type == "text_time"
                            else None),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "use_scale_shift_norm": config.get("resnet_time_scale_shift", "default") == "scale_shift",
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "upcast_attention": bool(config.get("upcast_attention", False)),
    }


def vae_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ldm ``AutoencoderKL`` config from a diffusers ``AutoencoderKL`` config.json (inverse of ``vae_config``)."""
    widths = list(config["block_out_channels"])
    latent_channels = int(config["latent_channels"])
    return {
        "_target_": "ldm.models.autoencoder.AutoencoderKL",
        "in_channels": int(config.get("in_channels", 3)), "out_channels": int(config.get("out_channels", 3)),
        "ch": widths[0], "ch_mult": [width // widths[0] for width in widths],
        "num_res_blocks": int(config["layers_per_block"]), "z_channels": latent_channels,
        "embed_dim": latent_channels, "attn_resolutions": [], "resolution": int(config.get("sample_size", 256)),
        "dropout": 0.0, "double_z": True, "norm_num_groups": int(config.get("norm_num_groups", 32)),
        "mid_attention": bool(config.get("mid_block_add_attention", True)),
    }


def text_encoder_model_config(config: Mapping[str, Any], pad_token_id: int, sdxl: bool = False) -> dict[str, Any]:
    """ldm ``FrozenOpenCLIPTextEncoder`` config from a transformers ``CLIPTextConfig`` (inverse of
    ``clip_text_config``): a tower of the folder's blocks, read at its last layer, padded as its tokenizer pads;
    ``sdxl``: read at the penultimate layer without the final LayerNorm, as diffusers' SDXL pipeline reads its
    towers (``hidden_states[-2]``), with the projection of a ``CLIPTextModelWithProjection``."""
    width = int(config["hidden_size"])
    with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    output_dim = int(config["projection_dim"]) if with_projection else width
    if config.get("hidden_act", "quick_gelu") not in ("gelu", "quick_gelu"):
        raise ValueError(f"text_encoder/config.json: hidden_act={config['hidden_act']!r}; ldm's OpenCLIP text tower "
                         "has gelu or quick_gelu")
    return {
        "_target_": "ldm.models.text_encoders.FrozenOpenCLIPTextEncoder",
        "text_cfg": {
            "context_length": int(config["max_position_embeddings"]), "vocab_size": int(config["vocab_size"]),
            "width": width, "heads": int(config["num_attention_heads"]), "layers": int(config["num_hidden_layers"]),
            "mlp_ratio": int(config["intermediate_size"]) / width, "output_dim": output_dim,
        },
        "layer": "penultimate" if sdxl else "last", "pad_token_id": int(pad_token_id),
        "quick_gelu": config.get("hidden_act", "quick_gelu") == "quick_gelu", "final_norm": not sdxl,
    }


def sdxl_conditioner_model_config(towers: list[dict[str, Any]], unet: Mapping[str, Any],
                                  zero_empty_prompt: bool = True) -> dict[str, Any]:
    """ldm ``TextConditioner`` config of a diffusers SDXL folder: its two towers' configs (from
    ``text_encoder_model_config(..., sdxl=True)``), the second's pooled embedding, and the U-Net's
    text_time size embeddings (``addition_time_embed_dim`` per value, for original_size, crop_coords, target_size);
    ``zero_empty_prompt``: the folder's ``force_zeros_for_empty_prompt``."""
    time_dim = int(unet.get("addition_time_embed_dim") or 256)
    pooled_dim = int(towers[1]["text_cfg"]["output_dim"])
    expected = pooled_dim + 6 * time_dim
    if int(unet["projection_class_embeddings_input_dim"]) != expected:
        raise ValueError(f"unet/config.json: projection_class_embeddings_input_dim="
                         f"{unet['projection_class_embeddings_input_dim']} is not text_encoder_2's projection "
                         f"({pooled_dim}) + 6 x addition_time_embed_dim ({time_dim}) = {expected}")
    return {"_target_": "ldm.models.conditioner.TextConditioner", "text_encoders": towers, "pooled_encoder": 1,
            "size_conditions": ["original_size", "crop_coords", "target_size"], "size_embedding_dim": time_dim,
            "zero_empty_prompt": bool(zero_empty_prompt)}


def objective_of_scheduler(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(prediction_type, sampler options) of a model from its diffusers scheduler config, the inverse of
    ``scheduler_config``: a FlowMatch scheduler means flow matching (with its shift), an EDM scheduler EDM's F
    parametrisation (diffusers names it "epsilon"), any other the config's prediction_type."""
    name = config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        if config.get("use_dynamic_shifting"):
            raise ValueError("scheduler/scheduler_config.json: use_dynamic_shifting=true (a shift per image size) "
                             "is not supported by ldm's flow samplers; give a fixed shift")
        return "flow", {"shift": float(config.get("shift", 1.0))}
    if name.startswith("EDM"):
        if config.get("prediction_type", "epsilon") != "epsilon" or config.get("sigma_schedule", "karras") != "karras":
            raise ValueError(f"scheduler/scheduler_config.json: {name} with prediction_type="
                             f"{config.get('prediction_type')!r}, sigma_schedule={config.get('sigma_schedule')!r}; "
                             "ldm's EDM takes prediction_type='epsilon' (F) on Karras sigmas only")
        return "edm", {key: float(config.get(key, default)) for key, default in
                       (("sigma_data", 0.5), ("sigma_min", 0.002), ("sigma_max", 80.0), ("rho", 7.0))}
    return config.get("prediction_type", "epsilon"), {}


def noise_schedule_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ldm ``NoiseSchedule`` config from a diffusers scheduler config (the training schedule's fields)."""
    beta_schedules = {value: key for key, value in DIFFUSERS_BETA_SCHEDULES.items()}
    name = config.get("beta_schedule", "scaled_linear")
    if name not in beta_schedules:
        raise ValueError(f"scheduler/scheduler_config.json: beta_schedule={name!r}; ldm knows "
                         f"{sorted(beta_schedules)}")
    return {
        "_target_": "ldm.diffusion.schedules.NoiseSchedule", "schedule": beta_schedules[name],
        "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
        "beta_start": float(config.get("beta_start", 0.00085)), "beta_end": float(config.get("beta_end", 0.012)),
        "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
    }
