"""Every grid file (conf/grid/*.yaml) loads as `+grid=NAME` and each of its runs composes and validates.

A run whose task, quantizer or optimizer config file does not exist fails the test with its name.
"""
import time

import pytest
from omegaconf import OmegaConf

from diffq_bench.config import compose, find_conf_dir, to_container, validate
from diffq_bench.launch import plan as sweep

CONF = find_conf_dir()
GRIDS = sorted(p.stem for p in (CONF / "grid").glob("*.yaml"))
PAPER_GRIDS = ("table_lm", "table_imagenet", "table_cifar", "table_musdb")


def _missing_group_file(overrides):
    """The first `group=option` override whose conf/<group>/<option>.yaml is absent, else None."""
    for ovr in overrides:
        key, _, value = ovr.partition("=")
        key = key.lstrip("+")
        if key in ("task", "quant", "optim") and not (CONF / key / f"{value}.yaml").is_file():
            return f"conf/{key}/{value}.yaml does not exist"
    return None


def test_grid_files_present():
    assert set(PAPER_GRIDS) | {"mini"} <= set(GRIDS)


@pytest.mark.parametrize("name", GRIDS)
def test_grid_runs_compose_and_validate(name, capsys):
    start = time.time()
    cfg = compose([f"+grid={name}"])
    assert cfg.grid.name == name, f"conf/grid/{name}.yaml must set grid.name: {name}"
    runs = OmegaConf.to_container(cfg.grid.runs, resolve=False)
    jobs = sweep.expand_grid(runs, [f"+grid={name}"], name)
    assert jobs, f"grid {name} expands to no run"
    # One composition per (quantizer, override keys) and per task checks every key and config file
    # the grid names; composing all ~150 paper runs would cost minutes on 2 cores.
    seen, picked = set(), []
    for job in jobs:
        opts = dict(o.lstrip("+").partition("=")[::2] for o in job)
        keys = (opts.get("quant"), tuple(sorted(opts)))
        if keys not in seen or ("task", opts.get("task")) not in seen:
            seen |= {keys, ("task", opts.get("task"))}
            picked.append(job)
    checked = 0
    for job in picked:
        reason = _missing_group_file(job)
        assert reason is None, f"grid {name}: {' '.join(job)}: {reason}"
        run_cfg = compose(job)
        # the grid's values must land where they were meant to (no silent typo in a key)
        plain = to_container(run_cfg)
        for ovr in job:
            key, _, value = ovr.partition("=")
            if key.lstrip("+") in ("grid", "task", "quant", "optim"):
                continue
            got = OmegaConf.select(run_cfg, key.lstrip("+"))
            assert got is not None, f"{name}: {key} not in the composed config of {job}"
        assert plain["grid"]["name"] == name
        validate(run_cfg)
        checked += 1
    with capsys.disabled():
        print(f"\n[test_grids] {name}: {len(jobs)} run(s); {checked} representative(s) composed and "
              f"validated, {time.time() - start:.1f}s")
    assert checked > 0, f"no run of grid {name} was checked"


def test_mini_grid_covers_the_issue_methods():
    runs = OmegaConf.to_container(compose(["+grid=mini"]).grid.runs, resolve=False)
    jobs = [dict(o.partition("=")[::2] for o in job) for job in sweep.expand_grid(runs, [], "mini")]
    for task in ("wikitext_mini", "digits", "sfmix"):
        mine = [j for j in jobs if j["task"] == task]
        methods = {(j["quant"], j.get("quant.bits")) for j in mine}
        assert {("none", None), ("qat", "4"), ("qat", "8"), ("lsq", None), ("quant_noise", "4"),
                ("quant_noise_ipq", None), ("dsq", None), ("oneshot_mpq", None)} <= methods, task
        diffq = {(j["lambda"], j["group_size"]) for j in mine if j["quant"] == "diffq"}
        assert len({lam for lam, _ in diffq}) == 3 and {g for _, g in diffq} == {"8", "16"}, task
