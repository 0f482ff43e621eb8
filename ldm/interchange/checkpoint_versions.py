"""ldm training checkpoints of earlier versions, read as this version names things.

Format 1 (before the denoiser contracts): the network was the module's ``unet`` (state-dict keys ``unet.*`` and
``ema_unet.*``) and the model config held ``unet``, ``prediction_type``, ``loss_weighting``, ``snr_gamma``,
``lora``, ``pretrained``, ``vae_weights``, ``latent_scale_factor``, ... at its top. Format 2 names the network
``network`` (``network.*``, ``ema_network.*``) and groups the rest: ``objective``, ``mode``, ``latents``, ``loss``,
``validation``, and ``text_encoder.size_condition_dropout``.
"""

from __future__ import annotations

from typing import Any

FORMAT_KEY = "ldm_format"
FORMAT = 2
STATE_PREFIXES_1_TO_2 = (("ema_unet.", "ema_network."), ("unet.", "network."))
DISCRETE_DIFFUSION = "ldm.diffusion.training_objectives.DiscreteDiffusion"
FULL_TRAINING = "ldm.training.full_training.FullTraining"
LORA_TRAINING = "ldm.training.lora_training.LoraTraining"
STRATIFIED_VALIDATION = "ldm.training.stratified_validation.StratifiedValidationLoss"


def renamed_state_key(key: str) -> str:
    """A format-1 state-dict key in format 2 (other keys unchanged)."""
    for old, new in STATE_PREFIXES_1_TO_2:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def upgrade_model_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A format-1 model config (``ldm_model_config``) in format 2; a format-2 one is returned as it is."""
    if not config or "unet" not in config:
        return config
    old = dict(config)
    new: dict[str, Any] = {"network": old.pop("unet")}
    for name in ("_target_", "vae", "text_encoder", "noise_schedule", "optimizer", "lr_schedule", "ema_decay"):
        if name in old:
            new[name] = old.pop(name)
    discrete = {name: old.pop(name) for name in ("prediction_type", "loss_weighting", "snr_gamma") if name in old}
    objective = old.pop("objective", None)
    new["objective"] = objective or {"_target_": DISCRETE_DIFFUSION, **discrete}
    lora, pretrained = old.pop("lora", None), old.pop("pretrained", None)
    new["mode"] = ({"_target_": LORA_TRAINING, "pretrained": pretrained, **lora} if lora
                   else {"_target_": FULL_TRAINING, "pretrained": pretrained})
    new["latents"] = {new_name: old.pop(name) for name, new_name in (
        ("vae_weights", "vae_weights"), ("latent_scale_factor", "scale_factor"), ("sample_posterior", "sample_posterior"),
        ("channels_last", "channels_last")) if name in old}
    new["loss"] = {**(old.pop("loss", None) or {}), **{name: old.pop(name) for name in (
        "offset_noise_strength", "prior_loss_weight") if name in old}}
    new["validation"] = {"_target_": STRATIFIED_VALIDATION, **{new_name: old.pop(name) for name, new_name in (
        ("val_loss_bins", "bins"), ("val_loss_seed", "seed"), ("val_loss_subset", "subset")) if name in old}}
    dropout = old.pop("size_condition_dropout", None)
    if dropout and isinstance(new.get("text_encoder"), dict):
        new["text_encoder"] = {**new["text_encoder"], "size_condition_dropout": dropout}
    return {**new, **old}


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Bring a training checkpoint of an earlier format to this one, in place (state-dict keys, model config);
    returns it."""
    if checkpoint.get(FORMAT_KEY, 1) >= FORMAT:
        return checkpoint
    if "state_dict" in checkpoint:
        checkpoint["state_dict"] = {renamed_state_key(key): value for key, value in checkpoint["state_dict"].items()}
    if "ldm_model_config" in checkpoint:
        checkpoint["ldm_model_config"] = upgrade_model_config(checkpoint["ldm_model_config"])
    checkpoint[FORMAT_KEY] = FORMAT
    return checkpoint
