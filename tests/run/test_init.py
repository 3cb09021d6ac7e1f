"""init=: fine-tuning from a weights file or from another run, identity by content, grid order."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from diffq_bench import cli
from diffq_bench.config import ConfigError, validate
from diffq_bench.init import InitError, load_into, read_state_dict
from diffq_bench.xp import Xp, signature


@pytest.fixture
def float_weights(compose_toy, tmp_path):
    """The state dict of a trained toy model (the float run's best weights)."""
    result = cli.run(compose_toy(f"paths.root={tmp_path / 'float'}"))
    best = torch.load(tmp_path / "float" / "xps" / result["sig"] / "best.th", weights_only=True)
    return best["model"]


def _model(compose_toy):
    from diffq_bench.tasks import TASKS
    return TASKS["toy"]().build_model()


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp", "safetensors"])
def test_weights_files_of_common_codebases_load(compose_toy, float_weights, tmp_path, wrap):
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.th")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in float_weights.items()}, str(path))
    else:
        state = {"plain": float_weights, "model": {"model": float_weights, "epoch": 3},
                 "state_dict": {"state_dict": float_weights, "arch": "mlp"},
                 "ddp": {f"module.{k}": v for k, v in float_weights.items()}}[wrap]
        torch.save(state, path)
    model = _model(compose_toy)
    load_into(model, read_state_dict(path), str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, float_weights[key])


def test_mismatched_weights_name_the_keys(compose_toy, float_weights, tmp_path):
    path = tmp_path / "w.th"
    broken = dict(float_weights)
    broken["0.weight"] = broken["0.weight"][:, :5]
    broken.pop("5.bias")
    broken["extra.weight"] = torch.zeros(3)
    torch.save(broken, path)
    with pytest.raises(InitError, match=r"1 missing \(e\.g\. \['5\.bias'\]\).*1 unexpected.*0\.weight: \(128, 5\)"):
        load_into(_model(compose_toy), read_state_dict(path), str(path))


def test_missing_file_is_one_config_line(compose_toy, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=f"init file {tmp_path}/nope.th does not exist"):
        validate(compose_toy(f"init={tmp_path}/nope.th"))


def test_identity_is_the_content_not_the_path(compose_toy, float_weights, tmp_path):
    a, b = tmp_path / "a.th", tmp_path / "sub" / "b.th"
    b.parent.mkdir()
    torch.save(float_weights, a)
    b.write_bytes(a.read_bytes())
    sig_a, sig_b = signature(compose_toy(f"init={a}")), signature(compose_toy(f"init={b}"))
    assert sig_a == sig_b != signature(compose_toy())
    changed = dict(float_weights)
    changed["0.bias"] = changed["0.bias"] + 1
    torch.save(changed, b)
    assert signature(compose_toy(f"init={b}")) != sig_a


def test_fine_tune_from_a_file_starts_from_its_weights(compose_toy, float_weights, tmp_path):
    path = tmp_path / "w.th"
    torch.save(float_weights, path)
    cfg = compose_toy("quant=lsq", f"init={path}", "train.epochs=1", "train.steps_per_epoch=1",
                      "optim.lr=0")  # lr 0: the weights stay what init gave
    result = cli.run(cfg)
    best = torch.load(Xp(cfg.paths.root, cfg).best_path, weights_only=True)["model"]
    for key, value in float_weights.items():
        assert torch.equal(best[key], value)
    assert "initial weights from" in Xp(cfg.paths.root, cfg).log_path.read_text()
    assert result["metrics"]["restore_exact"] == 1.0


def _run_spec(toy_conf):
    return f"run:hydra.searchpath=[file://{toy_conf}] task=toy quant=none runtime.progress=false"


def test_fine_tune_from_a_run(compose_toy, toy_conf, tmp_path):
    child = compose_toy("quant=lsq", f"init='{_run_spec(toy_conf)}'", "train.epochs=1",
                        "train.steps_per_epoch=1", "optim.lr=0")
    with pytest.raises(InitError, match=r"init run \w+ \(.*task=toy quant=none.*\) is NEW, not DONE: run it first"):
        cli.run(child)
    assert Xp(child.paths.root, child).read_status()["state"] == "FAILED"
    parent = cli.run(compose_toy())
    assert Xp(child.paths.root, child).read_config()["init"] == {"run": parent["sig"]}
    cli.run(child)
    parent_best = torch.load(child.paths.root + f"/xps/{parent['sig']}/best.th", weights_only=True)
    best = torch.load(Xp(child.paths.root, child).best_path, weights_only=True)["model"]
    assert all(torch.equal(best[k], v) for k, v in parent_best["model"].items())


GRID = """\
# @package _global_
grid:
  name: {name}
  runs:
    - {{task: digits, quant: none, optim: sgd, optim.lr: {lr}, {entry}}}
    - {{task: digits, quant: "lsq,qat", init: "run:task=digits quant=none {tiny} optim=sgd optim.lr={lr}",
       optim.lr: 0.001, {entry}}}
"""
TINY = "task.train_subset=64 task.eval_subset=32 train.epochs=1"


def _sweep(conf, root, grid, data):
    return subprocess.run(
        [sys.executable, "-m", "diffq_bench.cli", "-m", f"+grid={grid}", f"hydra.searchpath=[file://{conf}]",
         f"paths.root={root}", f"paths.data={data}", "runtime.progress=false",
         "hydra/launcher=local", "hydra.launcher.max_parallel=2"],
        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_grid_runs_the_float_run_first_and_a_failed_parent_fails_its_children(tmp_path):
    conf = tmp_path / "conf"
    (conf / "grid").mkdir(parents=True)
    for name, lr in (("ft", 0.05), ("ftfail", 1e30)):  # SGD at lr 1e30 diverges: that float run FAILS
        entry = ", ".join(f"{k}: {v}" for k, v in (o.split("=") for o in TINY.split()))
        (conf / "grid" / f"{name}.yaml").write_text(GRID.format(name=name, tiny=TINY, lr=lr, entry=entry))
    root, data = tmp_path / "store", tmp_path / "data"
    out = _sweep(conf, root, "ft", data)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in root.glob("xps/*/result.json")]
    assert sorted(r["quant"] for r in results) == ["lsq", "none", "qat"]
    float_sig = next(r["sig"] for r in results if r["quant"] == "none")
    assert all(r["axes"]["init.run"] == float_sig for r in results if r["quant"] != "none")
    assert "3 runs: 0 to launch, 3 done" in _sweep(conf, root, "ft", data).stdout  # nothing again
    root = tmp_path / "failing"
    out = _sweep(conf, root, "ftfail", data)
    assert out.returncode != 0
    statuses = [json.loads((p / "status.json").read_text()) for p in (root / "xps").iterdir()]
    assert len(statuses) == 3 and {s["state"] for s in statuses} == {"FAILED"}
    assert sum("FAILED, so this run was not started" in s["traceback"] for s in statuses) == 2
