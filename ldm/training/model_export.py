"""Callback: the run ends by writing its model as a self-contained diffusers folder in the run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

from ldm.interchange.export import check_exportable, export_pipeline
from ldm.training.fsdp import whole_pipeline
from ldm.training.lora_training import write_run_lora


class ExportModelAtEnd(L.Callback):
    """At the end of training, writes the module's (EMA) model to ``output_dir`` as a diffusers folder:
    safetensors weights, configs, tokenizer and scheduler, which ``TextToImagePipeline.from_pretrained``
    and diffusers' ``StableDiffusionPipeline.from_pretrained`` load with nothing else of the run.
    A folder left by an earlier end of the same run (a resumed run ending again) is replaced. A LoRA run
    (``model/mode=lora``) also writes its adapters to ``lora/`` beside it, in diffusers' and kohya's layouts."""

    def __init__(self, output_dir: str, use_ema: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.use_ema = use_ema

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A network family without a diffusers layout stops the run before its first step, not at its end."""
        if stage == "fit" and getattr(pl_module, "model_config", None):
            try:
                check_exportable(pl_module.model_config)
            except ValueError as error:
                raise ValueError(f"callbacks.export_model: {error}; drop the callback with ~callbacks.export_model"
                                 ) from None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        use_ema = self.use_ema and getattr(pl_module, "ema_network", None) is not None
        pipeline = whole_pipeline(trainer.strategy.model, pl_module, use_ema=use_ema)  # every rank: FSDP gathers
        if pipeline is None:  # not rank 0
            return
        staging = self.output_dir.with_name(f"{self.output_dir.name}.new")
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
        written = export_pipeline(pipeline, staging, format="diffusers")
        if self.output_dir.exists():
            shutil.rmtree(self.output_dir)
        written.rename(self.output_dir)
        if pl_module.mode.lora:  # a LoRA run also hands over its adapters alone, in both layouts
            lora_dir = self.output_dir.with_name("lora")
            for path in write_run_lora(pl_module, lora_dir, use_ema=use_ema):
                print(f"LoRA weights written to {path}")
        print(f"Model written to {self.output_dir} (python -m ldm.tools.sample --model {self.output_dir} "
              "--prompt ...)")
