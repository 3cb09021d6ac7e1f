#!/usr/bin/env python3
"""Put an already-downloaded WikiText-103 where `task=wikitext103` reads it, and tokenize it once.

Nothing is downloaded. SOURCE is one of:
  - the official archive wikitext-103-v1.zip (holds wikitext-103/wiki.{train,valid,test}.tokens);
  - a folder with wiki.{train,valid,test}.tokens;
  - a folder with the Hugging Face parquet shards (train-*.parquet, validation-*.parquet,
    test-*.parquet, column `text`), e.g. a local copy of the hub's wikitext-103-v1 folder.
Files go to DATA/wikitext-103/ (text) or DATA/wikitext-103-v1/ (parquet), written atomically; the
dictionary and token tensors are then cached under CACHE/wikitext/ and the counts compared with the
published ones (one <eos> per line).

    python scripts/prepare_wikitext103.py SOURCE [--data data] [--cache .cache]
"""
import argparse
import os
import sys
import zipfile
from pathlib import Path

from diffq_bench.data.wikitext import SPLITS, TOKEN_FILES, find_layout, load_corpus
from diffq_bench.io import copy_file

# Published WikiText-103 statistics (Merity et al., 2016), counting one end-of-line token per line.
PUBLISHED_TOKENS = {"train": 103_227_021, "valid": 217_646, "test": 245_569}
PUBLISHED_DICT = 267_744  # 267,735 words + specials, padded to a multiple of 8 (fairseq)


def install(source: Path, data: Path) -> Path:
    if source.is_file() and zipfile.is_zipfile(source):
        dest = data / "wikitext-103"
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(source) as archive:
            names = {Path(n).name: n for n in archive.namelist()}
            missing = [TOKEN_FILES[s] for s in SPLITS if TOKEN_FILES[s] not in names]
            if missing:
                sys.exit(f"{source} lacks {missing}: not the WikiText-103 (tokens) archive")
            for split in SPLITS:
                copy_file(archive.open(names[TOKEN_FILES[split]]), dest / TOKEN_FILES[split])
        return dest
    kind, files = find_layout(source)  # clear error naming the expected layout
    dest = data / ("wikitext-103" if kind == "tokens" else "wikitext-103-v1")
    dest.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for path in files[split]:
            if path.resolve() != (dest / path.name).resolve():
                copy_file(path, dest / path.name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="wikitext-103-v1.zip or a folder (see above)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DIFFQ_BENCH_DATA", "data")))
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("DIFFQ_BENCH_CACHE", ".cache")))
    args = parser.parse_args()
    dest = install(args.source, args.data)
    print(f"installed into {dest}; tokenizing (once, then cached under {args.cache}/wikitext)")
    corpus = load_corpus(args.data, args.cache)
    ok = len(corpus.dictionary) == PUBLISHED_DICT
    print(f"dictionary: {len(corpus.dictionary):,} entries (published setup: {PUBLISHED_DICT:,})")
    for split in SPLITS:
        n = len(corpus.splits[split])
        ok &= n == PUBLISHED_TOKENS[split]
        print(f"{split}: {n:,} tokens (published: {PUBLISHED_TOKENS[split]:,})")
    if not ok:
        print("warning: counts differ from the published WikiText-103 (raw variant or altered files?)")


if __name__ == "__main__":
    main()
