"""Helper of test_fsdp_cpu.py: the tiny LatentDiffusion under FSDP on 2 CPU ranks (gloo), as UNetFSDPStrategy wraps it.

python tests/training/fsdp_cpu_run.py OUTPUT_DIR. Each rank checks the wrapping and the optimizer, runs
one training step and one EMA update through the root FSDP module (as Lightning does), rank 0 samples the
EMA model gathered from the shards (as the sample-grid and export callbacks do), and the ranks
save a sharded checkpoint in Lightning's FSDP layout to OUTPUT_DIR/sharded.ckpt; rank 0 also saves the
gathered full weights to OUTPUT_DIR/full.pt and what it found to OUTPUT_DIR/report.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from lightning.fabric.strategies.fsdp import (
    _METADATA_FILENAME, _distributed_checkpoint_save, _get_full_state_dict_context, _get_sharded_state_dict_context)
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ldm.config import instantiate_module
from ldm.training.fsdp import fsdp_wrap, whole_pipeline

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_PROMPTS = ["a red circle on a white background"]
SAMPLE_OPTIONS = dict(num_inference_steps=2, guidance_scale=2.0, seed=0)


def tiny_module():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo", "model.latents.vae_weights=null", "model.latents.scale_factor=0.5",
                                          "model.ema_decay=0.5", "~model.optimizer.fused"])
    torch.manual_seed(0)
    return instantiate_module(cfg.model)


def worker(rank: int, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FSDP_TEST_PORT", "29561"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    output_dir = Path(output)
    module = tiny_module()
    wrapped = fsdp_wrap(module, device=torch.device("cpu"))
    optimizer = module.configure_optimizers()["optimizer"]  # after wrapping, as Lightning does

    units = [type(unit.module).__name__ for unit in FSDP.fsdp_modules(wrapped)]
    managed = {name for unit in FSDP.fsdp_modules(wrapped) for handle in [unit._handle] if handle
               for name in handle.flat_param._fqns}
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    report = {
        "units": units,
        "managed_frozen": sorted(n for n in managed if n.startswith(("vae.", "text_encoder."))),
        "optimizer_is_unet": optimized == {id(p) for p in module.network.parameters()},
        "local_numel": {name: sum(p.numel() for p in getattr(module, name).parameters())
                        for name in ("network", "vae", "text_encoder")},
    }

    generator = torch.Generator().manual_seed(rank)
    batch = {"image": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, "caption": ["a red circle", "a square"]}
    loss = _ForwardRedirection()(wrapped, module, "training_step", batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    module.ema_network.update_parameters(module.network)  # element-wise on the local shards
    report["loss"] = float(loss)

    pipeline = whole_pipeline(wrapped, module)  # as the sample-grid and export callbacks call it
    assert (pipeline is None) == (rank != 0)
    if rank == 0:
        report["images"] = pipeline(SAMPLE_PROMPTS, height=32, width=32, **SAMPLE_OPTIONS)

    with _get_sharded_state_dict_context(wrapped):
        state = {"model": module.state_dict(), "optimizer_0": FSDP.optim_state_dict(wrapped, optimizer)}
    path = output_dir / "sharded.ckpt"
    path.mkdir(parents=True, exist_ok=True)
    _distributed_checkpoint_save(state, path)
    with _get_full_state_dict_context(wrapped, world_size=2):
        full = module.state_dict()
    if rank == 0:
        torch.save({"global_step": 1}, path / _METADATA_FILENAME)
        torch.save({k: v.detach().clone() for k, v in full.items()}, output_dir / "full.pt")
        torch.save(report, output_dir / "report.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
