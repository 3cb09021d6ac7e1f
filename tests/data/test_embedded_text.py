"""Embedded corpus: WikiText-format conversion, deterministic split, written once, read back."""
import json

import pytest

from diffq_bench.data import embedded
from diffq_bench.data.embedded import ensure_embedded_wikitext, split_articles, to_wikitext, tokenize
from diffq_bench.data.wikitext import load_corpus


def test_tokenize_follows_wikitext_conventions():
    text = "He didn't see the self-governed city's 1,000 km (3.5 miles)."
    assert tokenize(text) == ["He", "did", "n't", "see", "the", "self", "@-@", "governed", "city",
                              "'s", "1", "@,@", "000", "km", "(", "3", "@.@", "5", "miles", ")", "."]


def test_article_layout_headings_paragraphs_and_dropped_sections():
    text = ("First paragraph has enough words here.\n\n== History ==\n"
            "Second paragraph, also long enough.\n* a list item is not prose\n"
            "== Empty ==\n== References ==\nCited works are not running text at all.\n")
    assert to_wikitext("My Title", text) == [
        " ", " = My Title = ", " ",
        " First paragraph has enough words here . ",
        " ", " = = History = = ", " ",
        " Second paragraph , also long enough . "]


def test_split_is_deterministic_disjoint_and_sized():
    articles = [(f"Article {i}", " ".join(["word"] * (100 + i))) for i in range(60)]
    a = split_articles(articles, 0.1, 0.1)
    b = split_articles(list(reversed(articles)), 0.1, 0.1)
    assert {k: [t for t, _ in v] for k, v in a.items()} == {k: [t for t, _ in v] for k, v in b.items()}
    titles = [t for v in a.values() for t, _ in v]
    assert sorted(titles) == sorted(t for t, _ in articles)
    words = {k: sum(len(x.split()) for _, x in v) for k, v in a.items()}
    total = sum(words.values())
    assert 0.1 * total <= words["test"] < 0.1 * total + 200
    with pytest.raises(ValueError, match="valid_frac"):
        split_articles(articles, 0.0, 0.1)


def test_pydoc_corpus_written_once_and_read_by_wikitext_loader(tmp_path):
    root = ensure_embedded_wikitext(tmp_path / "mini", min_count=2, source="pydoc")
    files = {s: root / f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    mtimes = {s: f.stat().st_mtime_ns for s, f in files.items()}
    manifest = json.loads((root / "SOURCE.json").read_text())
    assert manifest["source"] == "cpython-pydoc-topics"
    assert ensure_embedded_wikitext(tmp_path / "mini", min_count=2, source="pydoc") == root
    assert {s: f.stat().st_mtime_ns for s, f in files.items()} == mtimes  # not rewritten
    lines = files["train"].read_text(encoding="utf-8").split("\n")[:-1]
    assert all(line.startswith(" ") and line.endswith(" ") for line in lines)
    corpus = load_corpus(root, tmp_path / "cache")
    n_words = sum(len(line.split()) for line in lines)
    assert len(corpus.splits["train"]) == n_words + len(lines)  # one <eos> per line
    # Every train word kept in the files was seen >= min_count times (rarer ones are <unk>).
    d = corpus.dictionary
    assert all(c >= 2 for s, c in zip(d.symbols[3:], d.counts[3:]) if not s.startswith("madeup"))
    # Other options: files rebuilt.
    ensure_embedded_wikitext(tmp_path / "mini", min_count=5, source="pydoc")
    assert json.loads((root / "SOURCE.json").read_text())["options"]["min_count"] == 5


@pytest.mark.slow
def test_gensim_source_is_real_wikipedia(tmp_path):
    articles = embedded.gensim_articles()
    if articles is None:
        pytest.fail("gensim's Wikipedia excerpt should ship with the installed gensim")
    assert len(articles) == 106 and articles[0][0] == "Anarchism"
    root = ensure_embedded_wikitext(tmp_path / "wiki", max_vocab=500)
    head = (root / "wiki.valid.tokens").read_text(encoding="utf-8").split("\n")[:4]
    assert head[0] == " " and head[1].startswith(" = ") and head[1].endswith(" = ")
    corpus = load_corpus(root, tmp_path / "cache")
    assert len(corpus.dictionary) <= 3 + 500 + 8
    assert len(corpus.splits["train"]) > 400_000 and len(corpus.splits["test"]) > 15_000


def test_bad_options_raise(tmp_path):
    with pytest.raises(ValueError, match="source"):
        ensure_embedded_wikitext(tmp_path, source="web")
    with pytest.raises(ValueError, match="min_count"):
        ensure_embedded_wikitext(tmp_path, min_count=0, source="pydoc")
