"""K2 reference (batched attention matching): the vectorised autograd form and the closed form
against a per-class loop written after DataDAM's get_attention + MSE_B (F.normalize, sum of squared
class-mean differences), in float64; p ∈ {1, 2, 4, 1.5}, both modes, ragged, unsorted and absent
classes, an all-zero map (F.normalize's eps branch)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddfast.reference import attention_match as ref
from ddfast.testing import assert_close

F64 = torch.float64


def _loop_oracle(fr, fs, yr, ys, p, mode, weights, er, es, w_emb):
    """Per layer, per class present on both sides: ‖mean â_real − mean â_syn‖² (DataDAM main:254)."""
    def att(f):
        a = f.abs().pow(p).sum(dim=1 if mode == "spatial" else (2, 3)).flatten(1)
        return F.normalize(a, p=2, dim=1)

    loss = torch.zeros((), dtype=F64)
    classes = sorted(set(yr.tolist()) & set(ys.tolist()))
    for f_r, f_s, w in zip(fr, fs, weights):
        ar, as_ = att(f_r), att(f_s)
        for k in classes:
            loss = loss + w * (ar[yr == k].mean(0) - as_[ys == k].mean(0)).square().sum()
    if er is not None:
        for k in classes:
            loss = loss + w_emb * (er[yr == k].mean(0) - es[ys == k].mean(0)).square().sum()
    return loss


def _case(seed, zero_map=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4, 4), (3, 2, 2)]  # two layers of different sizes
    yr = torch.tensor([2, 0, 0, 1, 2, 2, 4, 0])  # class 3 absent on the real side
    ys = torch.tensor([0, 3, 2, 2, 0, 1, 2])  # ragged, unsorted; class 4 absent on the synthetic side
    fr = [torch.randn(len(yr), *s, generator=gen, dtype=F64).relu() for s in shapes]
    fs = [torch.randn(len(ys), *s, generator=gen, dtype=F64) for s in shapes]
    if zero_map:
        fs[0][1] = 0.0  # an all-zero map: ‖a‖ = 0 < eps
        fs[1][2] = 0.0
    er = torch.randn(len(yr), 6, generator=gen, dtype=F64)
    es = torch.randn(len(ys), 6, generator=gen, dtype=F64)
    return fr, fs, yr, ys, er, es


@pytest.mark.parametrize("zero_map", [False, True])
@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 1.5])
def test_reference_matches_the_per_class_loop(p, mode, zero_map):
    fr, fs, yr, ys, er, es = _case(int(p * 10) + (mode == "channel"), zero_map)
    fs = [f.requires_grad_(True) for f in fs]
    es = es.requires_grad_(True)
    weights = [100.0, 30.0]
    expected = _loop_oracle(fr, fs, yr, ys, p, mode, weights, er, es, 1.0)
    grads_expected = torch.autograd.grad(expected, [*fs, es])
    loss = ref.attention_match(fr, fs, yr, ys, p, mode, weights, er, es, 1.0)
    assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-10, name="autograd-form loss")
    for g, e in zip(torch.autograd.grad(loss, [*fs, es]), grads_expected):
        assert_close(g, e, atol=1e-12, rtol=1e-9, name="autograd-form grad")
    closed, dfs, de = ref.attention_match_and_grad(fr, [f.detach() for f in fs], yr, ys, p, mode, weights, er, es.detach(), 1.0)
    assert_close(closed, expected.detach(), atol=1e-12, rtol=1e-10, name="closed-form loss")
    for g, e in zip([*dfs, de], grads_expected):
        assert_close(g, e, atol=1e-10, rtol=1e-9, name="closed-form grad")


def test_absent_classes_contribute_nothing_and_real_side_gets_no_gradient():
    fr, fs, yr, ys, _, _ = _case(0)
    loss_all = ref.attention_match(fr, fs, yr, ys)
    keep = ys != 3  # class 3 exists only on the synthetic side
    loss_kept = ref.attention_match(fr, [f[keep] for f in fs], yr, ys[keep])
    assert_close(loss_all, loss_kept, atol=1e-14, rtol=1e-12, name="loss")
    _, dfs, _ = ref.attention_match_and_grad(fr, fs, yr, ys)
    assert all((d[ys == 3] == 0).all() for d in dfs)
    fr_grad = [f.clone().requires_grad_(True) for f in fr]
    loss = ref.attention_match(fr_grad, fs, yr, ys)
    assert loss.grad_fn is None or all(f.grad is None for f in fr_grad)


@pytest.mark.parametrize("bad,match", [
    (lambda fr, fs, yr, ys: (fr[:1], fs, yr, ys), "differ in length"),
    (lambda fr, fs, yr, ys: (fr, fs, yr[:-1], ys), "labels"),
    (lambda fr, fs, yr, ys: (fr, [fs[0][:, :2], fs[1]], yr, ys), "equal C, H, W"),
])
def test_bad_inputs_raise(bad, match):
    fr, fs, yr, ys, _, _ = _case(1)
    with pytest.raises(ValueError, match=match):
        ref.attention_match(*bad(fr, fs, yr, ys))
    with pytest.raises(ValueError, match="mode"):
        ref.attention_match(fr, fs, yr, ys, mode="pixel")


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_op_matches_the_oracle_and_traces_under_compile(mode):
    from ddfast.backend import use_backend
    from ddfast.ops.attention_match import attention_match as op

    fr, fs, yr, ys, er, es = _case(7)
    fs = [f.requires_grad_(True) for f in fs]
    es = es.requires_grad_(True)
    expected = _loop_oracle(fr, fs, yr, ys, 4.0, mode, [100.0, 1.0], er, es, 0.5)
    grads_expected = torch.autograd.grad(expected, [*fs, es])
    with use_backend("reference"):
        loss = op(fr, fs, yr, ys, 4.0, mode, [100.0, 1.0], er, es, 0.5)
        grads = torch.autograd.grad(loss * 3, [*fs, es])
        compiled = torch.compile(lambda a, b: op(fr, [a, b], yr, ys, 4.0, mode, [100.0, 1.0], er, es, 0.5), fullgraph=True)
        value = compiled(*fs)
    assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-10, name="loss")
    for g, e in zip(grads, grads_expected):
        assert_close(g, 3 * e, atol=1e-10, rtol=1e-9, name="grad")
    assert_close(value.detach(), expected.detach(), atol=1e-12, rtol=1e-10, name="compiled loss")


@pytest.mark.parametrize("exp", [1.0, 4.0])
def test_op_equals_datadam_official_loss(exp):
    """The official loop (last activation excluded, 100 per layer, 100·task_balance on the outputs)
    is the op with layer_weights 100 over the first D−1 activations and emb_weight 100·0.01."""
    from ddfast.backend import use_backend
    from ddfast.ops.attention_match import attention_match as op
    from ddfast.reference.attention_match_official import datadam_loss

    gen = torch.Generator().manual_seed(int(exp))
    classes, batch_real, ipc = 3, 4, 2
    shapes = [(6, 8, 8), (6, 4, 4), (6, 2, 2)]
    real = [torch.randn(classes * batch_real, *s, generator=gen, dtype=F64).relu() for s in shapes]
    syn = [torch.randn(classes * ipc, *s, generator=gen, dtype=F64).relu().requires_grad_(True) for s in shapes]
    out_real = torch.randn(classes * batch_real, 24, generator=gen, dtype=F64)
    out_syn = torch.randn(classes * ipc, 24, generator=gen, dtype=F64, requires_grad=True)
    yr = torch.arange(classes).repeat_interleave(batch_real)
    ys = torch.arange(classes).repeat_interleave(ipc)
    expected = datadam_loss(real, syn, out_real, out_syn, classes, batch_real, ipc, exp=exp)
    grads_expected = torch.autograd.grad(expected, [*syn[:-1], out_syn])
    with use_backend("reference"):
        loss = op(real[:-1], syn[:-1], yr, ys, exp, "spatial", [100.0, 100.0], out_real, out_syn, 1.0)
        grads = torch.autograd.grad(loss, [*syn[:-1], out_syn])
    assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-10, name="loss")
    for g, e in zip(grads, grads_expected):
        assert_close(g, e, atol=1e-10, rtol=1e-9, name="grad")


def test_op_with_the_embedding_only_traces_and_keeps_float64():
    """No attention layers: the op (eager and under torch.compile) is the embedding term alone."""
    from ddfast.backend import use_backend
    from ddfast.ops.attention_match import attention_match as op

    gen = torch.Generator().manual_seed(11)
    yr, ys = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 0])
    er = torch.randn(4, 5, generator=gen, dtype=F64)
    es = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    expected = _loop_oracle([], [], yr, ys, 1.0, "spatial", [], er, es, 2.0)
    with use_backend("reference"):
        loss = op([], [], yr, ys, emb_weight=2.0, real_emb=er, syn_emb=es)
        compiled = torch.compile(lambda e: op([], [], yr, ys, emb_weight=2.0, real_emb=er, syn_emb=e), fullgraph=True)(es)
    assert loss.dtype == F64 and compiled.dtype == F64
    assert_close(loss.detach(), expected.detach(), atol=1e-14, rtol=1e-12, name="loss")
    assert_close(compiled.detach(), expected.detach(), atol=1e-14, rtol=1e-12, name="compiled")
    assert_close(torch.autograd.grad(loss, es)[0], torch.autograd.grad(expected, es)[0], atol=1e-14, rtol=1e-12, name="grad")


# ---------------------------------------------------------------------------------------------
# the two-pass form behind --segment (ops.attention_class_sums / attention_grad_surrogate), every backend
# ---------------------------------------------------------------------------------------------
# (backend, dtype, tolerance): the Triton kernels compute in fp32
TWO_PASS = [("reference", F64, 1e-12), ("cpu", F64, 1e-12), ("cpu", torch.float32, 1e-5), ("triton", torch.float32, 1e-5)]


@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("p", [1.0, 4.0, 1.5])
@pytest.mark.parametrize("backend_name,dtype,tol", TWO_PASS, ids=[f"{b}-{str(d)[6:]}" for b, d, _ in TWO_PASS])
def test_two_pass_segments_give_the_whole_batch_loss_and_gradient(backend_name, dtype, tol, p, mode):
    """Sum the class sums over segments of 3, form u_k = ∂L/∂m^S_k / n^S_k, back-propagate each segment's
    surrogate: the loss and every layer's gradient equal the whole-batch K2 loss by autograd (float64)."""
    from ddfast.backend import use_backend
    from ddfast.ops.attention_match import attention_class_sums, attention_grad_surrogate

    fr, fs, yr, ys, _, _ = _case(int(p * 7) + (mode == "channel"), zero_map=True)
    fs = [f.to(dtype) for f in fs]
    channels_last = [fs[0].contiguous(memory_format=torch.channels_last), fs[1][:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)]
    weights = [100.0, 30.0]
    leaves = [f.double().requires_grad_(True) for f in channels_last]
    expected = ref.attention_match(fr, leaves, yr, ys, p, mode, weights)
    g_expected = torch.autograd.grad(expected, leaves)
    num_classes = 5
    seg = 3
    with use_backend(backend_name):
        real = attention_class_sums(fr, yr, num_classes, p, mode)
        syn = None
        for s in range(0, len(ys), seg):
            part = attention_class_sums([f[s:s + seg] for f in channels_last], ys[s:s + seg], num_classes, p, mode)
            syn = part if syn is None else [a + b for a, b in zip(syn, part)]
        nr = torch.bincount(yr, minlength=num_classes).double().unsqueeze(1)
        ns = torch.bincount(ys, minlength=num_classes).double().unsqueeze(1)
        both = ((nr > 0) & (ns > 0)).double()
        loss, us = 0.0, []
        for w, sr, ss in zip(weights, real, syn):
            assert sr.dtype == ss.dtype == F64 and ss.shape == (num_classes, sr.shape[1])
            diff = (ss / ns.clamp_min(1) - sr / nr.clamp_min(1)) * both
            loss += w * float(diff.square().sum())
            us.append(2 * w * diff / ns.clamp_min(1))
        grads = [torch.zeros_like(f, dtype=F64) for f in channels_last]
        for s in range(0, len(ys), seg):
            parts = [f[s:s + seg].detach().requires_grad_(True) for f in channels_last]
            surrogate = attention_grad_surrogate(parts, ys[s:s + seg], us, p, mode)
            assert float(surrogate.detach()) == 0.0 and surrogate.dtype == F64
            surrogate.backward()
            for g, part in zip(grads, parts):
                assert part.grad.dtype == dtype and part.grad.shape == part.shape
                g[s:s + seg] = part.grad.double()
    assert abs(loss - float(expected)) <= tol * float(expected)
    for l, (g, ge) in enumerate(zip(grads, g_expected)):
        assert_close(g, ge, tol * float(ge.abs().max()), tol, f"layer {l} gradient")


def test_two_pass_rejects_bad_input():
    from ddfast.ops.attention_match import attention_class_sums, attention_grad_surrogate

    f = torch.randn(4, 2, 3, 3)
    y = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="mode"):
        attention_class_sums([f], y, 2, 1.0, "pixel")
    with pytest.raises(ValueError, match="N = 3 labels"):
        attention_class_sums([f], y[:3], 2)
    with pytest.raises(ValueError, match="1 class gradients for 2 layers"):
        attention_grad_surrogate([f, f], y, [torch.zeros(2, 9)])
    with pytest.raises(ValueError, match="p must be > 0"):
        attention_grad_surrogate([f], y, [torch.zeros(2, 9)], p=0.0)
