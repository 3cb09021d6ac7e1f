"""The paper's LM architecture: exact parameter count, adaptive softmax correctness, causality."""
import pytest
import torch

from diffq_bench.models.transformer_lm import TransformerLM, TransformerLMConfig

PAPER_PARAMS = 246_933_504
PAPER_VOCAB = 267_744


def tiny(**kw):
    base = dict(vocab_size=300, d_model=32, ffn_dim=64, n_heads=4, n_layers=2, cutoffs=[50, 150],
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                adaptive_softmax_dropout=0.0, layerdrop=0.0)
    base.update(kw)
    return TransformerLMConfig(**base)


def count(cfg):
    with torch.device("meta"):
        model = TransformerLM(cfg)
    return sum(p.numel() for p in model.parameters())  # tied tensors counted once


def test_paper_model_has_exact_parameter_count():
    assert count(TransformerLMConfig(vocab_size=PAPER_VOCAB)) == PAPER_PARAMS


def test_paper_count_decomposition():
    # Layers: 4 biased d x d projections + FFN + 2 LayerNorms; adaptive input: per band embedding +
    # bias-free projection; softmax: only the 2-cluster class projection (all else tied).
    d, f, layers = 1024, 4096, 16
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    bands = [(20000, 1024), (40000, 256), (PAPER_VOCAB - 60000, 64)]
    adaptive = sum(n * dim + dim * d for n, dim in bands)
    assert layers * layer + adaptive + 2 * d == PAPER_PARAMS
    # Untying or adding a final norm changes the count: the test pins which modules exist.
    assert count(TransformerLMConfig(vocab_size=PAPER_VOCAB, final_norm=True)) == PAPER_PARAMS + 2 * d
    assert count(TransformerLMConfig(vocab_size=PAPER_VOCAB, tie_adaptive_proj=False)) == \
        PAPER_PARAMS + 256 * d + 64 * d


def test_small_vocab_drops_cutoffs():
    cfg = tiny(vocab_size=100, cutoffs=[50, 150])
    assert cfg.cutoffs == [50]
    assert [b[:2] for b in cfg.bands] == [(0, 50), (50, 100)]
    assert tiny(vocab_size=40).cutoffs == []


@pytest.mark.parametrize("cutoffs,tied", [([50, 150], True), ([50, 150], False), ([], True)])
def test_log_probs_normalised_and_match_nll(cutoffs, tied):
    torch.manual_seed(0)
    cfg = tiny(cutoffs=cutoffs, tie_adaptive_weights=tied, tie_adaptive_proj=tied)
    model = TransformerLM(cfg).eval()
    x = torch.randint(0, 300, (2, 9))
    y = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        lp = model(x)
        nll = model(x, y)
    assert lp.shape == (2, 9, 300)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(nll, -lp.gather(-1, y[..., None]).squeeze(-1), atol=1e-5, rtol=0)


def test_causal_future_tokens_do_not_change_past():
    torch.manual_seed(0)
    model = TransformerLM(tiny()).eval()
    x = torch.randint(0, 300, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = torch.randint(0, 300, (4,))
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_weights_receive_gradient_from_both_uses():
    torch.manual_seed(0)
    model = TransformerLM(tiny())
    x = torch.randint(0, 300, (2, 6))
    model(x, torch.randint(200, 300, (2, 6))).mean().backward()  # targets in the last tail only
    assert model.embed.embeddings[2].weight.grad.abs().sum() > 0
    assert model.embed.projections[2].weight.grad.abs().sum() > 0
    assert model.softmax.class_proj.weight.grad.abs().sum() > 0
    assert not model.softmax.words and "1" not in model.softmax.projections


def test_layerdrop_only_in_training():
    torch.manual_seed(0)
    model = TransformerLM(tiny(layerdrop=0.5))
    x, y = torch.randint(0, 300, (1, 5)), torch.randint(0, 300, (1, 5))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, y), model(x, y))
    model.train()
    with torch.no_grad():
        outs = {round(float(model(x, y).sum()), 4) for _ in range(12)}
    assert len(outs) > 1  # with p=0.5 over 2 layers, 12 forwards see different layer subsets


@pytest.mark.parametrize("bad", [dict(d_model=30, n_heads=4), dict(dropout=1.0), dict(cutoffs=[50, 40]),
                                 dict(n_layers=0), dict(padding_idx=300)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        tiny(**bad)
