"""Initial weights of a run (``init=``): fine-tuning from a float checkpoint, as the papers do.

``init`` is one of

- ``null``: a freshly initialised model (the default);
- a file: a torch state dict (``torch.save``; also the ``{"model": ...}`` of fairseq, DeiT and our
  own ``best.th``, timm's ``{"state_dict": ...}``, torchvision's plain dict, DDP's ``module.``
  prefixes) or a ``.safetensors`` file, always read safely (``weights_only`` / safetensors);
- ``run:<overrides>``: the best weights of another run of the same store, named by its overrides
  from the base config (``'init=run:task=wikitext103 quant=none'``), typically the float run of the
  same task. It must be DONE before this run starts (grids order or chain such runs).

A run's identity includes its init by content, never by path: a file's SHA-256, a run's signature
(:func:`diffq_bench.xp.semantic_config`). Keys and shapes must match the task's model exactly
(buffers such as BatchNorm's ``num_batches_tracked`` may be absent); a mismatch is one clear
error naming the keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shlex
import typing as tp
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import io

RUN_PREFIX = "run:"
#: wrappers of a state dict in the checkpoints of common codebases, tried in this order
WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
_DIGESTS: tp.Dict[tp.Tuple[str, int, int], str] = {}


class InitError(ValueError):
    """The ``init`` weights cannot be used: the message names the file or run and what to do."""


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """A parsed ``init`` value: a weights file, or the overrides naming a parent run."""
    path: tp.Optional[Path] = None
    overrides: tp.Tuple[str, ...] = ()

    @property
    def is_run(self) -> bool:
        return self.path is None


def parse(value: tp.Any) -> tp.Optional[InitSpec]:
    """The :class:`InitSpec` of a config's ``init`` value (None for ``null``).

    Raises:
        InitError: not a string, an empty ``run:``, or a file that does not exist.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InitError(f"init must be null, a weights file or 'run:<overrides>', got {value!r}")
    if value.startswith(RUN_PREFIX):
        overrides = tuple(shlex.split(value[len(RUN_PREFIX):]))
        if not overrides:
            raise InitError("init=run: needs the overrides of the parent run, e.g. "
                            "'init=run:task=wikitext103 quant=none'")
        return InitSpec(overrides=overrides)
    path = Path(value).expanduser()
    if not path.is_file():
        raise InitError(f"init file {path} does not exist (give a torch/safetensors weights file, "
                        "or 'run:<overrides>' for the best weights of another run)")
    return InitSpec(path=path)


def file_digest(path: Path) -> str:
    """SHA-256 of a weights file, computed once per (file, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def read_state_dict(path: Path) -> tp.Dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from the usual checkpoint containers.

    Raises:
        diffq_bench.io.LoadError: an unreadable or unsafe file.
        InitError: no state dict inside.
    """
    if path.suffix == ".safetensors":
        try:
            state: tp.Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any decoding error is one clear message
            raise io.LoadError(f"safetensors file {path} is corrupt or unreadable ({exc})") from None
    else:
        state = io.load_torch(path, what="weights file")
    for _ in range(3):  # nested wrappers: {"model": {"state_dict": ...}} and the like
        if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
            inner = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not tensors:
        raise InitError(f"{path} holds no state dict (looked in {', '.join(WRAPPERS)})")
    prefix = "module."
    if all(k.startswith(prefix) for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_into(model: nn.Module, tensors: tp.Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``: every parameter and buffer must be there with its shape
    (BatchNorm's ``num_batches_tracked`` may be missing), and nothing else.

    Raises:
        InitError: missing, unexpected or mis-shaped keys (examples named).
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in tensors and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in tensors if k not in own)
    shapes = sorted(f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
                    if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})" if shapes else ""]
        raise InitError(f"init weights {source} do not fit the task's model: "
                        f"{', '.join(p for p in parts if p)}; check the task's model options")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def describe(spec: InitSpec) -> str:
    """Human form of an init source for logs."""
    return str(spec.path) if not spec.is_run else RUN_PREFIX + " ".join(spec.overrides)


