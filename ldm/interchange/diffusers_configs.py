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


def unet_config(args: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """``UNet2DConditionModel`` config for a ``UNetModel`` built with ``args`` (all of them, defaults filled).

    ``sample_size``: the latent side length the model is trained at. diffusers' legacy
    ``attention_head_dim`` holds the number of heads (one value, or one per level).
    """
    if args["context_dim"] is None:
        raise ValueError("model.unet.context_dim=None: diffusers' UNet2DConditionModel needs cross-attention")
    mult, channels = list(args["channel_mult"]), int(args["model_channels"])
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
        "cross_attention_dim": args["context_dim"], "transformer_layers_per_block": args["transformer_depth"],
        "attention_head_dim": heads, "dual_cross_attention": False,
        "use_linear_projection": bool(args["use_linear_in_transformer"]),
        "upcast_attention": bool(args["upcast_attention"]),
        "resnet_time_scale_shift": "scale_shift" if args["use_scale_shift_norm"] else "default",
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


def clip_text_config(tower: nn.Module, num_layers: int) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` for an OpenCLIP text tower (a ``CLIP`` or ``TextTransformer``),
    keeping its first ``num_layers`` blocks."""
    import open_clip  # deferred: the rest of this module needs only the model arguments

    transformer = tower.transformer
    block = transformer.resblocks[0]
    if not isinstance(block.ls_1, nn.Identity):
        raise ValueError("the text tower uses layer scale (ls_init_value), which CLIPTextModel does not have")
    activation = block.mlp.gelu
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": int(tower.token_embedding.num_embeddings), "hidden_size": int(transformer.width),
        "intermediate_size": int(block.mlp.c_fc.out_features), "num_hidden_layers": num_layers,
        "num_attention_heads": int(block.attn.num_heads),
        "max_position_embeddings": int(tower.positional_embedding.shape[0]),
        "hidden_act": "quick_gelu" if isinstance(activation, open_clip.transformer.QuickGELU) else "gelu",
        "layer_norm_eps": float(block.ln_1.eps), "attention_dropout": 0.0, "dropout": 0.0,
        "projection_dim": int(transformer.width), "bos_token_id": CLIP_BOS_TOKEN_ID,
        "eos_token_id": CLIP_EOS_TOKEN_ID, "pad_token_id": 0, "torch_dtype": "float32",
    }
