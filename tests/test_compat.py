"""ddfast.compat: the official recover hooks' drop-in replacements on K1, against the official statements in float64
(SRe2L's and G-VBSM's hooks in ddfast.reference.stat_match_official, written statement by statement after
SRe2L/recover/utils.py:92-104 and Branch_CIFAR_10/recover/utils.py)."""

import pytest
import torch
import torch.nn as nn

from ddfast.compat import gvbsm as compat_gvbsm
from ddfast.compat import sre2l as compat_sre2l
from ddfast.reference import stat_match_official as official
from ddfast.testing import rel_error

F64 = torch.float64


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()).double()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _loss_and_grad(net, hooks, x):
    x = x.clone().requires_grad_(True)
    net(x)
    loss = sum(h.r_feature for h in hooks)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def test_sre2l_hook_equals_the_official_statements():
    net, ref_net = _net(), _net()
    ours = [compat_sre2l.BNFeatureHook(m) for m in net if isinstance(m, nn.BatchNorm2d)]
    theirs = [official.SRe2LBNFeatureHook(m) for m in ref_net if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(5, 3, 14, 14, dtype=F64, generator=torch.Generator().manual_seed(1))
    (la, ga), (lb, gb) = _loss_and_grad(net, ours, x), _loss_and_grad(ref_net, theirs, x)
    assert rel_error(la, lb) < 1e-8 and rel_error(ga, gb) < 1e-8
    ours[0].close()


def test_gvbsm_hooks_collect_and_match_like_the_official_ones(tmp_path):
    # 14 px convs (block 2 sees 7×7: the bilinear resize to 8×8 before the 4×4 patches)
    net, ref_net = _net(), _net()
    gen = torch.Generator().manual_seed(2)
    real = [torch.randn(6, 3, 14, 14, dtype=F64, generator=gen) for _ in range(2)]
    convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    ours_conv = [compat_gvbsm.ConvFeatureHook(m, save_path=str(tmp_path), data_number=12, name=n, drop_rate=0.0) for n, m in convs]
    ref_conv = [official.ConvFeatureHook(m) for _, m in ref_net.named_modules() if isinstance(m, nn.Conv2d)]
    for ours, ref in zip(ours_conv, ref_conv):
        ours.set_hook(pre=True)
        ref.start_collection(12)
    with torch.no_grad():
        for batch in real:
            net(batch), ref_net(batch)
    for ours, ref in zip(ours_conv, ref_conv):
        for key in compat_gvbsm.ConvFeatureHook.STATS:
            assert rel_error(getattr(ours, key), getattr(ref, key)) < 1e-10, key
        ours.save()
        ours.set_hook(pre=False)
        ref.set_hook(pre=False)
    ours_all = [*ours_conv, *(compat_gvbsm.BNFeatureHook(m) for m in net if isinstance(m, nn.BatchNorm2d))]
    ref_all = [*ref_conv, *(official.BNFeatureHook(m) for m in ref_net if isinstance(m, nn.BatchNorm2d))]
    x = torch.randn(4, 3, 14, 14, dtype=F64, generator=gen)
    for _ in range(3):  # the EMA carries over iterations
        (la, ga), (lb, gb) = _loss_and_grad(net, ours_all, x), _loss_and_grad(ref_net, ref_all, x)
        assert rel_error(la, lb) < 1e-8 and rel_error(ga, gb) < 1e-8
        x = x - 0.1 * ga
    reloaded = compat_gvbsm.ConvFeatureHook(nn.Conv2d(3, 8, 3), save_path=str(tmp_path), data_number=12, name=convs[0][0])
    assert reloaded.load_tag and torch.allclose(reloaded.running_patch_var.double(), ours_conv[0].running_patch_var)


def test_gvbsm_conv_hook_drops_with_its_rate_and_refuses_a_missing_name(tmp_path):
    net = _net()
    hook = compat_gvbsm.ConvFeatureHook(net[0], save_path=str(tmp_path), name="c", drop_rate=1.0)
    net(torch.randn(2, 3, 8, 8, dtype=F64))
    assert float(hook.r_feature) == 0.0
    with pytest.raises(ModuleNotFoundError):
        compat_gvbsm.ConvFeatureHook(net[0], save_path=str(tmp_path))
