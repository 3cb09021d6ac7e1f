"""Locating, composing and validating the Hydra config (``conf/``) before any work is done.

Validation runs on the composed config before a run folder is created or any data is touched, so
a typo costs a second, not a dataset load: unknown task/quant/optim names list the valid ones, task
and quant keys are checked against their constructor signatures, and the numeric aliases
(``lambda``, ``group_size``) and ``train.*`` values are range-checked.
"""
from __future__ import annotations

import inspect
import math
import os
import typing as tp
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from . import init
from .checks import check_number
from .optim import OPTIMIZERS, SCHEDULES
from .quant import QUANTIZERS, QuantizerError, get_quantizer
from .tasks import TASKS

CONF_ENV = "DIFFQ_BENCH_CONF"
AMP_DTYPES = ("bfloat16", "float16")


class ConfigError(ValueError):
    """The composed config is invalid; the message names the key, the value and what is allowed."""


def find_conf_dir() -> Path:
    """The ``conf/`` folder: ``$DIFFQ_BENCH_CONF`` if set, else the one next to the package.

    Raises:
        ConfigError: when no folder with ``config.yaml`` is found (non-editable install, moved tree).
    """
    candidates = []
    if os.environ.get(CONF_ENV):
        candidates.append(Path(os.environ[CONF_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent / "conf")
    for cand in candidates:
        if (cand / "config.yaml").is_file():
            return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"cannot find the diffq-bench config folder (conf/config.yaml); tried: {tried}. "
                      f"Install from a checkout with `pip install -e .` or set {CONF_ENV}=<path to conf>.")


def compose(overrides: tp.Sequence[str] = (), conf_dir: tp.Optional[Path] = None) -> DictConfig:
    """Compose the config like the command line would (tests, scripts, parent runs of ``init``).

    Inside a running Hydra app (the CLI, a sweep, a launched job) the app's own search path is
    used; elsewhere the ``conf/`` folder.

    Args:
        overrides: Hydra overrides, e.g. ``["task=wikitext_mini", "lambda=1"]``.
        conf_dir: config folder (default: :func:`find_conf_dir`).
    """
    if conf_dir is None and GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=list(overrides))
    conf_dir = conf_dir or find_conf_dir()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def to_container(cfg: tp.Any) -> tp.Any:
    """Resolved plain Python containers (dict/list/scalars) from an OmegaConf node."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _signature_keys(fn: tp.Callable, skip: tp.Sequence[str]) -> tp.Tuple[tp.Set[str], bool]:
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {n for n, p in params.items() if n not in skip and p.kind in
             (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return names, var_kw


def _check_kwargs(axis: str, name: str, cls: type, kwargs: tp.Dict[str, tp.Any],
                  skip: tp.Sequence[str]) -> None:
    valid, var_kw = _signature_keys(cls.__init__, ("self",) + tuple(skip))
    unknown = sorted(set(kwargs) - valid)
    if unknown and not var_kw:
        raise ConfigError(f"{axis} {name!r} does not take {', '.join(unknown)}; "
                          f"valid keys of {axis}.*: {', '.join(sorted(valid)) or '(none)'}")


def _number(key: str, value: tp.Any, low: float, integer: bool = False,
            high: float = math.inf) -> None:
    check_number(key, value, low, high, integer=integer, error=ConfigError)


def _try_build(task_name: str, task_cls: type, task_kw: tp.Dict[str, tp.Any],
               quant_kw: tp.Dict[str, tp.Any], quant_name: str) -> None:
    """Construct the task and the quantizer (on a stand-in layer) to surface bad argument values.

    Task constructors only check their arguments (data is touched in ``setup``); a quantizer needs
    a model, and the real one needs the data, so a small Linear stands in: it catches range errors
    (bits, min/max bits, noise kind...), not model-dependent ones (group size vs tensor size).
    """
    try:
        task_cls(**task_kw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"task {task_name!r}: {exc}") from exc
    try:
        quantizer = get_quantizer(quant_name, nn.Sequential(nn.Linear(64, 64)), **quant_kw)
    except QuantizerError as exc:
        raise ConfigError(f"quant {quant_name!r}: {exc}") from exc
    except Exception:  # noqa: BLE001 - the stand-in model may not suit every method: not a config error
        return
    quantizer.detach()


def validate(cfg: DictConfig) -> None:
    """Check the composed config; raise :class:`ConfigError` with a readable message.

    Args:
        cfg: the config composed by Hydra (``conf/config.yaml`` + overrides).
    """
    try:
        plain = to_container(cfg)
    except Exception as exc:  # noqa: BLE001 - interpolation errors become config errors
        raise ConfigError(f"config does not resolve: {exc}") from exc
    for key in ("task", "quant", "optim", "train"):
        if not isinstance(plain.get(key), dict):
            raise ConfigError(f"config has no `{key}` section (pick one with `{key}=<name>`)")
    _number("lambda", plain.get("lambda"), 0.0)
    _number("group_size", plain.get("group_size"), 0, integer=True)
    _number("seed", plain.get("seed"), 0, integer=True)

    for axis, registry in (("task", TASKS), ("quant", QUANTIZERS), ("optim", OPTIMIZERS)):
        name = plain[axis].get("name")
        if name not in registry:
            raise ConfigError(f"unknown {axis} name {name!r} (from {axis}.name); "
                              f"valid: {', '.join(sorted(registry)) or '(none registered)'}")
    task_kw = {k: v for k, v in plain["task"].items() if k != "name"}
    _check_kwargs("task", plain["task"]["name"], TASKS[plain["task"]["name"]], task_kw, ())
    quant_kw = {k: v for k, v in plain["quant"].items() if k != "name"}
    _check_kwargs("quant", plain["quant"]["name"], QUANTIZERS[plain["quant"]["name"]], quant_kw,
                  ("model",))
    if "penalty" in quant_kw:
        _number("quant.penalty", quant_kw["penalty"], 0.0)
    if "group_size" in quant_kw:
        _number("quant.group_size", quant_kw["group_size"], 0, integer=True)

    try:
        spec = init.parse(plain.get("init"))
    except init.InitError as exc:
        raise ConfigError(str(exc)) from None
    if spec is not None and spec.is_run:
        try:
            compose(list(spec.overrides))
        except Exception as exc:  # noqa: BLE001 - a bad parent spec is a config error
            raise ConfigError(f"init=run:{' '.join(spec.overrides)} does not compose: "
                              f"{str(exc).splitlines()[0]}") from None

    _try_build(plain["task"]["name"], TASKS[plain["task"]["name"]], task_kw, quant_kw, plain["quant"]["name"])

    optim = plain["optim"]
    _number("optim.lr", optim.get("lr"), 0.0)
    _number("optim.weight_decay", optim.get("weight_decay", 0.0), 0.0)
    if optim.get("quant_lr") is not None:
        _number("optim.quant_lr", optim["quant_lr"], 0.0)

    train = plain["train"]
    _number("train.epochs", train.get("epochs"), 1, integer=True)
    if train.get("steps_per_epoch") is not None:
        _number("train.steps_per_epoch", train["steps_per_epoch"], 1, integer=True)
    _number("train.grad_accum", train.get("grad_accum"), 1, integer=True)
    _number("train.clip_grad", train.get("clip_grad"), 0.0)
    _number("train.clip_grad_value", train.get("clip_grad_value", 0.0), 0.0)
    _number("train.ema_decay", train.get("ema_decay", 0.0), 0.0, high=0.999999)
    if train.get("best_max_size_mb") is not None:
        _number("train.best_max_size_mb", train["best_max_size_mb"], 0.0)
    if not isinstance(train.get("clip_quantizer_params", True), bool):
        raise ConfigError(f"train.clip_quantizer_params must be true or false, "
                          f"got {train.get('clip_quantizer_params')!r}")
    _number("train.warmup_steps", train.get("warmup_steps"), 0, integer=True)
    _number("train.min_lr_ratio", train.get("min_lr_ratio"), 0.0, high=1.0)
    _number("train.warmup_init_ratio", train.get("warmup_init_ratio", 0.0), 0.0, high=1.0)
    _number("train.step_epochs", train.get("step_epochs", 1), 1, integer=True)
    _number("train.step_gamma", train.get("step_gamma", 1.0), 0.0, high=1.0)
    _number("train.period_steps", train.get("period_steps", 1), 1, integer=True)
    _number("train.t_mult", train.get("t_mult", 1.0), 1.0)
    _number("train.lr_shrink", train.get("lr_shrink", 1.0), 0.0, high=1.0)
    _number("train.eval_every", train.get("eval_every"), 1, integer=True)
    if train.get("schedule") not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, "
                          f"got {train.get('schedule')!r}")
    if train.get("amp_dtype") not in AMP_DTYPES:
        raise ConfigError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, "
                          f"got {train.get('amp_dtype')!r}")
    runtime = plain.get("runtime", {})
    _number("runtime.checkpoint_every_steps", runtime.get("checkpoint_every_steps", 0), 0, integer=True)
    _number("runtime.checkpoint_every_s", runtime.get("checkpoint_every_s", 0), 0.0)
    device = str(plain.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
