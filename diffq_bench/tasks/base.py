"""The task contract: one benchmark = data + model + loss/metrics + the paper's evaluation.

The training loop (:mod:`diffq_bench.train`) only ever talks to a task through this class, so it
never branches on a task name. A task is a keyword-only dataclass built from its config group
(``conf/task/<name>.yaml``): the group's keys are exactly its fields, and a file's values are the
field defaults unless several files of one task own them (a contract test checks both). Subclasses
add or re-default fields instead of restating argument lists; nested option groups (a model
architecture) are typed nodes (:func:`typed_node`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing as tp
from pathlib import Path

import torch
from torch import nn

from ..checks import check_number
from ..data.fingerprint import fingerprint

T = tp.TypeVar("T")


def did_you_mean(word: str, choices: tp.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_default(obj: tp.Any, name: str) -> tp.Any:
    """The default of dataclass field ``name`` of ``obj``'s class (its factory called)."""
    field = next(f for f in dataclasses.fields(obj) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def typed_node(cls: tp.Type[T], value: tp.Any, where: str, exclude: tp.Collection[str] = (),
               base: tp.Optional[T] = None) -> T:
    """A dataclass option group from a config mapping, refusing unknown keys by name.

    Args:
        cls: the dataclass of the group.
        value: an instance of it, a mapping of (some of) its fields, or None.
        where: the group's config path for messages (``task.model``).
        exclude: fields the config may not set (they are derived, e.g. from the data).
        base: the values of the fields a mapping leaves out (default: ``cls()``).
    Raises:
        ValueError: unknown or excluded keys (the message lists the valid ones), bad values.
    """
    if isinstance(value, cls):
        return value
    base = cls() if base is None else base
    if value is None:
        return base
    if not isinstance(value, tp.Mapping):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {value!r}")
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude)
    for key in value:
        if key in exclude:
            raise ValueError(f"{where}.{key} is set from the data; remove it")
        if key not in valid:
            raise ValueError(f"unknown key {where}.{key}{did_you_mean(key, valid)}; valid: "
                             f"{', '.join(valid)}")
    return dataclasses.replace(base, **value)


@dataclasses.dataclass(eq=False, kw_only=True)
class Task:
    """Base class of every benchmark (a keyword-only dataclass: its fields are the config keys).

    Class attributes:
        name: registry key (``TASKS[name]``).
        metric: key of the paper's metric in :meth:`evaluate`'s dict (``ppl``, ``top1``, ``nsdr``).
        lower_is_better: direction of ``metric`` (best checkpoint selection, Pareto fronts).

    Fields:
        penalty_scale: how the size penalty meets this task's loss: the loop minimises
            ``loss + penalty_scale · λ · size_MiB``, so that the ``lambda`` a user types is the
            paper's λ for the benchmark (1.0 when the official recipe adds λ·size to a mean loss;
            1/3072 for the WikiText-103 LM, whose fairseq recipe adds it to the NLL summed over
            each 3072-token micro-batch).

    Instance attributes set by the runner before use:
        device: ``torch.device`` the model and batches live on.
        data_root: folder with the dataset (official layout), or where embedded data is written.
        cache_dir: folder for derived caches (tokenized tensors...).
    """
    name: tp.ClassVar[str] = "base"
    metric: tp.ClassVar[str] = "loss"
    lower_is_better: tp.ClassVar[bool] = True

    penalty_scale: float = 1.0

    def __post_init__(self) -> None:
        """Check the options (subclasses extend this; no data is touched before :meth:`setup`)."""
        check_number("task.penalty_scale", self.penalty_scale, 0.0)
        self.device = torch.device("cpu")
        self.data_root: Path = Path(".")
        self.cache_dir: Path = Path(".cache")
        self.num_workers = 0
        self.seed = 0
        self.data_dir: tp.Optional[Path] = None  # the folder setup() read the data from

    def penalty_convention(self) -> str:
        """How λ is applied, in words (result.json and the tables show it)."""
        if self.penalty_scale == 1.0:
            return "lambda*size_MiB added to the mean loss"
        return (f"lambda*size_MiB added once per {1 / self.penalty_scale:g} summed loss terms "
                f"(= {self.penalty_scale:.4g}*lambda*size on the mean loss)")

    @classmethod
    def is_better(cls, value: float, best: tp.Optional[float]) -> bool:
        """Whether ``value`` of :attr:`metric` beats ``best`` (None: anything does)."""
        if best is None:
            return True
        return value < best if cls.lower_is_better else value > best

    def _int_field(self, name: str, minimum: int = 1) -> None:
        """Check that field ``name`` is an integer >= ``minimum`` (``task.<name>`` in the message)."""
        setattr(self, name, int(check_number(f"task.{name}", getattr(self, name), minimum, integer=True)))

    def setup(self, data_root: tp.Union[str, Path], cache_dir: tp.Union[str, Path],
              device: tp.Union[str, torch.device], num_workers: int = 0, seed: int = 0) -> None:
        """Locate (or build, for embedded sets) the data; raise :class:`DataMissingError` if absent."""
        self.data_root = Path(data_root)
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.seed = seed

    def build_model(self) -> nn.Module:
        """A freshly initialised model (no pretrained download, ever)."""
        raise NotImplementedError

    def check_model(self) -> None:
        """Build the model on the meta device (no memory, no data), so that an architecture that
        cannot be built fails when the config is validated, not after the data is loaded.
        Tasks whose model needs the data (classes, vocabulary) override this with stand-ins.

        Raises:
            ValueError: the model options cannot be built.
        """
        with torch.device("meta"):
            self.build_model()

    def train_batches(self, epoch: int) -> tp.Iterable[tp.Any]:
        """The batches of one training epoch (deterministic given ``seed`` and ``epoch``)."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: tp.Any) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """One forward on a training batch: (loss to minimise, flat dict of float metrics)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> tp.Dict[str, float]:
        """The paper's evaluation on ``split`` (``valid`` or ``test``); includes :attr:`metric`.

        A task whose metric is a function of per-batch sums implements :meth:`evaluate_parts` and
        :meth:`combine_parts` instead: its evaluation is then sharded under data parallelism.
        """
        parts = self.evaluate_parts(model, split)
        if parts is None:
            raise NotImplementedError(f"task {self.name!r} implements neither evaluate() nor evaluate_parts()")
        return self.combine_parts(parts)

    # ---------------------------------------------------------------- sharded training data
    #: ``(rank, world, accum)`` under data parallelism (set by the loop before each epoch's
    #: :meth:`train_batches` when :meth:`loads_own_shard` says so): the task then yields only this
    #: process's part of each global batch, i.e. micro-batches ``k * world + rank`` for ``k`` in
    #: ``range(accum)`` of the ``world * accum`` equal slices of the global batch, concatenated in
    #: ``k`` order (see :func:`diffq_bench.data.images.shard_indices`). Same samples, same order
    #: and same augmentation as the single-process run; only the reading is split.
    train_shard: tp.ClassVar[tp.Tuple[int, int, int]] = (0, 1, 1)  # per instance once the loop sets it

    def loads_own_shard(self) -> bool:
        """Whether :meth:`train_batches` honours :attr:`train_shard` (False: every process builds
        the whole global batch and the loop slices it, as a task whose batch is cheap to build or
        mixes samples across the batch does)."""
        return False

    # ---------------------------------------------------------------- sharded evaluation
    #: ``(rank, world)``: the evaluation batches :meth:`evaluate_parts` computes are those whose
    #: index ``i`` has ``i % world == rank`` (set by the loop under data parallelism).
    eval_shard: tp.ClassVar[tp.Tuple[int, int]] = (0, 1)  # per instance once the loop sets it

    def evaluate_parts(self, model: nn.Module, split: str) -> tp.Optional[tp.Dict[str, tp.List[float]]]:
        """Per-batch additive parts of the evaluation of this shard (:attr:`eval_shard`), e.g.
        ``{"loss": [...], "correct": [...], "count": [...]}``; None when the task evaluates whole
        (its evaluation then runs on one process and the others wait)."""
        return None

    def combine_parts(self, parts: tp.Mapping[str, tp.Sequence[float]]) -> tp.Dict[str, float]:
        """The metrics from the parts of all shards (summed with ``math.fsum``: exact, so the
        sharded result equals the single-process one)."""
        raise NotImplementedError

    def shard_owns(self, index: int) -> bool:
        """Whether evaluation batch ``index`` belongs to this process's shard."""
        rank, world = self.eval_shard
        return index % world == rank

    #: path components naming a group of files in :meth:`data_fingerprint` (1: a split or a file)
    fingerprint_depth: tp.ClassVar[int] = 1

    def data_fingerprint(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """The fingerprint of the files under :attr:`data_dir` (set by :meth:`setup`; None when
        the task reads no folder): recorded with the run, compared before reusing or resuming it."""
        if self.data_dir is None:
            return None
        root = Path(self.data_dir)
        files = [p for p in root.rglob("*") if p.is_file() and
                 not any(part.startswith(".") for part in p.relative_to(root).parts)]
        return fingerprint(root, files, self.cache_dir, self.fingerprint_depth)

    # ---------------------------------------------------------------- optional hooks
    def skipped_files(self) -> tp.Dict[str, int]:
        """{split: unreadable data files left out} when the task's ``skip_bad_files`` is on
        (result.json records the nonzero ones as ``skipped_files_<split>``); empty: none can be."""
        return {}

    def num_train_batches(self) -> tp.Optional[int]:
        """Batches per training epoch when :meth:`train_batches` yields from a generator
        (None: the loop takes ``len(train_batches(0))``)."""
        return None

    #: ``distill_loss(student_output, teacher_output) -> Tensor``: how a quantized sub-network
    #: learns from the full-precision one (one-shot MPQ); None: the mean squared error between
    #: the floating tensors of the two outputs.
    distill_loss: tp.ClassVar[tp.Optional[tp.Callable[[tp.Any, tp.Any], torch.Tensor]]] = None
