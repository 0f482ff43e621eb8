"""The notebooks' model: the demo's VAE and U-Net, trained briefly on the built-in data and cached.

``tiny_model(cache_dir)`` runs the same two stages as ``make demo`` (``experiment=demo_vae``, then
``experiment=demo``), composed from ``configs/`` and fitted by Lightning, only far shorter (``SHORT_RUN``). The
weights are cached under ``cache_dir`` by their settings, so the notebooks that share a cache train
once; a notebook run alone trains when the cache is missing.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from ldm.checkpoints import load_weights, save_weights
from ldm.config import instantiate_module, register_resolvers

ROOT = Path(__file__).resolve().parents[1]
VAE_STEPS = 150
UNET_STEPS = 400
# Stage 2's changes to the demo for a run of a few hundred steps: half its batch (a step costs far less
# on this CPU and, at this model size, learns nearly as much: notebook 5's attention measurement is the
# check), a shorter warm-up, and an EMA window short enough that the EMA weights, which generate, follow
# the weights rather than lag behind them.
SHORT_RUN = ("data.batch_size=32", "model.lr_schedule.warmup_steps=50", "model.ema_decay=0.99")


def compose_run(experiment: str, root_dir: str | Path, *overrides: str) -> DictConfig:
    """The resolved ``train.yaml`` config of ``experiment`` with data and weights under ``root_dir``."""
    register_resolvers()
    root_dir = Path(root_dir).resolve()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"experiment={experiment}", f"paths.root_dir={root_dir}", f"paths.output_dir={root_dir}/outputs",
            "logger=none", "callbacks=default", "trainer.enable_progress_bar=false",
            "data.num_workers=0", *overrides,
        ])
    return cfg


def fit(cfg: DictConfig) -> L.LightningModule:
    """Train the configured module on the configured data, as train.py does, with no logger or checkpoints."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = instantiate_module(cfg.model)
    with open_dict(cfg):
        cfg.trainer.pop("plugins", None)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                      enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule)
    return module


def trained_parts(module: L.LightningModule) -> torch.nn.ModuleDict:
    """What stage 2 trains: the network and its EMA copy (the VAE comes from its file, the text tower from a seed)."""
    return torch.nn.ModuleDict({"network": module.network, "ema_network": module.ema_network})


def trained_vae(cache_dir: str | Path, vae_steps: int = VAE_STEPS, seed: int = 0) -> Path:
    """The stage-1 VAE weights file (with its latent scale factor), trained for ``vae_steps`` when missing."""
    vae_path = Path(cache_dir) / f"models/vae-{vae_steps}-seed{seed}.safetensors"
    if not vae_path.is_file():
        started = time.perf_counter()
        fit(compose_run("demo_vae", cache_dir, f"trainer.max_steps={vae_steps}", f"seed={seed}",
                        f"model.export_path={vae_path}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0"))
        print(f"stage 1: VAE trained for {vae_steps} steps in {time.perf_counter() - started:.0f} s")
    return vae_path


def stage2_config(cache_dir: str | Path, *overrides: str, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS,
                  seed: int = 0) -> DictConfig:
    """The demo's stage-2 config, shortened by ``SHORT_RUN`` to ``unet_steps``, over the cached VAE (trained
    first if missing)."""
    return compose_run("demo", cache_dir, f"trainer.max_steps={unet_steps}", f"seed={seed}",
                       f"model.latents.vae_weights={trained_vae(cache_dir, vae_steps, seed)}", "trainer.max_time=null",
                       "trainer.limit_val_batches=0", *SHORT_RUN, *overrides)


def untrained_model(cache_dir: str | Path, vae_steps: int = VAE_STEPS, seed: int = 0) -> L.LightningModule:
    """The demo's ``LatentDiffusion`` with the cached VAE and a freshly initialised (seeded) U-Net, in eval mode."""
    cfg = stage2_config(cache_dir, vae_steps=vae_steps, seed=seed)
    torch.manual_seed(seed)
    return instantiate_module(cfg.model).eval()


def tiny_model(cache_dir: str | Path, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS, seed: int = 0):
    """The demo's ``LatentDiffusion`` (VAE, U-Net and EMA U-Net, text encoder) after ``vae_steps`` of stage 1
    and ``unet_steps`` of stage 2, loaded from ``cache_dir`` or trained there (its data too) when missing.

    Returns the module in eval mode; ``module.model_config`` is its config, so it exports.
    """
    short_run = hashlib.sha256("|".join(SHORT_RUN).encode()).hexdigest()[:8]  # a change of settings retrains
    unet_path = Path(cache_dir) / f"models/unet-{vae_steps}-{unet_steps}-seed{seed}-{short_run}.safetensors"
    stage2 = stage2_config(cache_dir, vae_steps=vae_steps, unet_steps=unet_steps, seed=seed)
    if unet_path.is_file():
        module = instantiate_module(stage2.model)
        load_weights(trained_parts(module), unet_path)
    else:
        started = time.perf_counter()
        module = fit(stage2)
        print(f"stage 2: U-Net trained for {unet_steps} steps in {time.perf_counter() - started:.0f} s")
        save_weights(trained_parts(module), unet_path,
                     metadata={"settings": dict(vae_steps=vae_steps, unet_steps=unet_steps, seed=seed,
                                                  short_run=list(SHORT_RUN))})
    return module.eval()
