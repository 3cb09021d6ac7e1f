"""WikiText loader: layouts, dictionary, <eos> per line, cache, clear errors."""
import logging
import os

import pytest
import torch

from diffq_bench import io
from diffq_bench.data import wikitext
from diffq_bench.data.errors import DataCorruptError, DataMissingError
from diffq_bench.data.wikitext import EOS_ID, UNK_ID, Dictionary, find_layout, load_corpus

TRAIN = [" \n", " = Title = \n", " \n", " the cat sat on the mat . \n", " the dog @-@ like cat . \n"]
VALID = [" \n", " the zebra sat . \n"]
TEST = [" the cat . \n"]


def write_tokens(folder, train=TRAIN, valid=VALID, test=TEST):
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{split}.tokens").write_text("".join(lines), encoding="utf-8")
    return folder


def test_missing_files_error_names_layout(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" a \n")
    with pytest.raises(DataMissingError) as err:
        find_layout(tmp_path)
    msg = str(err.value)
    assert "wiki.valid.tokens" in msg and "validation-*.parquet" in msg and str(tmp_path) in msg


def test_tokens_layout_found_in_subfolder(tmp_path):
    write_tokens(tmp_path / "wikitext-103")
    kind, files = find_layout(tmp_path)
    assert kind == "tokens" and files["test"][0].name == "wiki.test.tokens"


def test_dictionary_order_padding_and_eos_per_line(tmp_path):
    corpus = load_corpus(write_tokens(tmp_path / "d"), tmp_path / "cache", pad_to_multiple=8)
    d = corpus.dictionary
    assert d.symbols[:3] == ["<pad>", "<eos>", "<unk>"]
    assert len(d) % 8 == 0 and d.symbols[-1].startswith("madeupword")
    # One <eos> per line, blank lines included: train has 5 lines and 16 words.
    train = corpus.splits["train"]
    assert int((train == EOS_ID).sum()) == 5 and len(train) == 5 + 16
    assert d.symbols[3] in ("the", "cat")  # the most frequent words come first (the: 3, cat: 2)
    assert d.counts[d.index("the")] == 3 and d.index("the") < d.index("cat") < d.index("dog")
    assert d.decode(corpus.splits["test"].tolist()) == "the cat . <eos>"
    # Words never seen in train map to <unk>.
    assert corpus.splits["valid"].tolist()[2] == UNK_ID
    assert train.dtype == torch.int32


def test_cache_reused_and_invalidated_on_change(tmp_path, monkeypatch):
    root = write_tokens(tmp_path / "d")
    load_corpus(root, tmp_path / "cache")
    calls = []
    original = wikitext.build_corpus
    monkeypatch.setattr(wikitext, "build_corpus", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = load_corpus(root, tmp_path / "cache")
    assert calls == [] and len(again.splits["train"]) == 21
    path = root / "wiki.test.tokens"
    path.write_text(" the cat sat . \n")
    os.utime(path, ns=(1, 1))  # a different mtime: the key changes even within one clock tick
    changed = load_corpus(root, tmp_path / "cache")
    assert calls == [1] and len(changed.splits["test"]) == 5
    assert not list((tmp_path / "cache" / "wikitext").glob(".*tmp"))


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = write_tokens(tmp_path / "d")
    load_corpus(root, tmp_path / "cache")
    for f in (tmp_path / "cache" / "wikitext").glob("*.pt"):
        f.write_bytes(b"garbage")
    assert len(load_corpus(root, tmp_path / "cache").splits["train"]) == 21


@pytest.mark.slow
def test_parquet_layout_matches_tokens(tmp_path):
    pa = pytest.importorskip("pyarrow")  # installed with datasets, a hard dependency
    import pyarrow.parquet as pq
    folder = tmp_path / "p" / "wikitext-103-v1"
    folder.mkdir(parents=True)
    # Hugging Face rows: one per line, blank lines as "", trailing newline kept.
    for name, lines in (("train-00000-of-00001", TRAIN), ("validation-00000-of-00001", VALID),
                        ("test-00000-of-00001", TEST)):
        rows = ["" if not line.strip() else line.lstrip(" ") for line in lines]
        pq.write_table(pa.table({"text": rows}), folder / f"{name}.parquet")
    parquet = load_corpus(tmp_path / "p", tmp_path / "cache")
    tokens = load_corpus(write_tokens(tmp_path / "t"), tmp_path / "cache")
    assert parquet.source == "parquet"
    assert parquet.dictionary.symbols == tokens.dictionary.symbols
    for split in ("train", "valid", "test"):
        assert torch.equal(parquet.splits[split], tokens.splits[split])


def test_dictionary_rejects_bad_specials():
    with pytest.raises(ValueError, match="must start with"):
        Dictionary(["a", "<eos>", "<unk>"], [1, 1, 1])


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("content", ["", " \n \n\n"], ids=["empty", "blank-lines"])
def test_empty_split_is_corrupt_naming_the_file(tmp_path, split, content):
    root = write_tokens(tmp_path / "d")
    (root / f"wiki.{split}.tokens").write_text(content)
    with pytest.raises(DataCorruptError, match=rf"wiki\.{split}\.tokens holds no word"):
        load_corpus(root, tmp_path / "cache")


@pytest.mark.parametrize("encoding,hint", [("latin-1", "invalid continuation byte"),
                                           ("utf-16", "UTF-16 byte-order mark")])
def test_non_utf8_tokens_file_is_corrupt_with_offset(tmp_path, encoding, hint):
    root = write_tokens(tmp_path / "d")
    data = " \n the caf\u00e9 sat . \n".encode(encoding)
    (root / "wiki.valid.tokens").write_bytes(data)
    with pytest.raises(DataCorruptError) as err:
        load_corpus(root, tmp_path / "cache")
    msg = str(err.value)
    assert str(root / "wiki.valid.tokens") in msg and hint in msg and "UTF-8" in msg
    offset = data.index(b"\xe9") if encoding == "latin-1" else 0  # UTF-16: its first byte, 0xff
    assert f"invalid byte at offset {offset} " in msg


def test_first_bad_utf8_across_block_boundaries(tmp_path):
    path = tmp_path / "f"
    good = "a\u00e9\u20ac\U0001f600b".encode()  # 1-, 2-, 3- and 4-byte sequences
    for block in (1, 2, 3, 5):
        path.write_bytes(good * 3)
        assert wikitext.first_bad_utf8(path, block=block) == (-1, "")
        path.write_bytes(good * 2 + b"\xff" + good)
        assert wikitext.first_bad_utf8(path, block=block)[0] == 2 * len(good)
        path.write_bytes(good + good[:2])  # a truncated 2-byte sequence at the end
        assert wikitext.first_bad_utf8(path, block=block) == (len(good) + 1, "unexpected end of data")


def _cache_file(tmp_path):
    (path,) = (tmp_path / "cache" / "wikitext").glob("*.pt")
    return path


@pytest.mark.parametrize("damage", [
    lambda s: s.update(train=s["train"] + 1000),            # ids past the dictionary: IndexError in the model
    lambda s: s.update(valid=s["valid"].long()),            # wrong dtype
    lambda s: s.update(test=s["test"][None]),                # wrong shape
    lambda s: s.update(test=s["test"][:0]),                  # empty split
    lambda s: s.update(symbols=s["symbols"][:-1]),            # counts and symbols disagree
    lambda s: s.update(key="0" * 20),                        # built from other files
    lambda s: s.pop("valid"),
], ids=["ids-out-of-range", "dtype", "shape", "empty", "dictionary", "key", "missing-split"])
def test_inconsistent_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    root = write_tokens(tmp_path / "d")
    good = load_corpus(root, tmp_path / "cache")
    path = _cache_file(tmp_path)
    state = io.load_torch(path, what="token cache")
    damage(state)
    io.save_torch(path, state)
    with caplog.at_level(logging.WARNING, logger="diffq_bench.data.wikitext"):
        again = load_corpus(root, tmp_path / "cache")
    assert "invalid" in caplog.text and "rebuilding" in caplog.text and str(path) in caplog.text
    for split in ("train", "valid", "test"):
        assert torch.equal(again.splits[split], good.splits[split])
    assert io.load_torch(path, what="token cache")["key"] == path.stem  # the rebuilt cache is valid
