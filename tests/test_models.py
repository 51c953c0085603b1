from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ddfast import models

# Small widths keep the full matrix fast on CPU.
SMALL_WIDTH = {
    "convnet": 16,
    "convnetd4": 16,
    "convnetd5": 16,
    "resnet18": 8,
    "mobilenetv2": 8,
    "shufflenetv2": 12,
    "wrn-16-2": 8,
    "vgg11": 8,
}
BN_MODELS = ["resnet18", "mobilenetv2", "shufflenetv2", "wrn-16-2", "vgg11"]

CASES = [
    (name, channels, size)
    for name in SMALL_WIDTH
    for channels in (1, 3)
    for size in (28, 32)
    if not (name == "convnetd5" and size == 28)  # 5 pools shrink 28 px to 0; see test below
]
CASES += [("convnet", 3, 64), ("resnet18", 3, 64), ("vgg11", 1, 64), ("convnet", 3, (28, 40)), ("vgg11", 3, (28, 40))]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Depthwise convs get ~20x slower when threads are oversubscribed on a shared small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_available_lists_all_models() -> None:
    assert models.available() == list(SMALL_WIDTH)


@pytest.mark.parametrize("name, channels, size", CASES)
def test_forward_backward(name: str, channels: int, size: int | tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = models.create(name, channels, 7, size, width=SMALL_WIDTH[name])
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, channels, h, w, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.embed(x).shape == (3, model.classifier.in_features)


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("convnet-d3", "convnet"),
        ("ConvNetD3", "convnet"),
        ("convnet-d4", "convnetd4"),
        ("convnet_d5", "convnetd5"),
        ("resnet-18", "resnet18"),
        ("ResNet18BN", "resnet18"),
        ("mobilenet_v2", "mobilenetv2"),
        ("shufflenet-v2", "shufflenetv2"),
        ("wrn16_2", "wrn-16-2"),
        ("VGG-11", "vgg11"),
    ],
)
def test_aliases(alias: str, canonical: str) -> None:
    model = models.create(alias, 1, 10, 32, width=8)
    assert model.ddfast_name == canonical
    assert model.ddfast_config["name"] == canonical


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown model 'lenet'.*convnet.*resnet18.*vgg11"):
        models.create("lenet", 3, 10, 32)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("convnet", {"norm": "weirdnorm"}, "invalid norm='weirdnorm'; choose from instancenorm, batchnorm"),
        ("convnet", {"net_act": "gelu"}, "invalid net_act='gelu'; choose from relu, sigmoid, leakyrelu"),
        ("convnet", {"pooling": 2}, "invalid pooling=2"),
        ("convnet", {"depth": 4}, "unknown option.*depth.*valid options: norm, net_act, pooling, mnist_padding"),
        ("resnet18", {"norm": "batchnorm"}, "unknown option.*norm.*valid options: none"),
    ],
)
def test_bad_option(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.create(name, 3, 10, 32, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"num_classes": 0},
        {"image_size": (32, 32, 3)},
        {"image_size": 0},
        {"width": 0},
        {"width": 8.5},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    args = {"name": "convnet", "in_channels": 3, "num_classes": 10, "image_size": 32} | kwargs
    with pytest.raises(ValueError):
        models.create(**args)


def test_convnetd5_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="reduces a 28x28 image to 0x0"):
        models.create("convnetd5", 3, 10, 28)


@pytest.mark.parametrize(
    "size, mnist_padding, first_padding, spatial", [(28, "dc", 3, 4), (28, "none", 1, 3), (32, "dc", 1, 4)]
)
def test_convnet_matches_dc_structure(size: int, mnist_padding: str, first_padding: int, spatial: int) -> None:
    # DC pads the first conv by 3 for 1-channel 28 px inputs, so Fashion-MNIST runs at 32x32 inside.
    model = models.create("convnet", 1, 10, size, mnist_padding=mnist_padding)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.GroupNorm)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 128, (3, 3), (first_padding, first_padding)),
        (128, 128, (3, 3), (1, 1)),
        (128, 128, (3, 3), (1, 1)),
    ]
    assert [(n.num_groups, n.num_channels, n.affine) for n in norms] == [(128, 128, True)] * 3
    assert [type(m) for m in model.features] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (128 * spatial * spatial, 10)
    if size == 28:
        conv1 = 1 * 128 * 9 + 128
        conv23 = 2 * (128 * 128 * 9 + 128)
        norms_params = 3 * 2 * 128
        fc = 128 * spatial * spatial * 10 + 10
        assert _params(model) == conv1 + conv23 + norms_params + fc
    x = torch.randn(2, 1, size, size)
    assert model.embed(x).shape == (2, 128 * spatial * spatial)


@pytest.mark.parametrize(
    "options, layer_types",
    [
        (
            {"norm": "batchnorm", "net_act": "sigmoid", "pooling": "maxpool"},
            [nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid, nn.MaxPool2d],
        ),
        ({"norm": "none", "net_act": "leakyrelu", "pooling": "avgpooling"}, [nn.Conv2d, nn.LeakyReLU, nn.AvgPool2d]),
        ({"norm": "layernorm", "pooling": "none"}, [nn.Conv2d, nn.GroupNorm, nn.ReLU]),
    ],
)
def test_convnet_options(options: dict, layer_types: list[type]) -> None:
    model = models.create("convnet", 3, 10, 32, width=8, **options)
    assert [type(m) for m in model.features] == layer_types * 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_norm_groups() -> None:
    layer = models.create("convnet", 3, 10, 32, width=8, norm="layernorm").features[1]
    group = models.create("convnet", 3, 10, 32, width=8, norm="groupnorm").features[1]
    assert (layer.num_groups, group.num_groups) == (1, 4)


def test_convnet_depth_variants() -> None:
    for name, depth in [("convnet", 3), ("convnetd4", 4), ("convnetd5", 5)]:
        model = models.create(name, 3, 10, 32, width=8)
        assert sum(isinstance(m, nn.Conv2d) for m in model.features) == depth
        assert model.classifier.in_features == 8 * (32 >> depth) ** 2


@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_models_use_batchnorm(name: str) -> None:
    model = models.create(name, 3, 10, 32, width=SMALL_WIDTH[name])
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) for m in model.modules())


# Parameter counts of the reference implementations for 3x32x32 inputs / 10 classes:
# kuangliu CIFAR ResNet18 and VGG11, torchvision mobilenet_v2 and shufflenet_v2_x0_5
# (stem stride does not change the count), Zagoruyko's WRN-16-2.
REFERENCE_PARAMS = {
    "resnet18": 11_173_962,
    "mobilenetv2": 2_236_682,
    "shufflenetv2": 352_042,
    "wrn-16-2": 691_674,
    "vgg11": 9_231_114,
}


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_default_width_matches_reference(name: str) -> None:
    model = models.create(name, 3, 10, 32)
    assert _params(model) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", list(SMALL_WIDTH))
def test_width_changes_parameter_count(name: str) -> None:
    small = models.create(name, 3, 10, 32, width=SMALL_WIDTH[name])
    larger = models.create(name, 3, 10, 32, width=2 * SMALL_WIDTH[name])
    assert _params(small) < _params(larger)


@pytest.mark.parametrize("size, pools", [(28, 4), (32, 5), (64, 5)])
def test_vgg11_skips_pools_for_small_images(size: int, pools: int) -> None:
    model = models.create("vgg11", 1, 10, size, width=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == pools


def test_config_records_resolved_arguments_and_rebuilds() -> None:
    model = models.create("ConvNet-D4", 3, 10, 32, norm="BatchNorm")
    assert model.ddfast_name == "convnetd4"
    assert model.ddfast_config == {
        "name": "convnetd4",
        "in_channels": 3,
        "num_classes": 10,
        "image_size": (32, 32),
        "width": 128,
        "norm": "batchnorm",
        "net_act": "relu",
        "pooling": "avgpool",
        "mnist_padding": "dc",
    }
    rebuilt = models.create(**model.ddfast_config)
    assert rebuilt.ddfast_config == model.ddfast_config
    assert _shapes(rebuilt) == _shapes(model)


@pytest.mark.parametrize("name", list(SMALL_WIDTH))
def test_deterministic_given_seed(name: str) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(models.create(name, 3, 10, 32, width=SMALL_WIDTH[name]).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
