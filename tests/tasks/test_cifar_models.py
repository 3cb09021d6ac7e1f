"""The paper's CIFAR models: exact parameter counts, shapes, argument checks."""
import pytest
import torch

from diffq_bench.models.cifar import CIFAR_MODELS, ResNet, WideResNet, create_cifar_model

torch.set_num_threads(1)

# Counts of the DiffQ paper's CIFAR models, obtained by arithmetic on the architectures.
EXPECTED = {("resnet18", 10): 11_173_962, ("mobilenet", 10): 3_217_226, ("wrn28_10", 10): 36_489_290,
            ("resnet18", 100): 11_220_132, ("mobilenet", 100): 3_309_476, ("wrn28_10", 100): 36_546_980,
            # ResNet-20 (He et al. 2016, option A): 0.27M
            ("resnet20", 10): 269_722}


def test_resnet20_count_by_arithmetic():
    conv = 3 * 3
    total = 3 * 16 * conv + 2 * 16  # stem conv + BN
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            total += cin * width * conv + 2 * width + width * width * conv + 2 * width
            cin = width
    total += 64 * 10 + 10
    assert total == EXPECTED[("resnet20", 10)]


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,classes", sorted(EXPECTED))
def test_exact_parameter_counts(name, classes):
    assert count(create_cifar_model(name, classes)) == EXPECTED[(name, classes)]


def test_resnet18_count_by_arithmetic():
    # stem 3x3x3x64 + BN; per BasicBlock two 3x3 convs + 2 BN; projections 1x1 + BN; linear 512x10+10.
    conv = lambda i, o, k: i * o * k * k  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 64, 3) + bn(64)
    cin = 64
    for width in (64, 128, 256, 512):
        for _ in range(2):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if cin != width:
                total += conv(cin, width, 1) + bn(width)
            cin = width
    total += 512 * 10 + 10
    assert total == 11_173_962 == count(create_cifar_model("resnet18", 10))


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_forward_shapes(name):
    torch.manual_seed(0)
    kwargs = {"blocks": [1, 1], "widths": [8, 16]} if name == "resnet" else {}
    if name == "wide_resnet":
        kwargs = {"depth": 10, "widen": 1}
    model = create_cifar_model(name, 7, **kwargs).eval()
    # Global average pooling: the big models are checked on 8x8 inputs (cheap), the small on 32x32.
    side = 32 if kwargs else 8
    with torch.no_grad():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_resnet_32x32_matches_avgpool4():
    """On 32x32 inputs, the global pool equals the paper's avg_pool2d(4) on the 4x4 feature map."""
    torch.manual_seed(0)
    model = create_cifar_model("resnet18", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.layers(torch.relu(model.bn1(model.conv1(x))))
        assert feats.shape[-2:] == (4, 4)
        ref = model.linear(torch.nn.functional.avg_pool2d(feats, 4).flatten(1))
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_stem_stride_halves_resolution():
    model = ResNet(10, blocks=[1], widths=[8], stem_stride=2)
    assert model.conv1.stride == (2, 2)
    with pytest.raises(ValueError, match="stem_stride"):
        ResNet(10, blocks=[1], widths=[8], stem_stride=3)


@pytest.mark.parametrize("kwargs,match", [
    ({"blocks": [1, 1], "widths": [8]}, "same length"),
    ({"blocks": [0], "widths": [8]}, ">= 1"),
])
def test_resnet_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(10, **kwargs)


def test_wrn_bad_depth_and_unknown_name():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(10, depth=27)
    with pytest.raises(ValueError, match="resnet18"):
        create_cifar_model("resnet19", 10)
    with pytest.raises(ValueError, match="bad arguments"):
        create_cifar_model("mobilenet", 10, widths=[1])
