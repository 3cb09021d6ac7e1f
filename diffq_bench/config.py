"""Locating, composing and validating the Hydra config (``conf/``) before any work is done.

Validation runs on the composed config before a run folder is created or any data is touched, so
a typo costs a second, not a dataset load: unknown task/quant/optim names list the valid ones, task
and quant keys are checked against their constructor signatures, and the numeric aliases
(``lambda``, ``group_size``) and ``train.*`` values are range-checked.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import itertools
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
from .tasks.base import did_you_mean

CONF_ENV = "DIFFQ_BENCH_CONF"
AMP_DTYPES = ("bfloat16", "float16")


class ConfigError(ValueError):
    """The composed config is invalid; the message names the key, the value and what is allowed."""


def find_conf_dir() -> Path:
    """The ``conf/`` folder: ``$DIFFQ_BENCH_CONF`` if set, else the copy inside the installed
    package (``diffq_bench/conf``, written by ``pip install .``, see setup.py), else the checkout's
    ``conf/`` next to the package (editable installs, tests).

    Raises:
        ConfigError: when no folder with ``config.yaml`` is found (a moved or partial tree).
    """
    candidates = []
    if os.environ.get(CONF_ENV):
        candidates.append(Path(os.environ[CONF_ENV]))
    candidates.append(Path(__file__).resolve().parent / "conf")
    candidates.append(Path(__file__).resolve().parent.parent / "conf")
    for cand in candidates:
        if (cand / "config.yaml").is_file():
            return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"cannot find the diffq-bench config folder (conf/config.yaml); tried: {tried}. "
                      f"Reinstall the package (`pip install .` ships conf/ inside it) or set "
                      f"{CONF_ENV}=<path to conf>.")


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
        raise _does_not_take(axis, name, unknown, valid | {"name"})


def _does_not_take(axis: str, name: tp.Any, unknown: tp.Sequence[str], valid: tp.Iterable[str],
                   hint: str = "") -> ConfigError:
    return ConfigError(f"{axis} {name!r} does not take {', '.join(unknown)}{did_you_mean(unknown[0], valid)}; "
                       f"valid keys of {axis}.*: {', '.join(sorted(valid)) or '(none)'}{hint}")


def _unknown_key(where: str, key: str, valid: tp.Iterable[str], hint: str = "") -> ConfigError:
    full = f"{where}.{key}" if where else key
    scope = f"valid keys of {where}.*" if where else "valid top-level keys"
    return ConfigError(f"unknown key {full}{did_you_mean(key, valid)}; {scope}: "
                       f"{', '.join(sorted(valid)) or '(none)'}{hint}")


#: top-level keys besides those of conf/config.yaml: the config groups and Hydra's own node
GROUP_KEYS = ("task", "quant", "optim", "grid", "hydra")


@functools.lru_cache(maxsize=None)
def _base_config(conf_dir: Path) -> tp.Dict[str, tp.Any]:
    """conf/config.yaml's own keys and values (its defaults list and Hydra node left out)."""
    base = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    return {k: v for k, v in base.items() if k not in ("defaults", "hydra")}


@functools.lru_cache(maxsize=None)
def optim_keys(conf_dir: Path, name: str) -> tp.Optional[tp.FrozenSet[str]]:
    """The keys optimizer ``name`` takes: those of ``conf/optim/<name>.yaml`` (None: no such file)."""
    path = conf_dir / "optim" / f"{name}.yaml"
    if not path.is_file():
        return None
    return frozenset(str(k) for k in OmegaConf.load(path).keys())


def check_keys(plain: tp.Mapping[str, tp.Any], conf_dir: tp.Optional[Path] = None) -> None:
    """Refuse keys that nothing reads (added with ``+key=...``, or left by a recipe).

    Top-level keys are those of ``conf/config.yaml`` and the groups; ``train``, ``paths``,
    ``runtime``... take the keys ``conf/config.yaml`` gives them; ``optim`` the keys of the
    chosen optimizer's file (``conf/optim/<name>.yaml``: a task recipe written for NAG leaves
    ``optim.momentum`` behind when the command line picks ``optim=adam``; it is refused, not
    silently ignored); ``task`` and ``quant`` their constructor's parameters.

    Args:
        plain: the composed config as plain containers (:func:`to_container`).
        conf_dir: the config folder (default: :func:`find_conf_dir`).
    Raises:
        ConfigError: the first unknown key, with the valid ones and the closest match.
    """
    conf_dir = conf_dir or find_conf_dir()
    base = _base_config(conf_dir)
    top = set(base) | set(GROUP_KEYS)
    for key in plain:
        if key not in top:
            raise _unknown_key("", str(key), top)
    for section, value in base.items():
        if isinstance(value, dict) and isinstance(plain.get(section), dict):
            for key in plain[section]:
                if key not in value:
                    raise _unknown_key(section, str(key), value)
    optim = plain.get("optim")
    if isinstance(optim, dict) and isinstance(optim.get("name"), str):
        valid = optim_keys(conf_dir, optim["name"])
        extra = sorted(set(optim) - valid) if valid is not None else []
        if extra:
            raise _does_not_take("optim", optim["name"], extra, valid,
                                 f" (a task recipe for another optimizer sets it? drop it with ~optim.{extra[0]})")
    for axis, registry, skip in (("task", TASKS, ()), ("quant", QUANTIZERS, ("model",))):
        node = plain.get(axis)
        if isinstance(node, dict) and node.get("name") in registry:
            _check_kwargs(axis, node["name"], registry[node["name"]],
                          {k: v for k, v in node.items() if k != "name"}, skip)


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have (before any data is read).

    Raises:
        ConfigError: ``device=cuda[:N]`` without CUDA, or N beyond the visible GPUs.
    """
    import torch
    device = str(device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda}); use device=cpu or device=auto")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} visible "
                          f"GPU(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")


def _suggest(word: str, choices: tp.Collection[str]) -> str:
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f" (did you mean {lower[word.lower()]!r}?)"
    return did_you_mean(word, choices)


def _group_options(roots: tp.Sequence[Path], group: str) -> tp.Optional[tp.Set[str]]:
    """The options of config group ``group`` across the search path (None: not a group)."""
    folders = [root / group for root in roots if (root / group).is_dir()]
    if not folders:
        return None
    return {p.stem for folder in folders for p in folder.glob("*.yaml")}


def group_options(group: str, conf_dir: tp.Optional[Path] = None) -> tp.List[str]:
    """The options of config group ``group`` (``grid`` -> ``["mini", "table_lm", ...]``), sorted."""
    return sorted(_group_options([conf_dir or find_conf_dir()], group) or ())


def _override_values(override: tp.Any) -> tp.Optional[tp.List[str]]:
    """Each value of an override as override text (None: a sweep only Hydra can expand)."""
    if not override.is_sweep_override():
        return [str(override.input_line).split("=", 1)[1]]
    if override.is_discrete_sweep() and override.value_type.name != "GLOB_CHOICE_SWEEP":
        return list(override.sweep_string_iterator())
    return None


def _other_options_hint(conf_dir: Path, group: str, name: tp.Any, key: str, own: tp.Collection[str]) -> str:
    """``; bits is a key of quant=dsq, lsq, qat`` when other options of ``group`` take ``key`` (or
    its closest spelling) and the chosen one (keys ``own``) does not: the user may have meant another
    option, not another key."""
    owners: tp.Dict[str, tp.List[str]] = {}
    for path in sorted((conf_dir / group).glob("*.yaml")):
        if path.stem == name:
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        node = data.get(group) if group == "task" and isinstance(data, dict) else data
        for k in node if isinstance(node, dict) else ():
            if str(k) not in ("name", "defaults"):
                owners.setdefault(str(k), []).append(path.stem)
    match = key if key in owners else next(iter(difflib.get_close_matches(key, list(owners), n=1)), None)
    if match is None or match in own:
        return ""
    return f"; {match} is a key of {group}={', '.join(sorted(set(owners[match])))}"


def _check_path(cfg: DictConfig, key: str, conf_dir: tp.Optional[Path] = None) -> None:
    """Refuse ``key=value`` (no ``+``) when ``key`` is not in the composed config."""
    node: tp.Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # a list index, a null option...: Hydra says what is wrong
        keys = [str(k) for k in node.keys()]
        if part not in keys:
            where = ".".join(parts[:depth])
            if depth == 1 and where in ("task", "quant", "optim"):
                hint = _other_options_hint(conf_dir or find_conf_dir(), where, node.get("name"), part, keys)
                raise _does_not_take(where, node.get("name"), [part], keys, hint)
            hint = (f" (a free-form option takes new keys with +{key}=...)" if depth >= 2 else "")
            raise _unknown_key(where, part, keys, hint)
        try:
            node = node[part]
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve: validate says so
            return


def check_overrides(args: tp.Sequence[str], conf_dir: tp.Optional[Path] = None) -> None:
    """Check the command line of ``diffq-bench`` before Hydra composes it, so that a typo gets one
    line with the valid names (Hydra's own messages span a search path or suggest ``+key``).

    Group options (``task=digit``, ``quant=QAT``) are checked against the files of the config
    folder and ``hydra.searchpath``; ``key=value`` keys against the config composed with the
    chosen groups (each combination of a sweep's groups); keys added with ``+`` must be read by
    something (:func:`check_keys`). Hydra's own flags and overrides are left to Hydra, and so is
    anything this check cannot parse.

    Args:
        args: the command-line arguments (``sys.argv[1:]``).
        conf_dir: the config folder (default: :func:`find_conf_dir`).
    Raises:
        ConfigError: an unknown group option or key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # --help, --cfg, --info...: Hydra's own commands
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra reports it with its position
        return
    conf_dir = conf_dir or find_conf_dir()
    roots = [conf_dir]
    head = []
    for override in overrides:
        if override.key_or_group == "hydra.searchpath" and isinstance(override.value(), list):
            head.append(str(override.input_line))
            roots += [Path(str(e)[len("file://"):]) for e in override.value() if str(e).startswith("file://")]
    groups: tp.List[tp.Tuple[tp.Any, tp.List[str]]] = []
    keys: tp.List[tp.Tuple[tp.Any, tp.List[str]]] = []
    deletions = [str(o.input_line) for o in overrides if o.is_delete() and not o.is_hydra_override()]
    for override in overrides:
        if override.is_delete() or override.is_hydra_override() or override.package:
            continue
        values = _override_values(override)
        if values is None:
            return
        options = _group_options(roots, override.key_or_group)
        if options is None:
            keys.append((override, values))
            continue
        for value in values:
            if value not in options and value != "null":
                raise ConfigError(f"unknown {override.key_or_group} {value!r}{_suggest(value, options)}; "
                                  f"valid: {', '.join(sorted(options))}")
        groups.append((override, values))

    def text(override: tp.Any, value: str) -> str:
        prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
        return f"{prefix}{override.key_or_group}={value}"

    for combo in itertools.islice(itertools.product(*[values for _, values in groups]), 16):
        chosen = head + [text(o, v) for (o, _), v in zip(groups, combo)]
        try:
            cfg = compose(chosen, conf_dir)
        except Exception:  # noqa: BLE001 - Hydra explains a config that does not compose
            return
        for override, _ in keys:
            if not (override.is_add() or override.is_force_add()):
                _check_path(cfg, override.key_or_group, conf_dir)
        try:
            plain = to_container(compose(chosen + [text(o, values[0]) for o, values in keys] + deletions,
                                         conf_dir))
        except Exception:  # noqa: BLE001 - as above; validate() reports values that do not resolve
            return
        check_keys(plain, conf_dir)


def _number(key: str, value: tp.Any, low: float, integer: bool = False,
            high: float = math.inf) -> None:
    check_number(key, value, low, high, integer=integer, error=ConfigError)


def _try_build(task_name: str, task_cls: type, task_kw: tp.Dict[str, tp.Any],
               quant_kw: tp.Dict[str, tp.Any], quant_name: str) -> None:
    """Construct the task, its model on the meta device and the quantizer (on a stand-in layer) to
    surface bad argument values.

    Task constructors only check their arguments (data is touched in ``setup``); a quantizer needs
    a model, and the real one needs the data, so a small Linear stands in: it catches range errors
    (bits, min/max bits, noise kind...), not model-dependent ones (group size vs tensor size).
    """
    try:
        task = task_cls(**task_kw)
        task.check_model()  # the architecture, on the meta device: no memory, no data
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
    check_keys(plain)
    task_kw = {k: v for k, v in plain["task"].items() if k != "name"}
    quant_kw = {k: v for k, v in plain["quant"].items() if k != "name"}
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
    finish = plain.get("finish") or {}
    if finish.get("restore_check", "subset") not in ("subset", "full"):
        raise ConfigError(f"finish.restore_check must be subset or full, got {finish.get('restore_check')!r}")
    _number("finish.restore_subset", finish.get("restore_subset", 8), 1, integer=True)
    dist = plain.get("dist", {})
    _number("dist.grad_accum", dist.get("grad_accum", 1), 1, integer=True)
    _number("dist.timeout_s", dist.get("timeout_s", 1800), 1.0)
    if dist.get("backend", "auto") not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"dist.backend must be auto, gloo or nccl, got {dist.get('backend')!r}")
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
