"""The embedded text corpus: real English shipped with installed packages, in WikiText's format.

Source, in order of preference (nothing is downloaded):

1. the Wikipedia dump excerpt in gensim's test data (106 articles, ~480k words; text CC BY-SA,
   see docs/data.md), read with ``gensim.corpora.wikicorpus.extract_pages`` + ``filter_wiki``;
2. CPython's ``pydoc_data.topics`` (the help topics of the Python documentation), always present.

Articles are converted to WikiText-103's conventions — `` = Title = `` and `` = = Section = = ``
headings surrounded by blank lines, one paragraph per line, blank lines as a single space,
punctuation split off, ``@-@`` / ``@,@`` / ``@.@`` for hyphens, thousands separators and decimal
points inside words and numbers — then split by article into train/valid/test (deterministic:
articles ordered by a hash of their title), and words seen fewer than ``min_count`` times in train
(or beyond ``max_vocab``) become ``<unk>``. The three ``wiki.*.tokens`` files are written once,
atomically, into the data folder with a ``SOURCE.json`` manifest; the task reads them back with
the WikiText-103 loader (:mod:`diffq_bench.data.wikitext`).
"""
from __future__ import annotations

import bz2
import collections
import hashlib
import json
import logging
import re
import typing as tp
from pathlib import Path

from .. import io
from .wikitext import SPLITS, TOKEN_FILES, UNK

GENSIM_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EMBEDDED_VERSION = 1
MANIFEST = "SOURCE.json"

Article = tp.Tuple[str, str]  # (title, plain text with "== heading ==" lines and paragraphs)

_TOKEN_RE = re.compile(
    r"@[-,.]@"                       # WikiText's protected in-word separators (inserted below)
    r"|[^\W_]+(?=n't\b)|n't\b"       # do|n't, ca|n't
    r"|'(?:s|re|ve|ll|d|m)\b"        # clitics split from their word
    r"|[^\W_]+"                      # words and numbers
    r"|\S")                          # any other character is a token of its own
_HEADING_RE = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_SKIP_SECTIONS = {"references", "external links", "see also", "notes", "bibliography",
                  "further reading", "sources", "footnotes", "citations"}


def tokenize(text: str) -> tp.List[str]:
    """WikiText-style tokens of a plain-text paragraph."""
    text = re.sub(r"(?<=[^\W_])-(?=[^\W_])", " @-@ ", text)
    text = re.sub(r"(?<=\d),(?=\d)", " @,@ ", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", " @.@ ", text)
    return _TOKEN_RE.findall(text)


def gensim_articles() -> tp.Optional[tp.List[Article]]:
    """The articles of gensim's Wikipedia excerpt, or None when gensim or the file is absent."""
    gensim_log = logging.getLogger("gensim")
    level = gensim_log.level
    gensim_log.setLevel(logging.WARNING)  # gensim.test.utils logs a toy dictionary it builds at import
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        return None
    finally:
        gensim_log.setLevel(level)
    path = Path(datapath(GENSIM_FILE))
    if not path.is_file():
        return None
    articles = []
    with bz2.open(path, "rb") as fh:
        for title, text, _ in extract_pages(fh):
            plain = filter_wiki(text)
            if plain.lstrip().upper().startswith("#REDIRECT"):
                continue
            articles.append((title, plain.replace("'''", "").replace("''", "")))
    return articles


def pydoc_articles() -> tp.List[Article]:
    """CPython's documentation help topics, one article per topic."""
    from pydoc_data.topics import topics
    return [(name, text) for name, text in sorted(topics.items())]


def _paragraph_ok(line: str) -> bool:
    # Lists, tables, templates and captions are not running text: WikiText keeps paragraphs.
    if not line or line[0] in "*#:;|{}!<":
        return False
    return len(line.split()) >= 5


def to_wikitext(title: str, text: str) -> tp.List[str]:
    """One article as WikiText lines (without newlines)."""
    lines = [" ", f" = {' '.join(tokenize(title))} = ", " "]
    pending_heading: tp.Optional[tp.List[str]] = None
    skipping = False
    for raw in text.splitlines():
        raw = raw.strip()
        match = _HEADING_RE.match(raw)
        if match:
            name = match.group(2).strip()
            skipping = name.lower() in _SKIP_SECTIONS
            level = len(match.group(1))
            marks = " ".join(["="] * level)
            # A heading is only written once a paragraph follows it (empty sections are dropped).
            pending_heading = [" ", f" {marks} {' '.join(tokenize(name))} {marks} ", " "]
            continue
        if skipping or not _paragraph_ok(raw):
            continue
        if pending_heading is not None:
            lines.extend(pending_heading)
            pending_heading = None
        lines.append(" " + " ".join(tokenize(raw)) + " ")
    return lines


def split_articles(articles: tp.Sequence[Article], valid_frac: float, test_frac: float
                   ) -> tp.Dict[str, tp.List[Article]]:
    """Deterministic article-level split: order by md5(title); test, then valid, take articles until
    they hold their fraction of the words; the rest is train."""
    if not (0 < valid_frac < 0.5 and 0 < test_frac < 0.5):
        raise ValueError(f"valid_frac and test_frac must be in (0, 0.5), got {valid_frac}, {test_frac}")
    order = sorted(articles, key=lambda a: hashlib.md5(a[0].encode("utf-8")).hexdigest())
    total = sum(len(text.split()) for _, text in order)
    out: tp.Dict[str, tp.List[Article]] = {"test": [], "valid": [], "train": []}
    budget = {"test": test_frac * total, "valid": valid_frac * total}
    filled = {"test": 0, "valid": 0}
    for article in order:
        for split in ("test", "valid"):
            if filled[split] < budget[split]:
                out[split].append(article)
                filled[split] += len(article[1].split())
                break
        else:
            out["train"].append(article)
    if not out["train"]:
        raise ValueError("corpus too small: no article left for train")
    return out


def build_splits(articles: tp.Sequence[Article], min_count: int, max_vocab: tp.Optional[int],
                 valid_frac: float, test_frac: float) -> tp.Dict[str, tp.List[str]]:
    """WikiText lines per split, rare words replaced by ``<unk>``."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_vocab is not None and max_vocab < 1:
        raise ValueError(f"max_vocab must be >= 1 or null, got {max_vocab}")
    by_split = split_articles(articles, valid_frac, test_frac)
    lines = {s: [line for a in by_split[s] for line in to_wikitext(*a)] for s in SPLITS}
    counts = collections.Counter(w for line in lines["train"] for w in line.split())
    ranked = [w for w, c in counts.most_common() if c >= min_count and w != UNK]
    keep = set(ranked[:max_vocab] if max_vocab is not None else ranked)
    # Heading marks and <unk> stay; every other word outside the vocabulary becomes <unk>.
    return {s: [" " + " ".join(w if w in keep or w == "=" else UNK for w in line.split()) + " "
                if line.strip() else " " for line in lines[s]] for s in SPLITS}


def ensure_embedded_wikitext(root: tp.Union[str, Path], min_count: int = 3,
                             max_vocab: tp.Optional[int] = None, valid_frac: float = 0.05,
                             test_frac: float = 0.05, source: str = "auto") -> Path:
    """Write the embedded corpus as ``wiki.{train,valid,test}.tokens`` into ``root`` (once).

    Files are rebuilt only when the manifest's options differ from the requested ones.

    Args:
        root: destination folder (created).
        min_count: train count below which a word becomes ``<unk>`` (WikiText-103 used 3).
        max_vocab: keep at most this many words (most frequent), None for no cap.
        valid_frac, test_frac: share of the words held out (by whole articles).
        source: ``auto`` (gensim, else pydoc), ``gensim`` or ``pydoc``.
    Returns:
        ``root``.
    """
    if source not in ("auto", "gensim", "pydoc"):
        raise ValueError(f"unknown embedded source {source!r}; valid: auto, gensim, pydoc")
    root = Path(root)
    options = {"version": EMBEDDED_VERSION, "min_count": min_count, "max_vocab": max_vocab,
               "valid_frac": valid_frac, "test_frac": test_frac, "source": source}
    manifest = root / MANIFEST
    if manifest.is_file() and all((root / TOKEN_FILES[s]).is_file() for s in SPLITS):
        try:
            if json.loads(manifest.read_text())["options"] == options:
                return root
        except (ValueError, KeyError):
            pass  # unreadable manifest: rebuild
    articles = gensim_articles() if source in ("auto", "gensim") else None
    used = "gensim-enwiki-excerpt"
    if articles is None:
        if source == "gensim":
            raise FileNotFoundError(f"gensim's test file {GENSIM_FILE} is not installed; "
                                    "use source=auto or pydoc")
        articles, used = pydoc_articles(), "cpython-pydoc-topics"
    splits = build_splits(articles, min_count, max_vocab, valid_frac, test_frac)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        io.write_text(root / TOKEN_FILES[split], "".join(line + "\n" for line in splits[split]))
    info = {"options": options, "source": used,
            "license": "CC BY-SA (Wikipedia text)" if used.startswith("gensim") else "PSF",
            "lines": {s: len(splits[s]) for s in SPLITS}}
    io.write_json(manifest, info)
    return root
