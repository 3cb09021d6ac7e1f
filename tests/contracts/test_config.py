"""Config composition for every group option, and config errors that fail before any work."""
from __future__ import annotations

import inspect

import pytest

from diffq_bench import cli
from diffq_bench.config import ConfigError, compose, find_conf_dir, validate
from diffq_bench.quant import QUANTIZERS
from diffq_bench.tasks import TASKS

CONF = find_conf_dir()


def _options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_conf_dir_found_and_env_override(monkeypatch, tmp_path):
    assert (CONF / "config.yaml").is_file()
    monkeypatch.setenv("DIFFQ_BENCH_CONF", str(tmp_path))
    assert find_conf_dir() == CONF  # env folder lacks config.yaml: falls back to the package's
    (tmp_path / "config.yaml").write_text("x: 1\n")
    assert find_conf_dir() == tmp_path.resolve()


@pytest.mark.parametrize("optim", _options("optim"))
def test_every_optim_composes(compose_toy, optim):
    cfg = compose_toy(f"optim={optim}")
    validate(cfg)
    assert cfg.optim.name == optim


@pytest.mark.parametrize("quant", _options("quant"))
def test_every_quant_composes_and_matches_constructor(compose_toy, quant):
    cfg = compose_toy(f"quant={quant}")
    assert cfg.quant.name == quant
    validate(cfg)
    params = inspect.signature(QUANTIZERS[quant].__init__).parameters
    keys = set(cfg.quant) - {"name"}
    assert keys <= set(params), f"conf/quant/{quant}.yaml keys not in the constructor: {keys - set(params)}"


@pytest.mark.parametrize("task", _options("task"))
def test_every_task_composes(task):
    cfg = compose([f"task={task}", "quant=none"])
    assert cfg.task.name in TASKS  # several files may share one task (cifar10_resnet18 -> cifar10)
    validate(cfg)


def test_aliases_reach_the_quantizer(compose_toy):
    cfg = compose_toy("quant=diffq", "lambda=3", "group_size=8")
    assert cfg.quant.penalty == 3 and cfg.quant.group_size == 8
    assert cfg["lambda"] == 3


def test_paper_lm_command_composes():
    cfg = compose(["task=wikitext103", "quant=diffq", "lambda=1", "group_size=16"])
    assert cfg.task.name == "wikitext103" and cfg.quant.penalty == 1 and cfg.quant.group_size == 16


def test_task_file_overrides_train_and_optim(compose_toy):
    cfg = compose_toy()
    assert cfg.train.epochs == 2 and cfg.optim.lr == 0.003  # from task/toy.yaml
    cfg = compose_toy("train.epochs=5", "optim=sgd")
    assert cfg.train.epochs == 5 and cfg.optim.name == "sgd" and cfg.optim.lr == 0.003


@pytest.mark.parametrize("override, message", [
    ("lambda=-1", "lambda must be"),
    ("group_size=-4", "group_size must be an integer"),
    ("group_size=1.5", "group_size must be an integer"),
    ("train.epochs=0", "train.epochs"),
    ("train.schedule=linear", "train.schedule must be one of cosine, constant"),
    ("optim.name=rmsprop", "unknown optim name 'rmsprop'.*valid: adam, adamw, nag, sgd"),
    ("+task.bogus=1", "task 'toy' does not take bogus; valid keys"),
    ("+quant.bogus=1", "quant 'none' does not take bogus"),
    ("task.name=nope", "unknown task name 'nope'.*valid:.*toy"),
    ("quant.name=nope", "unknown quant name 'nope'.*valid:.*none"),
    ("device=tpu", "device must be"),
    ("task.batch_size=0", "task 'toy': batch_size must be"),
])
def test_bad_values_fail_validation(compose_toy, override, message):
    cfg = compose_toy(override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize("overrides, message", [
    (("quant=qat", "quant.bits=99"), "quant 'qat': bits must be"),
    (("quant=diffq", "quant.noise=pink"), "quant 'diffq'"),
    (("quant=lsq", "quant.bits=1"), "quant 'lsq': bits must be"),
])
def test_bad_quantizer_values_fail_validation(compose_toy, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_toy(*overrides))


@pytest.mark.parametrize("override", ["foo=1", "train.nope=3", "quant=nope", "task=nope"])
def test_unknown_keys_and_options_fail_composition(compose_toy, override):
    with pytest.raises(Exception) as info:
        compose_toy(override)
    assert "nope" in str(info.value) or "foo" in str(info.value)


def test_config_error_exits_before_any_work(toy_task, toy_conf, tmp_path, monkeypatch, capsys):
    root = tmp_path / "store"
    monkeypatch.setattr("sys.argv", ["diffq-bench", f"hydra.searchpath=[file://{toy_conf}]", "task=toy",
                                     "quant=none", "lambda=-2", f"paths.root={root}"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert "lambda must be a finite number >= 0.0, got -2" in capsys.readouterr().err
    assert not root.exists()  # nothing was created
