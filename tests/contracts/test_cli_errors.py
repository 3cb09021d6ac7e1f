"""Command-line mistakes get one line naming what is wrong and what is valid (exit 2), before any
run folder or data is touched: group-option typos, misspelt or unread keys, optimizer keys a
recipe leaves behind, models that cannot be built, devices the machine does not have."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from diffq_bench import cli
from diffq_bench.config import ConfigError, check_overrides, compose, find_conf_dir, validate

CONF = find_conf_dir()


def _options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))


#: DiffQ has no `bits`: the message names the quantizers that do
BITS_ELSEWHERE = "; bits is a key of quant=dsq, lsq, oneshot_mpq, qat, quant_noise"


def _keys(path: str) -> str:
    return ", ".join(sorted(OmegaConf.load(CONF / path).keys()))


def _main(monkeypatch, capsys, tmp_path, *args: str):
    """Run ``diffq-bench ARGS`` in-process; returns (exit code, stderr lines)."""
    root, data = tmp_path / "store", tmp_path / "data"
    data.mkdir(exist_ok=True)
    monkeypatch.setattr("sys.argv", ["diffq-bench", f"paths.root={root}", f"paths.data={data}",
                                     "runtime.progress=false", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert not root.exists(), "a config error must not create a run folder"
    assert not any(data.iterdir()), "a config error must not touch the data"
    return info.value.code, err


@pytest.mark.parametrize("args, line", [
    (["task=digit"], f"unknown task 'digit' (did you mean 'digits'?); valid: {_options('task')}"),
    (["quant=difq"], f"unknown quant 'difq' (did you mean 'diffq'?); valid: {_options('quant')}"),
    (["optim=adamm"], f"unknown optim 'adamm' (did you mean 'adam'?); valid: {_options('optim')}"),
    (["quant=QAT"], f"unknown quant 'QAT' (did you mean 'qat'?); valid: {_options('quant')}"),
    (["-m", "+grid=nosuch"], f"unknown grid 'nosuch'; valid: {_options('grid')}"),
    (["-m", "task=digits,digit"], f"unknown task 'digit' (did you mean 'digits'?); valid: {_options('task')}"),
])
def test_group_option_typo_is_one_line(monkeypatch, capsys, tmp_path, args, line):
    code, err = _main(monkeypatch, capsys, tmp_path, *args)
    assert (code, err) == (cli.EXIT_CONFIG, [f"diffq-bench: config error: {line}"])


@pytest.mark.parametrize("args, line", [
    (["quant.bitz=4"], "quant 'diffq' does not take bitz; valid keys of quant.*: "
                       + _keys("quant/diffq.yaml") + BITS_ELSEWHERE),
    (["quant=qat", "quant.bitz=4"], "quant 'qat' does not take bitz (did you mean 'bits'?); valid keys of "
                                    "quant.*: " + _keys("quant/qat.yaml")),
    (["quant.bits=20"], "quant 'diffq' does not take bits (did you mean 'min_bits'?); valid keys of quant.*: "
                        + _keys("quant/diffq.yaml") + BITS_ELSEWHERE),
    (["optim.momentum=0.9"], "optim 'adam' does not take momentum; valid keys of optim.*: "
                             + _keys("optim/adam.yaml") + "; momentum is a key of optim=nag, sgd"),
    (["task=digits", "task.batchsize=3"], "task 'digits' does not take batchsize (did you mean 'batch_size'?); "
                                          "valid keys of task.*: " + ", ".join(sorted(
                                              OmegaConf.load(CONF / "task/digits.yaml").task.keys()))),
    (["train.epoch=3"], "unknown key train.epoch (did you mean 'epochs'?); valid keys of train.*: "
                        + ", ".join(sorted(OmegaConf.load(CONF / "config.yaml").train.keys()))),
    (["-m", "quant=qat", "quant.bitz=2,4"], "quant 'qat' does not take bitz (did you mean 'bits'?); valid keys "
                                            "of quant.*: " + _keys("quant/qat.yaml")),
])
def test_misspelt_key_is_one_line(monkeypatch, capsys, tmp_path, args, line):
    code, err = _main(monkeypatch, capsys, tmp_path, *args)
    assert (code, err) == (cli.EXIT_CONFIG, [f"diffq-bench: config error: {line}"])


@pytest.mark.parametrize("args, line", [
    (["+foo=1"], "unknown key foo; valid top-level keys: "
                 + ", ".join(sorted({k for k in OmegaConf.load(CONF / "config.yaml") if k not in ("defaults", "hydra")}
                                    | {"task", "quant", "optim", "grid", "hydra"}))),
    (["+train.nope=1"], "unknown key train.nope; valid keys of train.*: "
                        + ", ".join(sorted(OmegaConf.load(CONF / "config.yaml").train.keys()))),
    (["+optim.bogus=1"], "optim 'adam' does not take bogus; valid keys of optim.*: " + _keys("optim/adam.yaml")
                         + " (a task recipe for another optimizer sets it? drop it with ~optim.bogus)"),
])
def test_added_key_that_nothing_reads_is_refused(monkeypatch, capsys, tmp_path, args, line):
    code, err = _main(monkeypatch, capsys, tmp_path, *args)
    assert (code, err) == (cli.EXIT_CONFIG, [f"diffq-bench: config error: {line}"])


def test_optimizer_keys_of_the_recipe_do_not_leak_into_another_optimizer(monkeypatch, capsys, tmp_path):
    # conf/task/cifar10_resnet20.yaml is a NAG recipe (optim.momentum: 0.9); Adam takes no momentum
    code, err = _main(monkeypatch, capsys, tmp_path, "task=cifar10_resnet20", "optim=adam")
    assert (code, err) == (cli.EXIT_CONFIG, [
        "diffq-bench: config error: optim 'adam' does not take momentum; valid keys of optim.*: "
        + _keys("optim/adam.yaml") + " (a task recipe for another optimizer sets it? drop it with ~optim.momentum)"])
    with pytest.raises(ConfigError, match="optim 'adam' does not take momentum"):
        validate(compose(["task=cifar10_resnet20", "optim=adam"]))  # sweeps and grids: same rule
    cfg = compose(["task=cifar10_resnet20", "optim=adam", "~optim.momentum"])
    validate(cfg)  # the documented way out
    assert "momentum" not in cfg.optim and cfg.optim.lr == 0.1  # the recipe's other values stay


def test_model_that_cannot_be_built_fails_before_data(monkeypatch, capsys, tmp_path):
    code, err = _main(monkeypatch, capsys, tmp_path, "task.model.d_model=130")
    assert (code, err) == (cli.EXIT_CONFIG, [
        "diffq-bench: config error: task 'wikitext_mini': model.d_model (130) must be divisible by "
        "model.n_heads (4)"])
    code, err = _main(monkeypatch, capsys, tmp_path, "task=digits", "task.model=nosuchnet")
    assert code == cli.EXIT_CONFIG and len(err) == 1
    assert err[0].startswith("diffq-bench: config error: task 'digits': unknown image model 'nosuchnet'")


def test_model_kwargs_checked_on_the_meta_device():
    # the image model is only built after the data today; validation builds it on the meta device
    with pytest.raises(ConfigError, match="task 'digits'"):
        validate(compose(["task=digits", "+task.model_kwargs.nosuch=3"]))


@pytest.mark.parametrize("device, count, line", [
    ("cuda", 0, "device=cuda but CUDA is not available here"),
    ("cuda:3", 2, "device=cuda:3 but this machine has 2 visible GPU(s): cuda:0..cuda:1"),
])
def test_missing_cuda_device_fails_before_data(monkeypatch, capsys, tmp_path, device, count, line):
    monkeypatch.setattr("torch.cuda.is_available", lambda: count > 0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: count)
    code, err = _main(monkeypatch, capsys, tmp_path, f"device={device}")
    assert code == cli.EXIT_CONFIG and len(err) == 1
    assert err[0].startswith(f"diffq-bench: config error: {line}")


@pytest.mark.parametrize("args", [
    ["-m", "quant=diffq", "lambda=1,5", "group_size=8,16"],
    ["-m", "+grid=mini"],
    ["-m", "task=digits,wikitext_mini", "quant=none,qat"],
    ["+preset=debug", "task=digits"],
    ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
    ["init='run:task=wikitext_mini quant=none'", "quant=lsq"],
    ["task=cifar10_resnet20", "optim=adam", "~optim.momentum"],
    ["+task.model_kwargs.drop_rate=0.1", "task=digits"],
    ["--help"],
    ["--cfg", "job", "task=digit"],  # Hydra's own commands are left to Hydra
])
def test_legitimate_command_lines_pass_the_check(args):
    check_overrides(args)
