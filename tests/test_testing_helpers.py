"""The shared verification helpers every kernel issue relies on."""
import pytest
import torch

import triton_probe_kernel
from ddfast.testing import aot_compile, assert_close, check_against_reference, describe_mismatch


def test_describe_mismatch_points_at_the_worst_element():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[2, 1] = 0.5
    text = describe_mismatch(actual, expected, atol=1e-3, rtol=0)
    assert "1 of 12 elements" in text
    assert "(2, 1)" in text and "5.000e-01" in text


def test_assert_close_passes_and_fails():
    x = torch.randn(10, dtype=torch.float64)
    assert_close(x.float(), x, atol=1e-6, rtol=1e-6)
    with pytest.raises(AssertionError, match="differs from reference"):
        assert_close(x + 1e-3, x, atol=1e-6, rtol=1e-6)
    nan = torch.tensor([float("nan"), 1.0])
    assert_close(nan, nan.clone(), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="non-finite mismatch"):
        assert_close(torch.tensor([1.0, 1.0]), nan, atol=0, rtol=0)


def test_check_against_reference_catches_a_wrong_gradient():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, grad):
            return grad  # should be 2x·grad

    x = torch.randn(5, requires_grad=True)
    check_against_reference(lambda t: t * t, lambda t: t * t, [x], atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="output 0"):
        check_against_reference(lambda t: t * 3, lambda t: t * t, [x], atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_against_reference(WrongGrad.apply, lambda t: t * t, [x], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compile_reports_registers_without_a_gpu(arch):
    report = aot_compile(
        triton_probe_kernel.scale_kernel,
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32", "BLOCK": "constexpr"},
        {"BLOCK": 256},
        arch,
    )
    assert 0 < report.registers <= 255
    assert report.spills == 0
    assert f"sm_{arch}" in report.log


def test_probe_kernel_runs_under_the_interpreter():
    x = torch.randn(1000)
    y = torch.empty_like(x)
    triton_probe_kernel.scale_kernel[(4,)](x, y, x.numel(), 2.5, BLOCK=256)
    assert_close(y, 2.5 * x.double(), atol=1e-6, rtol=1e-6)
