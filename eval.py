"""Evaluation entry point: python eval.py ckpt_path=PATH eval.num_samples=N ... (Hydra)."""

from __future__ import annotations

import hydra
import lightning as L
from omegaconf import DictConfig

from ldm.config import check_run_config, one_line_config_errors, register_resolvers
from ldm.evaluation.job import run_evaluation

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    with one_line_config_errors():
        check_run_config(cfg, "eval")  # every key, value type and number, before anything is built
        fabric = L.Fabric(**cfg.fabric)
        fabric.launch()
        results = run_evaluation(cfg, device=fabric.device)
    return results["rows"][0]["fid"]


if __name__ == "__main__":
    main()
