"""Language modeling tasks: WikiText-103 (the paper's benchmark) and its embedded miniature.

Training: the train split is one token stream (``<eos>`` after every line, one ``<eos>`` in front
of the first token), cut into contiguous blocks of ``tokens_per_sample`` targets; each epoch visits
the blocks in an order drawn from ``(seed, epoch)``, ``batch_size`` blocks per batch.

Loss normalisation: :meth:`LanguageModelingTask.step` returns the *mean* NLL per token (nats). The
runner adds the DiffQ penalty ``lambda * size_MiB`` to that mean. The paper's fairseq recipe adds the
penalty to a *summed* loss (before fairseq divides gradients by the token count), so a given lambda
weighs the size term differently here than in the paper: lambda values are not directly comparable.

Data checks (:meth:`LanguageModelingTask.setup`): a split file that is empty, holds blank lines
only or is not UTF-8 is a :class:`~diffq_bench.data.errors.DataCorruptError` naming the file; so is a
train split shorter than one training block (``tokens_per_sample`` tokens) and a valid or test split
shorter than one evaluation block (``eval_tokens_per_sample`` tokens): a metric over less than that is
not the benchmark's.

Evaluation follows fairseq's ``eval_lm --context-window``: the split is cut into blocks of
``eval_tokens_per_sample`` tokens; each block is scored once, with up to ``context_window``
preceding tokens fed as (unscored) context. Perplexity = exp(mean NLL per token), ``<eos>`` tokens
included, as in the published WikiText numbers.
"""
from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

import torch
from torch import nn

from ..data.embedded import ensure_embedded_wikitext
from ..data.wikitext import EOS_ID, PAD_ID, LMCorpus, find_layout, load_corpus, require_tokens
from ..models.transformer_lm import TransformerLM, TransformerLMConfig
from .base import Task, field_default, typed_node

#: architecture fields the config may not set: they come from the dictionary
DERIVED = ("vocab_size", "padding_idx")


@dataclasses.dataclass(eq=False, kw_only=True)
class LanguageModelingTask(Task):
    """Causal LM on a WikiText-layout corpus with the adaptive-input transformer.

    Defaults are the paper's WikiText-103 recipe (``conf/task/wikitext103.yaml``).

    Args:
        tokens_per_sample: length of a training block (targets per sequence).
        batch_size: training blocks per batch.
        context_window: evaluation context carried before each scored block (0: none).
        eval_tokens_per_sample: tokens scored per evaluation forward.
        eval_batch_size: evaluation windows per forward.
        eval_subset: score only the first N evaluation windows of each split (0: all; debug runs).
        pad_to_multiple: dictionary size padded to a multiple of this (fairseq: 8).
        penalty_scale: 1/3072, the paper's λ: fairseq's DiffQ patch adds λ·size to the NLL summed
            over each 3072-token micro-batch and divides gradients by the token count.
        model: the architecture (:class:`~diffq_bench.models.transformer_lm.TransformerLMConfig`
            fields except ``vocab_size`` and ``padding_idx``, which come from the dictionary).
    """
    metric: tp.ClassVar[str] = "ppl"
    lower_is_better: tp.ClassVar[bool] = True

    tokens_per_sample: int = 3072
    batch_size: int = 24
    context_window: int = 2560
    eval_tokens_per_sample: int = 512
    eval_batch_size: int = 4
    eval_subset: int = 0
    pad_to_multiple: int = 8
    model: TransformerLMConfig = dataclasses.field(default_factory=TransformerLMConfig)
    penalty_scale: float = 1 / 3072

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("tokens_per_sample", "batch_size", "eval_tokens_per_sample", "eval_batch_size",
                    "pad_to_multiple"):
            self._int_field(key)
        self._int_field("context_window", 0)
        self._int_field("eval_subset", 0)
        self.model = typed_node(TransformerLMConfig, self.model, "task.model", DERIVED,
                                base=field_default(self, "model"))
        self.corpus: tp.Optional[LMCorpus] = None
        self._train_stream = torch.zeros(0, dtype=torch.long)
        self._stream_key: tp.Optional[tp.Tuple[int, int]] = None

    # ------------------------------------------------------------------------------ data
    def corpus_root(self) -> Path:
        """Folder holding the corpus files (subclasses locate or build it)."""
        return self.data_root

    def setup(self, data_root: tp.Union[str, Path], cache_dir: tp.Union[str, Path],
              device: tp.Union[str, torch.device], num_workers: int = 0, seed: int = 0) -> None:
        super().setup(data_root, cache_dir, device, num_workers, seed)
        root = self.corpus_root()
        self.corpus = load_corpus(root, self.cache_dir, self.pad_to_multiple)
        self.data_dir = find_layout(root)[1]["train"][0].parent
        # Too small to use is corrupt, never a silent number (an empty test set once gave PPL 1.0):
        # train needs one training block, valid and test one full evaluation block each.
        require_tokens(self.corpus, "train", self.tokens_per_sample,
                       f"one training block (task.tokens_per_sample={self.tokens_per_sample})")
        for split in ("valid", "test"):
            require_tokens(self.corpus, split, self.eval_tokens_per_sample, "one evaluation block "
                           f"(task.eval_tokens_per_sample={self.eval_tokens_per_sample})")

    def _require_corpus(self) -> LMCorpus:
        if self.corpus is None:
            raise RuntimeError(f"task {self.name!r}: call setup() before using the data")
        return self.corpus

    def model_config(self) -> TransformerLMConfig:
        """The model's hyper-parameters, vocabulary size from the dictionary."""
        vocab = len(self._require_corpus().dictionary)
        return dataclasses.replace(self.model, vocab_size=vocab, padding_idx=PAD_ID)

    def build_model(self) -> nn.Module:
        return TransformerLM(self.model_config())

    def check_model(self) -> None:
        """The model on the meta device, a dictionary one word past the last band standing in for
        the corpus's."""
        vocab = max([int(c) for c in self.model.cutoffs] + [PAD_ID]) + 1
        with torch.device("meta"):
            TransformerLM(dataclasses.replace(self.model, vocab_size=vocab, padding_idx=PAD_ID))

    def num_train_batches(self) -> int:
        """Batches per full training epoch."""
        blocks = len(self._require_corpus().splits["train"]) // self.tokens_per_sample
        return math.ceil(blocks / self.batch_size)

    def train_batches(self, epoch: int) -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) int64 pairs of shape (batch, tokens_per_sample), on the CPU."""
        ids = self._require_corpus().splits["train"]
        length = self.tokens_per_sample
        n_blocks = len(ids) // length
        if n_blocks == 0:
            raise ValueError(f"train split has {len(ids)} tokens, fewer than "
                             f"task.tokens_per_sample={length}")
        key = (id(ids), n_blocks * length)
        if self._stream_key != key:
            # int64 copy of the whole split (~0.8 GB for WikiText-103) built once, not per epoch.
            self._train_stream = torch.cat([torch.tensor([EOS_ID], dtype=ids.dtype),
                                            ids[:n_blocks * length]]).long()
            self._stream_key = key
        stream = self._train_stream
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        order = torch.randperm(n_blocks, generator=gen)
        offsets = torch.arange(length)
        for start in range(0, n_blocks, self.batch_size):
            index = (order[start:start + self.batch_size] * length)[:, None] + offsets
            yield stream[index], stream[index + 1]

    # ------------------------------------------------------------------------- training
    def step(self, model: nn.Module, batch: tp.Tuple[torch.Tensor, torch.Tensor]
             ) -> tp.Tuple[torch.Tensor, tp.Dict[str, float]]:
        """Mean NLL per token (nats) as the loss; metrics ``nll`` and ``ppl`` of the batch."""
        inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
        loss = model(inputs, targets).mean()
        value = float(loss.detach())
        return loss, {"nll": value, "ppl": math.exp(min(value, 50.0))}

    # ------------------------------------------------------------------------ evaluation
    def windows(self, split: str) -> tp.List[tp.Tuple[int, int, int]]:
        """(context start, first scored, end) token indices of each evaluation window."""
        n = len(self._require_corpus().splits[split])
        block = self.eval_tokens_per_sample
        windows = [(max(0, s - self.context_window), s, min(s + block, n)) for s in range(0, n, block)]
        return windows[:self.eval_subset] if self.eval_subset else windows

    @torch.no_grad()
    def evaluate_parts(self, model: nn.Module, split: str) -> tp.Dict[str, tp.List[float]]:
        """Per-batch summed NLL (float64) and scored tokens of this process's shard of ``split``."""
        corpus = self._require_corpus()
        if split not in corpus.splits:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(corpus.splits)}")
        ids = corpus.splits[split].long()
        stream = torch.cat([torch.tensor([EOS_ID]), ids])  # stream[i] is the token before ids[i]
        windows = self.windows(split)
        was_training = model.training
        model.eval()
        parts: tp.Dict[str, tp.List[float]] = {"nll": [], "tokens": []}
        try:
            for index, first in enumerate(range(0, len(windows), self.eval_batch_size)):
                if not self.shard_owns(index):
                    continue
                group = windows[first:first + self.eval_batch_size]
                width = max(end - ctx for ctx, _, end in group)
                inputs = torch.full((len(group), width), PAD_ID, dtype=torch.long)
                targets = torch.full((len(group), width), PAD_ID, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.bool)
                for row, (ctx, start, end) in enumerate(group):
                    inputs[row, :end - ctx] = stream[ctx:end]
                    targets[row, :end - ctx] = ids[ctx:end]
                    mask[row, start - ctx:end - ctx] = True
                nll = model(inputs.to(self.device), targets.to(self.device))
                parts["nll"].append(float(nll.double()[mask.to(self.device)].sum()))
                parts["tokens"].append(float(mask.sum()))
        finally:
            model.train(was_training)
        return parts

    def combine_parts(self, parts: tp.Mapping[str, tp.Sequence[float]]) -> tp.Dict[str, float]:
        """``ppl`` (exp of mean NLL per token), ``nll`` and scored ``tokens`` over all shards."""
        count = math.fsum(parts["tokens"])
        mean = math.fsum(parts["nll"]) / max(count, 1)
        # exp overflows past ~709 nats: a diverged model's perplexity is inf (the loop then fails it)
        return {"nll": mean, "ppl": math.exp(mean) if mean < 709 else math.inf, "tokens": count}


@dataclasses.dataclass(eq=False, kw_only=True)
class WikiText103Task(LanguageModelingTask):
    """WikiText-103 from ``data_root`` (official ``wiki.*.tokens`` or the HF parquet layout)."""
    name: tp.ClassVar[str] = "wikitext103"


#: The embedded default model: small enough for a whole DiffQ run in ~1 min on 2 CPU cores.
MINI_MODEL: tp.Dict[str, tp.Any] = dict(
    d_model=128, ffn_dim=512, n_heads=4, n_layers=2, dropout=0.1, attention_dropout=0.0,
    activation_dropout=0.0, adaptive_softmax_dropout=0.0, layerdrop=0.0, cutoffs=[2000, 6000],
    adaptive_factor=4.0, tie_adaptive_weights=True, tie_adaptive_proj=True, final_norm=False)


@dataclasses.dataclass(eq=False, kw_only=True)
class WikiTextMiniTask(LanguageModelingTask):
    """The embedded default: a real Wikipedia excerpt written in WikiText format (see
    :mod:`diffq_bench.data.embedded`) under ``data_root/wikitext_mini``.

    Args:
        min_count: train count below which a word becomes ``<unk>``.
        max_vocab: cap on the kept words (None: no cap).
        source: ``auto`` (gensim's excerpt, else CPython's pydoc topics), ``gensim`` or ``pydoc``.
        others: as :class:`LanguageModelingTask`, with defaults sized for a 2-core CPU run and
            the small model :data:`MINI_MODEL`.
    """
    name: tp.ClassVar[str] = "wikitext_mini"

    min_count: int = 3
    max_vocab: tp.Optional[int] = None
    source: str = "auto"
    tokens_per_sample: int = 64
    batch_size: int = 16
    context_window: int = 32
    eval_tokens_per_sample: int = 96
    eval_batch_size: int = 32
    model: TransformerLMConfig = dataclasses.field(
        default_factory=lambda: TransformerLMConfig(**MINI_MODEL))
    penalty_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_field("min_count")
        if self.max_vocab is not None:
            self._int_field("max_vocab")
        if self.source not in ("auto", "gensim", "pydoc"):
            raise ValueError(f"task.source must be auto, gensim or pydoc, got {self.source!r}")

    def corpus_root(self) -> Path:
        return ensure_embedded_wikitext(self.data_root / self.name, min_count=self.min_count,
                                        max_vocab=self.max_vocab, source=self.source)
