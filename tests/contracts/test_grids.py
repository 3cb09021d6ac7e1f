"""Every grid file (conf/grid/*.yaml) loads as `+grid=NAME` and each of its runs composes and validates;
every official value a paper grid documents (``grid.recipe``: key, value, source) is what its runs get.

A run whose task, quantizer or optimizer config file does not exist fails the test with its name.
"""
import time

import pytest
from omegaconf import OmegaConf

from diffq_bench.config import compose, find_conf_dir, to_container, validate
from diffq_bench.launch import plan as sweep

CONF = find_conf_dir()
GRIDS = sorted(p.stem for p in (CONF / "grid").glob("*.yaml"))
PAPER_GRIDS = ("table_lm", "table_imagenet", "table_cifar", "table_cifar_res20", "table_musdb",
               "table_oneshot")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data folder holding the pretrained weights some grids fine-tune from (their content does not
    matter to composition and validation)."""
    root = tmp_path_factory.mktemp("data")
    (root / "pretrained").mkdir()
    for name in ("resnet18", "mobilenetv2_100"):
        (root / "pretrained" / f"{name}.pth").write_bytes(b"weights")
    return root


def _jobs(name):
    cfg = compose([f"+grid={name}"])
    return cfg, sweep.expand_grid(OmegaConf.to_container(cfg.grid.runs, resolve=False), [f"+grid={name}"], name)


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
def test_grid_runs_compose_and_validate(name, capsys, data):
    start = time.time()
    cfg, jobs = _jobs(name)
    assert cfg.grid.name == name, f"conf/grid/{name}.yaml must set grid.name: {name}"
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
        run_cfg = compose(job + [f"paths.data={data}"])
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


@pytest.mark.parametrize("name", [g for g in PAPER_GRIDS])
def test_paper_grid_has_the_documented_official_values(name, data):
    cfg, jobs = _jobs(name)
    recipe = OmegaConf.to_container(cfg.grid.recipe, resolve=False)
    assert recipe, f"conf/grid/{name}.yaml documents no official value (grid.recipe)"
    composed = {}
    for item in recipe:
        assert set(item) == {"runs", "key", "value", "source"} and item["source"], item
        wanted = item["runs"].split()
        matching = [job for job in jobs if all(w in job for w in wanted)]
        assert matching, f"{name}: no run matches {item['runs']!r}"
        for job in matching[:3]:
            key = tuple(job)
            if key not in composed:
                composed[key] = to_container(compose(job + [f"paths.data={data}"]))
            got = OmegaConf.select(OmegaConf.create(composed[key]), item["key"])
            assert got == item["value"], (f"{name}: {item['key']} is {got!r} in {' '.join(job)}, "
                                          f"not {item['value']!r} ({item['source']})")


def test_docs_list_the_recipes_the_tests_check():
    """docs/tables.md's "Official recipes" section is generated from the grids: it must be current."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "scripts" / "recipes_md.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr or out.stdout
