"""WikiText-103 (and any corpus in its layout): find the files, build the dictionary, cache tokens.

Two on-disk layouts are read from ``root`` (or from ``root/wikitext-103`` /
``root/wikitext-103-v1``, the names of the official archive and of the Hugging Face folder):

- official text files: ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``;
- Hugging Face parquet shards: ``train-*.parquet``, ``validation-*.parquet``, ``test-*.parquet``,
  one ``text`` column, one row per line of the original files.

Tokenization is WikiText's own: the text is already tokenized, so a line is split on whitespace and
one ``<eos>`` is appended per line (blank lines included), which reproduces the published token
counts. The dictionary holds ``<pad>``, ``<eos>``, ``<unk>`` then every train word by decreasing
count (ties: first occurrence), padded to a multiple of ``pad_to_multiple`` with never-seen
``madeupwordNNNN`` entries, as fairseq does (267,744 entries for WikiText-103).

Dictionary and token tensors are cached once under ``cache_dir/wikitext/<key>.pt`` (atomic write),
keyed by the files' paths, sizes and mtimes, so a ~540 MB train file is tokenized once. Encoding
streams chunks of lines and maps words with C-level ``map`` over a dict, never a Python loop per
token. The cache is derived state: one that does not validate on load (another key, version or
layout, ids outside the dictionary, a split that is not a 1-D integer tensor) is rebuilt with a
logged warning, never handed to the model.

Bad source data is a :class:`~diffq_bench.data.errors.DataCorruptError` naming the file: a text
file that is not UTF-8 (the message gives the byte offset of the first bad byte), and a split with
no word at all (an empty file, or blank lines only). How many tokens a split needs beyond that
depends on the task's block sizes: :func:`require_tokens` is the check the LM task applies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch

from .. import io
from .errors import DataCorruptError, DataMissingError

logger = logging.getLogger(__name__)


PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPLITS = ("train", "valid", "test")
TOKEN_FILES = {split: f"wiki.{split}.tokens" for split in SPLITS}
PARQUET_PREFIX = {"train": "train", "valid": "validation", "test": "test"}
SUBDIRS = ("", "wikitext-103", "wikitext-103-v1")
CACHE_VERSION = 2  # 2: the cache records its key and the split files
CHUNK_LINES = 50_000

LAYOUT_HELP = (
    "expected either the official files wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens or "
    "the Hugging Face parquet shards train-*.parquet, validation-*.parquet, test-*.parquet (column "
    "'text'), directly in {root} or in its subfolder wikitext-103/ or wikitext-103-v1/ "
    "(see scripts/prepare_wikitext103.py and docs/data.md)")


class Dictionary:
    """Word <-> id mapping with fairseq-like specials and padding.

    Args:
        symbols: every entry in id order; the first three must be ``<pad>``, ``<eos>``, ``<unk>``.
        counts: train count of each entry (same length as ``symbols``).
    """

    def __init__(self, symbols: tp.Sequence[str], counts: tp.Sequence[int]):
        if tuple(symbols[:3]) != SPECIALS:
            raise ValueError(f"dictionary must start with {SPECIALS}, got {tuple(symbols[:3])}")
        if len(symbols) != len(counts):
            raise ValueError(f"{len(symbols)} symbols but {len(counts)} counts")
        self.symbols = list(symbols)
        self.counts = [int(c) for c in counts]
        self.indices = {word: i for i, word in enumerate(self.symbols)}
        if len(self.indices) != len(self.symbols):
            raise ValueError("dictionary has duplicate symbols")

    def __len__(self) -> int:
        return len(self.symbols)

    def index(self, word: str) -> int:
        """Id of ``word`` (``<unk>``'s id when unknown)."""
        return self.indices.get(word, UNK_ID)

    def decode(self, ids: tp.Iterable[int]) -> str:
        """Space-joined words of ``ids`` (for inspection and tests)."""
        return " ".join(self.symbols[int(i)] for i in ids)


class _Growing(dict):
    """word -> id, assigning the next id to unseen words (train pass)."""

    def __missing__(self, word: str) -> int:
        idx = len(self)
        self[word] = idx
        return idx


class _Fixed(dict):
    """word -> id, ``<unk>`` for unseen words (valid/test pass)."""

    def __missing__(self, word: str) -> int:
        return UNK_ID


@dataclasses.dataclass
class LMCorpus:
    """A tokenized corpus: its dictionary and, per split, the int32 ids (``<eos>`` after each line)."""
    dictionary: Dictionary
    splits: tp.Dict[str, torch.Tensor]
    source: str = ""
    files: tp.Dict[str, tp.List[Path]] = dataclasses.field(default_factory=dict)

    def describe(self, split: str) -> str:
        """The file(s) ``split`` was read from, for messages (the split name when unknown)."""
        paths = self.files.get(split)
        if not paths:
            return f"the {split} split"
        return str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"


def find_layout(root: tp.Union[str, Path]) -> tp.Tuple[str, tp.Dict[str, tp.List[Path]]]:
    """Locate the corpus files under ``root``.

    Returns:
        (``"tokens"`` or ``"parquet"``, {split: [files]}).
    Raises:
        DataMissingError: neither layout is complete; the message lists what was expected.
    """
    root = Path(root)
    for sub in SUBDIRS:
        folder = root / sub if sub else root
        files = {s: folder / TOKEN_FILES[s] for s in SPLITS}
        if all(p.is_file() for p in files.values()):
            return "tokens", {s: [p] for s, p in files.items()}
        shards = {s: sorted(folder.glob(f"{PARQUET_PREFIX[s]}-*.parquet")) for s in SPLITS}
        if all(shards.values()):
            return "parquet", shards
    found = sorted(p.name for sub in SUBDIRS for p in ((root / sub) if sub else root).glob("*")
                   if p.is_file())[:10] if root.is_dir() else []
    raise DataMissingError(f"WikiText data not found under {root} (found: {found or 'nothing'}); "
                           + LAYOUT_HELP.format(root=root))


def iter_line_chunks(kind: str, files: tp.Sequence[Path], cache_dir: tp.Optional[Path] = None,
                     chunk_lines: int = CHUNK_LINES) -> tp.Iterator[tp.List[str]]:
    """Stream the lines of one split (without trailing newline) in chunks of ``chunk_lines``."""
    if kind == "tokens":
        for path in files:
            try:
                with open(path, "r", encoding="utf-8") as fh:
                    chunk: tp.List[str] = []
                    for line in fh:
                        chunk.append(line)
                        if len(chunk) >= chunk_lines:
                            yield chunk
                            chunk = []
                    if chunk:
                        yield chunk
            except UnicodeDecodeError:
                raise DataCorruptError(_not_utf8(path)) from None
    elif kind == "parquet":
        # Local files never need the Hub; offline mode must be set before datasets is imported.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets
        kwargs = {"cache_dir": str(cache_dir / "hf")} if cache_dir is not None else {}
        ds = datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train",
                                   **kwargs)
        if "text" not in ds.column_names:
            raise DataMissingError(f"parquet files {[p.name for p in files]} have columns "
                                   f"{ds.column_names}, expected a 'text' column")
        for batch in ds.iter(batch_size=chunk_lines):
            yield batch["text"]
    else:
        raise ValueError(f"unknown layout {kind!r}; valid: tokens, parquet")


def first_bad_utf8(path: tp.Union[str, Path], block: int = 1 << 20) -> tp.Tuple[int, str]:
    """(byte offset, reason) of the first byte of ``path`` that is not UTF-8; ``(-1, "")`` if none."""
    base, carry = 0, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(block)
            data = carry + chunk
            try:
                data.decode("utf-8")
                base, carry = base + len(data), b""
            except UnicodeDecodeError as exc:
                # A multi-byte sequence cut by the block boundary is not an error: carry it over.
                if chunk and exc.reason == "unexpected end of data" and len(data) - exc.start < 4:
                    base, carry = base + exc.start, data[exc.start:]
                else:
                    return base + exc.start, exc.reason
            if not chunk:
                return -1, ""


def _not_utf8(path: Path) -> str:
    offset, reason = first_bad_utf8(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    utf16 = " (it starts with a UTF-16 byte-order mark)" if head in (b"\xff\xfe", b"\xfe\xff") else ""
    return (f"{path} is not UTF-8 text: invalid byte at offset {offset} ({reason}){utf16}; WikiText "
            "files are UTF-8: re-extract the official archive, or convert the file (e.g. "
            "iconv -f <its encoding> -t UTF-8)")


def _chunk_words(lines: tp.Sequence[str]) -> tp.List[str]:
    # One join + split per chunk: the per-line <eos> is inserted as a word of the joined text.
    return (f" {EOS} ".join(lines) + f" {EOS}").split()


def _encode(chunks: tp.Iterable[tp.List[str]], vocab: dict) -> np.ndarray:
    parts = []
    for lines in chunks:
        words = _chunk_words(lines)
        parts.append(np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_corpus(kind: str, files: tp.Dict[str, tp.List[Path]], pad_to_multiple: int = 8,
                 cache_dir: tp.Optional[Path] = None) -> LMCorpus:
    """Tokenize the three splits and build the dictionary from the train split (no caching).

    Args:
        kind: layout returned by :func:`find_layout`.
        files: {split: files} returned by :func:`find_layout`.
        pad_to_multiple: pad the dictionary size to a multiple of this (1: no padding).
        cache_dir: where ``datasets`` may keep its arrow cache (parquet layout only).
    Raises:
        DataCorruptError: a text file is not UTF-8, or a split holds no word.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    growing = _Growing({w: i for i, w in enumerate(SPECIALS)})
    first = _encode(iter_line_chunks(kind, files["train"], cache_dir), growing)
    words = list(growing)  # insertion order == provisional id
    counts = np.bincount(first, minlength=len(words))
    # Final ids: specials first, then words by decreasing count (stable: ties keep first occurrence).
    order = 3 + np.argsort(-counts[3:], kind="stable")
    remap = np.empty(len(words), dtype=np.int64)
    remap[:3] = np.arange(3)
    remap[order] = np.arange(3, len(words))
    symbols = list(SPECIALS) + [words[i] for i in order]
    sym_counts = counts[:3].tolist() + counts[order].tolist()
    extra = (-len(symbols)) % pad_to_multiple
    symbols += [f"madeupword{i:04d}" for i in range(extra)]
    sym_counts += [0] * extra
    dictionary = Dictionary(symbols, sym_counts)
    splits = {"train": torch.from_numpy(remap[first].astype(np.int32))}
    fixed = _Fixed(dictionary.indices)
    for split in ("valid", "test"):
        ids = _encode(iter_line_chunks(kind, files[split], cache_dir), fixed)
        splits[split] = torch.from_numpy(ids.astype(np.int32))
    corpus = LMCorpus(dictionary, splits, source=kind, files=dict(files))
    for split in SPLITS:
        if not int((splits[split] != EOS_ID).sum()):
            raise DataCorruptError(f"{corpus.describe(split)} holds no word ({len(splits[split])} "
                                   "line(s), all blank): the file is empty or truncated; re-extract the "
                                   "official archive (see docs/data.md)")
    return corpus


def cache_key(files: tp.Dict[str, tp.List[Path]], pad_to_multiple: int) -> str:
    """Hash of the files' resolved paths, sizes and mtimes (and the dictionary options)."""
    desc = {"version": CACHE_VERSION, "pad_to_multiple": pad_to_multiple, "files": {}}
    for split in SPLITS:
        desc["files"][split] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                                for p in files[split]]
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def require_tokens(corpus: LMCorpus, split: str, minimum: int, why: str) -> None:
    """Fail unless ``split`` holds at least ``minimum`` tokens (``<eos>`` included).

    Args:
        corpus: the loaded corpus.
        split: ``train``, ``valid`` or ``test``.
        minimum: the fewest tokens the caller can use.
        why: what needs them, for the message (``one training block (task.tokens_per_sample)``).
    Raises:
        DataCorruptError: naming the file, its token count and the need.
    """
    count = len(corpus.splits[split])
    if count < minimum:
        raise DataCorruptError(f"{corpus.describe(split)} has {count} tokens, fewer than the {minimum} "
                               f"of {why}: the file is truncated or not the data set's {split} split "
                               "(re-extract it, see docs/data.md)")


def _from_cache(state: tp.Any, key: str, kind: str, files: tp.Dict[str, tp.List[Path]]) -> LMCorpus:
    """The corpus held by a loaded cache file, or ValueError saying why it does not validate."""
    if not isinstance(state, dict) or state.get("version") != CACHE_VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"format version {version}, expected {CACHE_VERSION}")
    if state.get("key") != key or state.get("source") != kind:
        raise ValueError(f"built from other files (key {state.get('key')}, layout {state.get('source')})")
    dictionary = Dictionary(state["symbols"], state["counts"].tolist())
    splits = {}
    for split in SPLITS:
        ids = state.get(split)
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int32 or ids.dim() != 1 or not len(ids):
            raise ValueError(f"split {split} is not a non-empty 1-D int32 tensor")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= len(dictionary):
            raise ValueError(f"split {split} has ids in [{low}, {high}], outside the dictionary "
                             f"of {len(dictionary)} entries")
        splits[split] = ids
    return LMCorpus(dictionary, splits, source=kind, files=dict(files))


def load_corpus(root: tp.Union[str, Path], cache_dir: tp.Union[str, Path],
                pad_to_multiple: int = 8) -> LMCorpus:
    """The tokenized corpus under ``root``, from the cache when it is current and valid.

    A cache file that does not load or validate (:func:`_from_cache`) is rebuilt, with a warning.

    Args:
        root: data folder (see :func:`find_layout` for the accepted layouts).
        cache_dir: folder for the cache file ``wikitext/<key>.pt``.
        pad_to_multiple: dictionary size padding (fairseq uses 8).
    Raises:
        DataMissingError: the files are missing (the message gives the expected layout).
        DataCorruptError: a file is not UTF-8 or a split holds no word (the message names it).
    """
    kind, files = find_layout(root)
    cache_dir = Path(cache_dir)
    key = cache_key(files, pad_to_multiple)
    path = cache_dir / "wikitext" / f"{key}.pt"
    if path.is_file():
        try:
            return _from_cache(io.load_torch(path, what="token cache"), key, kind, files)
        except Exception as exc:  # noqa: BLE001 - derived state: an invalid cache is rebuilt, never trusted
            logger.warning("token cache %s is invalid (%s); rebuilding it", path, str(exc).splitlines()[0][:200])
    corpus = build_corpus(kind, files, pad_to_multiple, cache_dir)
    io.save_torch(path, {"version": CACHE_VERSION, "key": key, "source": kind,
                         "symbols": corpus.dictionary.symbols,
                         "counts": torch.tensor(corpus.dictionary.counts, dtype=torch.long),
                         **corpus.splits})
    return corpus
