"""hydra/launcher=slurm: submitit's SLURM launcher with one task per device, requeues enabled, resume from last."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]


def test_slurm_launcher_takes_its_allocation_from_the_trainer():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=multinode", "trainer.num_nodes=3"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher  # submitit_folder needs a running Hydra app: only the keys read here resolve
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (3, 8, 8)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0
    assert cfg.ckpt_path == "last"  # a requeued job resumes from its run folder's last.ckpt
    assert "SIGUSR2" in cfg.callbacks.preemption.signals  # submitit's signal
