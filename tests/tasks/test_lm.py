"""LM task contract: batches, loss, sliding-window evaluation, errors, and that it learns."""
import math

import pytest
import torch

from diffq_bench.data.errors import DataCorruptError, DataMissingError
from diffq_bench.data.wikitext import EOS_ID
from diffq_bench.tasks import TASKS, get_task
from diffq_bench.tasks.lm import LanguageModelingTask

TINY = dict(d_model=16, ffn_dim=32, n_heads=2, n_layers=1, cutoffs=[8, 16], dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, adaptive_softmax_dropout=0.0,
            layerdrop=0.0)
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang".split()


def write_corpus(root, n_lines=(60, 12, 10)):
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in zip(("train", "valid", "test"), n_lines):
        lines = []
        for _ in range(n):
            k = int(torch.randint(3, 12, (1,), generator=gen))
            start = int(torch.randint(0, len(WORDS), (1,), generator=gen))
            lines.append(" " + " ".join(WORDS[(start + j) % len(WORDS)] for j in range(k)) + " \n")
        (root / f"wiki.{split}.tokens").write_text("".join(lines))
    return root


@pytest.fixture
def task(tmp_path):
    write_corpus(tmp_path / "data" / "wikitext-103")
    t = get_task("wikitext103", tokens_per_sample=8, batch_size=4, context_window=5,
                 eval_tokens_per_sample=6, eval_batch_size=3, model=TINY)
    t.setup(tmp_path / "data", tmp_path / "cache", "cpu", seed=3)
    return t


def test_registered():
    assert {"wikitext103", "wikitext_mini"} <= set(TASKS)
    for name in ("wikitext103", "wikitext_mini"):
        assert TASKS[name].metric == "ppl" and TASKS[name].lower_is_better


def test_train_batches_contiguous_shifted_and_deterministic(task):
    # Distinct ids stand for positions, so each block shows where it was cut from.
    task.corpus.splits["train"] = torch.arange(100, 183, dtype=torch.int32)
    batches = list(task.train_batches(0))
    assert len(batches) == task.num_train_batches() == 3  # 10 full blocks of 8, batches of 4
    starts = []
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[1] == 8 and inputs.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # inputs are the targets shifted by one
        for inp, row in zip(inputs, targets):
            start = int(row[0]) - 100
            assert torch.equal(row, torch.arange(100 + start, 108 + start))
            assert int(inp[0]) == (EOS_ID if start == 0 else 99 + start)
            starts.append(start)
    assert sorted(starts) == list(range(0, 80, 8))  # every full block exactly once
    again = [b[1] for b in task.train_batches(0)]
    assert all(torch.equal(a[1], b) for a, b in zip(batches, again))
    other = [b[1] for b in task.train_batches(1)]
    assert not all(torch.equal(a[1], b) for a, b in zip(batches, other))


def test_step_returns_mean_nll_and_float_metrics(task):
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets = next(iter(task.train_batches(0)))
    loss, metrics = task.step(model, (inputs, targets))
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss, model(inputs, targets).mean())
    assert set(metrics) == {"nll", "ppl"} and all(isinstance(v, float) for v in metrics.values())
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["nll"]))


def reference_eval(task, model, split):
    """Brute force: every token scored alone from its own window (fairseq eval_lm semantics)."""
    ids = task.corpus.splits[split].long()
    stream = torch.cat([torch.tensor([EOS_ID]), ids])
    total = 0.0
    with torch.no_grad():
        for ctx, start, end in task.windows(split):
            nll = model(stream[ctx:end][None], ids[ctx:end][None])[0]
            total += float(nll[start - ctx:].double().sum())
    return total / len(ids)


def test_evaluate_scores_each_token_once_with_context(task):
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    out = task.evaluate(model, "valid")
    assert model.training  # mode restored
    n = len(task.corpus.splits["valid"])
    assert out["tokens"] == n
    windows = task.windows("valid")
    assert [w[1] for w in windows] == list(range(0, n, 6))
    assert all(s - c == min(5, s) and e - s <= 6 for c, s, e in windows)
    model.eval()
    assert out["nll"] == pytest.approx(reference_eval(task, model, "valid"), rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["nll"]))
    # Batching (with padding) does not change the result.
    task.eval_batch_size = 1
    assert task.evaluate(model, "valid")["nll"] == pytest.approx(out["nll"], rel=1e-5)


def test_full_context_equals_one_forward(task):
    torch.manual_seed(0)
    model = task.build_model().eval()
    ids = task.corpus.splits["test"].long()
    task.context_window, task.eval_tokens_per_sample = len(ids), len(ids)
    stream = torch.cat([torch.tensor([EOS_ID]), ids])
    with torch.no_grad():
        expected = float(model(stream[:-1][None], ids[None]).double().mean())
    assert task.evaluate(model, "test")["nll"] == pytest.approx(expected, rel=1e-6)


def test_learns_below_unigram(task):
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(6):
        for batch in task.train_batches(epoch):
            loss, _ = task.step(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train = task.corpus.splits["train"].long()
    counts = torch.bincount(train, minlength=len(task.corpus.dictionary)).double() + 0.5
    test = task.corpus.splits["test"].long()
    unigram = math.exp(-float((counts / counts.sum()).log()[test].mean()))
    ppl = task.evaluate(model, "test")["ppl"]
    assert ppl < 0.5 * unigram, (ppl, unigram)


def test_missing_data_is_a_clear_error(tmp_path):
    t = get_task("wikitext103")
    with pytest.raises(DataMissingError, match="wiki.train.tokens"):
        t.setup(tmp_path / "nothing", tmp_path / "cache", "cpu")


def test_paper_defaults_build_the_paper_model(task):
    t = get_task("wikitext103")
    assert (t.tokens_per_sample, t.context_window) == (3072, 2560)
    t.corpus = task.corpus
    cfg = t.model_config()
    assert (cfg.d_model, cfg.n_layers, cfg.ffn_dim, cfg.n_heads) == (1024, 16, 4096, 8)


@pytest.mark.parametrize("kwargs", [dict(tokens_per_sample=0), dict(batch_size=1.5),
                                    dict(context_window=-1), dict(model={"vocab_size": 3}),
                                    dict(model={"depth": 3})])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LanguageModelingTask(**kwargs)


def test_mini_task_builds_embedded_corpus(tmp_path):
    t = get_task("wikitext_mini", source="pydoc", min_count=2, tokens_per_sample=16, model=TINY)
    t.setup(tmp_path / "data", tmp_path / "cache", "cpu")
    assert (tmp_path / "data" / "wikitext_mini" / "wiki.test.tokens").is_file()
    model = t.build_model()
    assert model.cfg.vocab_size == len(t.corpus.dictionary)
    loss, _ = t.step(model, next(iter(t.train_batches(0))))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="source"):
        get_task("wikitext_mini", source="internet")


def test_lambda_is_the_papers_on_the_lm(task):
    """The gradient on DiffQ's bit logits equals fairseq's construction: the NLL summed over each
    micro-batch of M tokens plus λ·size per micro-batch, divided by the number of tokens."""
    from diffq_bench.quant import get_quantizer
    lam, m_tokens = 7.0, 8  # M = task.tokens_per_sample: one block per fairseq micro-batch here
    task.penalty_scale = 1 / m_tokens
    torch.manual_seed(0)
    model = task.build_model()
    q = get_quantizer("diffq", model, min_size=0, group_size=8, penalty=lam)
    inputs, targets = next(iter(task.train_batches(0)))  # 4 blocks of 8 tokens
    model.eval()  # no dropout/noise: both sides see the same forward, so the logits' gradient
    # is the size term's, whose scale relative to the NLL is what λ's convention decides

    def logit_grads(loss):
        for p in q.quantizer_parameters():
            p.grad = None
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in q.quantizer_parameters()])

    ours = logit_grads(task.step(model, (inputs, targets))[0] + task.penalty_scale * q.penalty_term())
    fairseq = sum(model(inputs[i:i + 1], targets[i:i + 1]).sum() + lam * q.model_size()
                  for i in range(len(inputs)))  # one micro-batch of M tokens per block
    theirs = logit_grads(fairseq / inputs.numel())
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
    assert get_task("wikitext103").penalty_scale == 1 / 3072  # the paper's micro-batch


def test_diverged_model_has_infinite_perplexity_not_an_overflow(task):
    class Huge(torch.nn.Module):
        def forward(self, inputs, targets):
            return torch.full(targets.shape, 1e4)  # NLL per token far past exp's range
    metrics = task.evaluate(Huge(), "test")
    assert metrics["nll"] == pytest.approx(1e4) and metrics["ppl"] == math.inf


@pytest.mark.parametrize("split,needed", [("train", "tokens_per_sample=8"),
                                          ("valid", "eval_tokens_per_sample=6"),
                                          ("test", "eval_tokens_per_sample=6")])
def test_too_small_split_is_corrupt_not_a_perplexity(tmp_path, split, needed):
    root = write_corpus(tmp_path / "data" / "wikitext-103")
    (root / f"wiki.{split}.tokens").write_text(" the cat \n")  # 3 tokens: fewer than one block
    t = get_task("wikitext103", tokens_per_sample=8, batch_size=4, context_window=5,
                 eval_tokens_per_sample=6, eval_batch_size=3, model=TINY)
    with pytest.raises(DataCorruptError, match=rf"wiki\.{split}\.tokens has 3 tokens.*{needed}"):
        t.setup(tmp_path / "data", tmp_path / "cache", "cpu")


def test_empty_test_split_is_corrupt_not_ppl_one(tmp_path):
    root = write_corpus(tmp_path / "data" / "wikitext-103")
    (root / "wiki.test.tokens").write_text("")
    t = get_task("wikitext103", tokens_per_sample=8, eval_tokens_per_sample=6, model=TINY)
    with pytest.raises(DataCorruptError, match=r"wiki\.test\.tokens holds no word"):
        t.setup(tmp_path / "data", tmp_path / "cache", "cpu")
