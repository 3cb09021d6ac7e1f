"""Contract tests parametrized over every registered quantizer."""
import pytest
import torch
from torch import nn

from diffq_bench.quant import QUANTIZERS, get_quantizer, restore, deserialize, serialize, QuantizerError


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_unknown_name_lists_valid(name):
    with pytest.raises(QuantizerError, match=name):
        get_quantizer("nope", nn.Linear(2, 2))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_export_roundtrip_matches_eval(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    quantizer = get_quantizer(name, model, min_size=0)
    x = torch.randn(5, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    quantizer.detach()
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    restore(fresh, deserialize(serialize(quantizer.export())))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
