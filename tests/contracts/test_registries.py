"""Registries and config files agree: one source for every option and default.

- every quantizer in QUANTIZERS has conf/quant/<name>.yaml and every such file names a registered
  quantizer; every task in TASKS has at least one conf/task file and every file names a task;
- a config group's keys are exactly the constructor's parameters (no key the code ignores, no
  parameter the yaml leaves to a hidden default);
- a file's values are the constructor's defaults, except interpolated ones (owned by the top-level
  aliases such as ``${lambda}``) and, for a task with several files (cifar10_resnet18 /
  cifar10_wrn28_10...), the keys those files set differently, which each file owns; one file per
  task still holds exactly the defaults (its reference recipe).
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import typing as tp

import pytest
import yaml

from diffq_bench.config import find_conf_dir
from diffq_bench.quant import QUANTIZERS
from diffq_bench.tasks import TASKS

CONF = find_conf_dir()


def _files(group: str) -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    out = {}
    for path in sorted((CONF / group).glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        out[path.stem] = data[group] if group == "task" else data
    return out


def _defaults(cls: type, skip: tp.Collection[str] = ("self", "model")) -> tp.Dict[str, tp.Any]:
    """Constructor parameter -> default (``inspect.Parameter.empty`` when required)."""
    if dataclasses.is_dataclass(cls):
        out = {}
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            if field.default_factory is not dataclasses.MISSING:
                out[field.name] = field.default_factory()
            else:
                out[field.name] = (inspect.Parameter.empty if field.default is dataclasses.MISSING
                                   else field.default)
        return out
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n not in skip}


def _plain(value: tp.Any) -> tp.Any:
    """Comparable form: dataclasses as dicts, tuples as lists, ints as floats."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _same(yaml_value: tp.Any, default: tp.Any) -> bool:
    if dataclasses.is_dataclass(default) and isinstance(yaml_value, dict):
        # a nested node: the yaml states some fields (derived ones, e.g. vocab_size, it may not)
        full = _plain(default)
        return all(full.get(k) == _plain(v) for k, v in yaml_value.items())
    return _plain(yaml_value) == _plain(default)


def test_every_quantizer_has_its_config_and_every_config_its_quantizer():
    assert set(_files("quant")) == set(QUANTIZERS)
    for stem, data in _files("quant").items():
        assert data["name"] == stem, f"conf/quant/{stem}.yaml must say name: {stem}"


def test_every_task_has_a_config_and_every_config_a_task():
    names = {data["name"] for data in _files("task").values()}
    assert names == set(TASKS), (f"tasks without a config file: {set(TASKS) - names}; "
                                 f"files naming unknown tasks: {names - set(TASKS)}")


@pytest.mark.parametrize("stem", sorted(_files("quant")))
def test_quant_yaml_keys_and_values_are_the_constructors(stem):
    data = dict(_files("quant")[stem])
    cls = QUANTIZERS[data.pop("name")]
    defaults = _defaults(cls)
    assert set(data) == set(defaults), (f"conf/quant/{stem}.yaml keys differ from {cls.__name__}: "
                                        f"missing {set(defaults) - set(data)}, unknown {set(data) - set(defaults)}")
    for key, value in data.items():
        if isinstance(value, str) and value.startswith("${"):
            continue  # owned by a top-level alias (lambda, group_size, seed)
        assert defaults[key] is not inspect.Parameter.empty, f"{cls.__name__}.{key} needs a default"
        assert _same(value, defaults[key]), (f"conf/quant/{stem}.yaml {key}={value!r} but "
                                             f"{cls.__name__} defaults to {defaults[key]!r}")


def _task_files() -> tp.Dict[str, tp.List[tp.Tuple[str, tp.Dict[str, tp.Any]]]]:
    by_task = collections.defaultdict(list)
    for stem, data in _files("task").items():
        body = dict(data)
        by_task[body.pop("name")].append((stem, body))
    return by_task


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_yaml_keys_and_values_are_the_constructors(task):
    files = _task_files()[task]
    defaults = _defaults(TASKS[task], skip=("self",))
    owned = {k for k in defaults if len({repr(_plain(body.get(k))) for _, body in files}) > 1}
    at_defaults = []
    for stem, body in files:
        assert set(body) == set(defaults), (
            f"conf/task/{stem}.yaml keys differ from {TASKS[task].__name__}'s fields: missing "
            f"{sorted(set(defaults) - set(body))}, unknown {sorted(set(body) - set(defaults))}")
        differing = [k for k, v in body.items() if not _same(v, defaults[k])]
        stray = [k for k in differing if k not in owned]
        assert not stray, (f"conf/task/{stem}.yaml sets {[(k, body[k]) for k in stray]} but "
                           f"{TASKS[task].__name__} defaults to {[(k, defaults[k]) for k in stray]}")
        if not differing:
            at_defaults.append(stem)
    assert at_defaults, (f"no conf/task file of {task!r} holds exactly {TASKS[task].__name__}'s "
                         "defaults (its reference recipe)")
