"""Training entry point: python train.py experiment=NAME key=value ... (Hydra)."""

from __future__ import annotations

import hydra
import lightning as L
from omegaconf import DictConfig

from ldm.config import check_run_config, instantiate_group, instantiate_module, one_line_config_errors, register_resolvers
from ldm.training.preemption import stop_signal_exit_status

register_resolvers()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured module on the configured data; returns the final logged metrics."""
    check_run_config(cfg, "train")  # every key, value type and number, before anything is built
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = instantiate_module(cfg.model)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger; with logger=none it has nothing to do
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    # Checkpoints hold tensors and plain values only: resuming never runs code from the file.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    status = stop_signal_exit_status(callbacks)
    if status is not None:  # Ctrl-C or SIGTERM: last.ckpt holds the step it stopped at; not a finished run
        raise SystemExit(status)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with one_line_config_errors():
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
