"""DiM's pool ResNets (ddfast.models *-dim) against hand counts and, where the mirror of
vimar-gu/DiM is present, against the official models/resnet.py and models/resnet_ap.py themselves."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from ddfast import models

DIM_NAMES = ["resnet10-dim", "resnet18-dim", "resnet10ap-dim", "resnet18ap-dim"]
DEPTH = {"resnet10-dim": 10, "resnet18-dim": 18, "resnet10ap-dim": 10, "resnet18ap-dim": 18}
IS_AP = {name: "ap" in name for name in DIM_NAMES}
MIRROR = Path("/work/.mirror/vimar-gu+DiM/repo")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The machine is shared; one thread keeps these small convs from oversubscribing it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- shapes and registry


@pytest.mark.parametrize("name", DIM_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_forward_backward_small_width(name: str, channels: int, size: int) -> None:
    model = models.create(name, channels, 7, size, width=8)
    x = torch.randn(2, channels, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.embed(x).shape == (2, 8 * 8)  # 8w features after the global pool


@pytest.mark.parametrize("name", DIM_NAMES)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_forward_backward_default_width(name: str, channels: int, size: int) -> None:
    # The pool's real inputs: Fashion-MNIST / MNIST (1x28x28) and CIFAR-10 / SVHN (3x32x32).
    model = models.create(name, channels, 10, size)
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registry_names_and_available() -> None:
    assert models.available() == [n for n in models.available(include_method_models=True) if n not in DIM_NAMES]
    assert models.available(include_method_models=True)[-4:] == DIM_NAMES


@pytest.mark.parametrize(
    "alias, canonical",
    [("ResNet10-DiM", "resnet10-dim"), ("resnet18_dim", "resnet18-dim"), ("ResNet10_AP-DiM", "resnet10ap-dim")],
)
def test_aliases(alias: str, canonical: str) -> None:
    model = models.create(alias, 1, 10, 28, width=8)
    assert model.ddfast_name == canonical
    rebuilt = models.create(**model.ddfast_config)
    shapes = [[(k, v.shape) for k, v in m.state_dict().items()] for m in (rebuilt, model)]
    assert shapes[0] == shapes[1]


def test_depth_is_validated() -> None:
    with pytest.raises(ValueError, match="depth must be one of"):
        models.ResNetDiM(3, 10, depth=34)


def test_uses_batchnorm_only() -> None:
    for name in DIM_NAMES:
        found = {type(m) for m in models.create(name, 3, 10, 32, width=8).modules()}
        assert nn.BatchNorm2d in found and not found & {nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d}


# ----------------------------------------------------------------- parameter counts by hand


def _expected_params(channels: int, classes: int, depth: int, width: int) -> int:
    # Same count for both variants: the AP blocks move the stride from the conv to a parameter-free
    # pool, and the AP stem is the same 7x7 conv at stride 1.
    total = channels * width * 49 + 2 * width  # stem conv + BN
    c_in = width
    for blocks, mult in zip({10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}[depth], (1, 2, 4, 8)):
        out = width * mult
        for j in range(blocks):
            cin = c_in if j == 0 else out
            total += cin * out * 9 + out * out * 9 + 4 * out  # conv1, conv2 (no bias), bn1, bn2
            if cin != out:  # stage 1 keeps w channels and stride 1: no shortcut conv
                total += cin * out + 2 * out
        c_in = out
    return total + c_in * classes + classes  # fc


@pytest.mark.parametrize("name", DIM_NAMES)
@pytest.mark.parametrize("channels, classes, width", [(1, 10, 64), (3, 10, 64), (3, 100, 16), (1, 7, 8)])
def test_parameter_count_by_hand(name: str, channels: int, classes: int, width: int) -> None:
    model = models.create(name, channels, classes, 28 if channels == 1 else 32, width=width)
    assert _params(model) == _expected_params(channels, classes, DEPTH[name], width)


def test_resnet18_count_matches_torchvision() -> None:
    # torchvision resnet18(num_classes=10) has 11,181,642 parameters: the same ImageNet-style net.
    assert _params(models.create("resnet18-dim", 3, 10, 32)) == 11_181_642


# ----------------------------------------------------------------- spatial sizes and ceil_mode


def _stage_sizes(model: nn.Module, size: int, channels: int = 1) -> list[int]:
    sizes: list[int] = []
    hooks = [getattr(model.features, f"layer{i}").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
             for i in range(5)]
    model(torch.randn(2, channels, size, size))
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize(
    "name, size, sizes",
    [
        ("resnet10-dim", 28, [7, 7, 4, 2, 1]),  # 7x7/2 conv 14, max-pool 7, stride-2 convs round up
        ("resnet10-dim", 32, [8, 8, 4, 2, 1]),
        ("resnet10ap-dim", 28, [7, 7, 4, 2, 1]),  # AvgPool(4) stem 7, then ceil-mode pools 4, 2, 1
        ("resnet10ap-dim", 32, [8, 8, 4, 2, 1]),
        ("resnet18ap-dim", 36, [9, 9, 4, 2, 1]),  # the official floor pools run at 36 px: kept as they are
    ],
)
def test_stage_sizes(name: str, size: int, sizes: list[int]) -> None:
    assert _stage_sizes(models.create(name, 1, 10, size, width=8), size) == sizes


@pytest.mark.parametrize("size, ceil", [(28, True), (24, True), (31, True), (32, False), (36, False), (64, False)])
def test_ap_ceil_mode_only_when_needed(size: int, ceil: bool) -> None:
    model = models.create("resnet10ap-dim", 1, 10, size, width=8)
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d) and m.kernel_size == 2]
    blocks = [m for m in model.modules() if getattr(m, "pool_after_conv1", False)]
    assert len(pools) == len(blocks) == 3  # one shortcut pool and one block pool per downsampling stage
    assert model.ceil_mode is ceil
    assert all(p.ceil_mode is ceil for p in pools) and all(b.ceil_mode is ceil for b in blocks)
    assert model.features.layer0.pool.ceil_mode is False  # the AvgPool(4) stem is never changed


def test_ap_ceil_mode_override_and_tiny_images() -> None:
    assert models.ResNetAPDiM(1, 10, (32, 32), depth=10, width=8, ceil_mode=True).ceil_mode is True
    assert models.ResNetAPDiM(1, 10, (28, 28), depth=10, width=8, ceil_mode=False).ceil_mode is False
    with pytest.raises(ValueError, match="at least 4x4"):
        models.create("resnet10ap-dim", 1, 10, 3)


# ----------------------------------------------------------------- against the official code


def _git_show(path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(MIRROR), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """The official modules, copied from the mirror into a temp dir and imported (CPU-only import)."""
    if not MIRROR.exists() or shutil.which("git") is None:
        pytest.skip(f"official DiM code not available: mirror {MIRROR} (or git) missing")
    root = tmp_path_factory.mktemp("dim_official")
    loaded = {}
    for name in ("resnet", "resnet_ap"):
        file = root / f"dim_{name}.py"
        file.write_text(_git_show(f"models/{name}.py"))
        spec = importlib.util.spec_from_file_location(f"dim_official_{name}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded[name] = module
    return types.SimpleNamespace(**loaded)


def _official_model(official: types.SimpleNamespace, name: str, channels: int, width: int = 64) -> nn.Module:
    # As DiM's define_model (pool_match.py:127-140) with a non-CIFAR dataset name ('fashion' / 'svhn').
    if IS_AP[name]:
        return official.resnet_ap.ResNetAP("fashion", DEPTH[name], 10, width=width / 64, nch=channels)
    assert width == 64, "the official ResNet has no width argument"
    return official.resnet.ResNet("fashion", DEPTH[name], 10, nch=channels)


def _official_key(ours: str) -> str:
    # features.layerN.* -> layerN.*, classifier.* -> fc.*
    if ours.startswith("classifier."):
        return "fc." + ours.removeprefix("classifier.")
    return ours.removeprefix("features.")


def _ours_and_official(official, name: str, channels: int, size: int, width: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = _official_model(official, name, channels, width)
    torch.manual_seed(0)
    ours = models.create(name, channels, 10, size, width=width)
    return ours, ref


# Widths: the official ResNet is fixed at 64; the AP variants also at 16 to keep the matrix cheap.
OFFICIAL_CASES = [
    (name, channels, size, width)
    for name in DIM_NAMES
    for channels, size in [(1, 28), (3, 32)]
    for width in ((16, 64) if IS_AP[name] else (64,))
]


@pytest.mark.parametrize("name, channels, size, width", OFFICIAL_CASES)
def test_seeded_init_equals_official(official, name: str, channels: int, size: int, width: int) -> None:
    # Same modules created and registered in the same order => the same random init, parameter
    # for parameter (official init: N(0, sqrt(2/(k*k*out))) convs, BN 1/0, default fc).
    ours, ref = _ours_and_official(official, name, channels, size, width)
    mine = {_official_key(k): v for k, v in ours.state_dict().items()}
    theirs = ref.state_dict()
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def _leaf_signature(model: nn.Module, rename) -> list[tuple]:
    # Layer sequence with every hyper-parameter that changes the function; ReLUs (official: in-place)
    # and the global pools (official: unused AvgPool2d(7) + functional pool; ours: AdaptiveAvgPool2d) skipped.
    rows = []
    for name, m in model.named_modules():
        if list(m.children()) or isinstance(m, (nn.ReLU, nn.AdaptiveAvgPool2d)) or name == "avgpool":
            continue
        if isinstance(m, nn.Conv2d):
            attrs = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is None)
        elif isinstance(m, nn.BatchNorm2d):
            attrs = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            attrs = (m.kernel_size, m.stride, m.padding, m.ceil_mode)
        elif isinstance(m, nn.Linear):
            attrs = (m.in_features, m.out_features, m.bias is not None)
        else:
            raise AssertionError(f"unexpected leaf {name}: {type(m).__name__}")
        rows.append((rename(name), type(m).__name__, attrs))
    return rows


@pytest.mark.parametrize("name", DIM_NAMES)
def test_layer_sequence_equals_official_at_32px(official, name: str) -> None:
    # At 32 px no ceil_mode is needed, so the AP variant must be the official layer sequence exactly.
    ours, ref = _ours_and_official(official, name, 3, 32, 64)
    strip = lambda n: _official_key(n + ".")[:-1]  # noqa: E731
    assert _leaf_signature(ours, strip) == _leaf_signature(ref, lambda n: n)


# The official AP models cannot run at 28 px (next test); everything else runs and must agree.
RUNNABLE_CASES = [c for c in OFFICIAL_CASES if not (IS_AP[c[0]] and c[2] == 28)]


@pytest.mark.parametrize("name, channels, size, width", RUNNABLE_CASES)
@pytest.mark.parametrize("train", [True, False])
def test_forward_equals_official(official, name: str, channels: int, size: int, width: int, train: bool) -> None:
    ours, ref = _ours_and_official(official, name, channels, size, width)
    ours.train(train), ref.train(train)
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    if train:  # BN running statistics are updated the same way
        mine = {_official_key(k): v for k, v in ours.state_dict().items()}
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet10ap-dim", "resnet18ap-dim"])
def test_official_ap_crashes_at_28px_and_ceil_mode_is_the_only_change(official, name: str, monkeypatch) -> None:
    ours, ref = _ours_and_official(official, name, 1, 28, 16)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):  # layer4's stride-2 pool would output 0x0 (spec A1)
        ref(x)
    # The official model with exactly the documented change (ceil_mode=True on the block's functional
    # pool and on the shortcut AvgPool2d) computes what ours does.
    ceil_f = types.SimpleNamespace(avg_pool2d=lambda *a, **k: torch.nn.functional.avg_pool2d(*a, **k, ceil_mode=True))
    monkeypatch.setattr(official.resnet_ap, "F", ceil_f)
    for m in ref.modules():
        if isinstance(m, nn.AvgPool2d) and m.kernel_size == 2:
            m.ceil_mode = True
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
