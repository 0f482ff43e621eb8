"""Configs fail early: a misspelt key, a wrong type or a value out of range stops at start-up in one
line naming the key, before any data is read or model built."""

from functools import partial

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict

from ldm.config import config_error_message, register_resolvers
from ldm.config_check import ConfigError, build_options, check_config, check_number
from ldm.evaluation.options import EvalOptions
from ldm.interchange.pretrained import PretrainedWeights
from ldm.training.module_checks import check_optimizer_arguments

from .docs.commands import ROOT


def composed(config_name: str, overrides: list[str], tmp_path):
    """The config an entry point receives (``hydra:`` values resolving into ``tmp_path``), without Hydra's node."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def refused(error: pytest.ExceptionInfo, key: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert key in message
    return message


@pytest.mark.parametrize("overrides", [
    [],
    ["experiment=sd15_finetune", "model.mode.pretrained.path=/ckpt/v1-5.safetensors",
     "data.train_shards='/data/laion/{00000..00009}.tar'"],
    ["data=shards", "data.train_shards=/data/a.tar", "data.filters.min_width=512", "data.filters.max_punsafe=0.1"],
])
def test_shipped_configs_pass_the_start_up_check(tmp_path, overrides):
    check_config(composed("train", overrides, tmp_path))


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (["data.batch_size=abc"], "data.batch_size", "must be int"),
    (["+data.synthetic.num_trian=3"], "data.synthetic.num_trian", "did you mean data.synthetic.num_train"),
    (["data.synthetic.num_train=-3"], "data.synthetic.num_train", "must be > 0"),
    (["data.synthetic.seed=abc"], "data.synthetic.seed", "must be int"),
    (["data=shards", "data.train_shards=/a.tar", "+data.filters.min_widht=3"], "data.filters.min_widht",
     "did you mean data.filters.min_width"),
    (["data=shards", "data.train_shards=/a.tar", "data.filters.max_punsafe=2"], "data.filters.max_punsafe", "[0, 1]"),
    (["data=shards", "data.train_shards=/a.tar", "data.filters.min_width=wide"], "data.filters.min_width", "int"),
    (["data=shards"], "data.train_shards", "is required"),
    (["+model.network.channel_mul=[1,2]"], "model.network.channel_mul", "did you mean model.network.channel_mult"),
    (["+model.mode.pretrained.path=/x.safetensors", "+model.mode.pretrained.use_ema=maybe"], "model.mode.pretrained.use_ema",
     "must be bool"),
    (["+model.mode.pretrained.use_ema=true"], "model.mode.pretrained.path", "is required"),
    (["trainer.max_steps=many"], "trainer.max_steps", "must be int"),
])
def test_bad_training_configs_stop_at_start_up_naming_the_key(tmp_path, overrides, key, says):
    with pytest.raises(ConfigError) as error:
        check_config(composed("train", overrides, tmp_path))
    assert says in refused(error, key)


@pytest.mark.parametrize(("overrides", "key"), [
    (["+eval.num_sample=3"], "eval.num_sample"),
    (["eval.num_samples=0"], "eval.num_samples"),
    (["eval.guidance_scale=nan"], "eval.guidance_scale"),
    (["eval.guidance_scales=[1,inf]"], "eval.guidance_scales"),
    (["eval.sampler=hune"], "eval.sampler"),
    (["eval.batch_size=-1"], "eval.batch_size"),
    (["eval.use_ema=often"], "eval.use_ema"),
])
def test_bad_eval_options_are_refused_naming_the_key(tmp_path, overrides, key):
    cfg = composed("eval", ["ckpt_path=x.ckpt", *overrides], tmp_path)
    with pytest.raises(ConfigError) as error:
        build_options(EvalOptions, cfg.eval, "eval")
    refused(error, key)


def test_the_shipped_eval_options_build(tmp_path):
    options = build_options(EvalOptions, composed("eval", ["ckpt_path=x.ckpt"], tmp_path).eval, "eval")
    assert options.scales == [2.0] and options.resolution == 32 and options.output_dir == str(tmp_path / "run")


@pytest.mark.parametrize(("keywords", "key"), [
    (dict(lr="abc"), "model.optimizer.lr='abc' must be a number"),
    (dict(lr=0.0), "model.optimizer.lr=0.0 must be > 0"),
    (dict(lr=float("nan")), "model.optimizer.lr=nan must be a finite number"),
    (dict(lr=1e-4, weight_decay=-0.1), "model.optimizer.weight_decay"),
    (dict(lr=1e-4, betas=[0.9, 1.5]), "model.optimizer.betas[1]=1.5 must be < 1"),
])
def test_optimizer_numbers_are_checked_when_the_module_is_built(keywords, key):
    with pytest.raises(ValueError) as error:
        check_optimizer_arguments(partial(torch.optim.AdamW, **keywords))
    refused(error, key)


def test_a_good_optimizer_passes():
    check_optimizer_arguments(partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01, betas=[0.9, 0.999]))


def test_pretrained_given_as_a_mapping_is_built_and_checked():
    assert build_options(PretrainedWeights, {"path": "/x"}, "model.mode.pretrained") == PretrainedWeights("/x")
    with pytest.raises(ConfigError) as error:
        build_options(PretrainedWeights, {"path": " "}, "model.mode.pretrained")
    refused(error, "model.mode.pretrained.path")


def test_check_number_bounds():
    assert check_number("k", 3) == 3.0
    for value in (True, "1", float("inf")):
        with pytest.raises(ConfigError, match="k="):
            check_number("k", value)
    with pytest.raises(ConfigError, match="must be <= 1"):
        check_number("k", 2, maximum=1)


def test_entry_points_print_config_errors_in_one_line_and_leave_bugs_alone():
    try:
        try:
            raise ConfigError("data.batch_size='abc' has the wrong type: it must be int")
        except ConfigError as cause:
            raise InstantiationException("Error in call to target\nfull_key: data") from cause
    except InstantiationException as wrapped:
        assert config_error_message(wrapped) == "data.batch_size='abc' has the wrong type: it must be int"
    assert config_error_message(FileNotFoundError("no weights file at /m/vae.safetensors")).endswith("vae.safetensors")
    assert config_error_message(TypeError("unsupported operand")) is None
    try:
        int("x")  # a ValueError raised outside ldm's code is a bug to show, not a config error
    except ValueError as outside:
        assert config_error_message(outside) is None
