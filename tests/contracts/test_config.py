"""Config composition for every group option, and config errors that fail before any work."""
from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

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


@pytest.mark.slow
def test_wheel_ships_the_configs_and_finds_them(tmp_path):
    """`pip install .` (non-editable) has conf/ inside the package: a wheel holds every yaml of
    conf/ under diffq_bench/conf/, and the package unpacked from it finds that copy."""
    import subprocess
    import sys
    import zipfile

    root = CONF.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(tmp_path / "wheel"), "-q"], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"diffq_bench/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", "import diffq_bench.config as c; print(c.find_conf_dir())"],
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert out == str((tmp_path / "site" / "diffq_bench" / "conf").resolve())


def test_app_help_names_the_app_and_every_option(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["diffq-bench", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    out = capsys.readouterr().out
    assert out.startswith("diffq-bench: the DiffQ paper's benchmarks") and "powered by Hydra" not in out
    for group in ("task", "quant", "optim", "grid", "hydra/launcher"):
        for option in _options(group):
            assert option in out, f"diffq-bench --help does not list {group}={option}"


def test_table_names_an_unknown_grid(tmp_path, capsys):
    (tmp_path / "xps").mkdir()
    with pytest.raises(SystemExit) as info:
        cli.table_main(["--root", str(tmp_path), "--grid", "nosuch"])
    assert info.value.code == cli.EXIT_CONFIG
    assert capsys.readouterr().err.strip() == (
        f"diffq-bench-table: unknown grid 'nosuch': no conf/grid/nosuch.yaml and no run of it under "
        f"{tmp_path / 'xps'} (available: {', '.join(_options('grid'))})")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["wikitext_mini", "digits"])
def test_debug_preset_runs_any_task_in_seconds(task, tmp_path, monkeypatch, capsys):
    """+preset=debug: 3 steps, evaluation (valid, test, restore check) on 4 items, one row."""
    import json

    from diffq_bench.tasks import get_task

    root = tmp_path / "store"
    data = tmp_path / "data"
    monkeypatch.setattr("sys.argv", ["diffq-bench", "+preset=debug", f"task={task}", "quant=diffq",
                                     f"paths.root={root}", f"paths.data={data}",
                                     f"paths.cache={tmp_path / 'cache'}", "runtime.progress=false"])
    cli.main()
    (folder,) = list((root / "xps").iterdir())
    result = json.loads((folder / "result.json").read_text())
    assert result["metrics"]["steps"] == 3 and result["metrics"]["wall_time_s"] < 120
    cfg = compose(["+preset=debug", f"task={task}"])
    assert cfg.task.eval_subset == 4 and cfg.train.epochs == 1 and cfg.train.steps_per_epoch == 3
    # the subset is what the evaluation sees
    plain = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k != "name"}
    t = get_task(cfg.task.name, **plain)
    t.setup(data, tmp_path / "cache", "cpu")
    size = len(t.windows("test")) if task == "wikitext_mini" else len(t.datasets["test"])
    assert size == 4
    assert "| size (MiB) |" in capsys.readouterr().out
