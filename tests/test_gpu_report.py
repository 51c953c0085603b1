"""ddfast.gpu_report: the --small report (one small shape per kernel family, sm_90) covers every Triton
kernel of kernels/*.py without spills, with occupancies in (0, 1] and hand-countable roofline bytes.

The report runs in a child process without TRITON_INTERPRET (the AOT compilation needs real JIT
functions; this suite interprets them)."""
from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddfast import gpu_report

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _ptxas_missing() -> str:
    try:
        from triton.backends.nvidia import compiler

        path = compiler.get_ptxas(90).path
    except Exception as err:  # noqa: BLE001 - any failure to locate it means no AOT compilation
        return f"ptxas not available ({err})"
    return "" if os.path.exists(path) else f"ptxas not found at {path}"


def _scanned_kernels() -> set[str]:
    """Every @triton.jit function of kernels/*.py that no code calls as a function (device helpers are
    called from kernels; kernels are launched as name[grid]): a scan independent of the report's."""
    found = set()
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        jitted = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                  and any("jit" in ast.unparse(d) for d in f.decorator_list)}
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        found |= {f"{path.stem}.{name}" for name in jitted - called}
    return found


def test_occupancy_by_hand():
    # 154 registers -> 4928 per warp, allocated as 5120: 12 warps' worth, 3 blocks of 4 warps = 12/64
    assert gpu_report.occupancy(154, 16384, 4, gpu_report.SM_LIMITS[90]) == 12 / 64
    # shared memory bound: 100 KB + 1 KB reserved per block -> 2 blocks of 8 warps on sm_90, 1 on sm_80
    assert gpu_report.occupancy(32, 100 * 1024, 8, gpu_report.SM_LIMITS[90]) == 16 / 64
    assert gpu_report.occupancy(32, 100 * 1024, 8, gpu_report.SM_LIMITS[80]) == 8 / 64
    # 1-warp blocks stop at 32 blocks per SM
    assert gpu_report.occupancy(20, 0, 1, gpu_report.SM_LIMITS[90]) == 32 / 64


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> list[dict[str, str]]:
    reason = _ptxas_missing()
    if reason:
        pytest.skip(f"{reason}: the report compiles the kernels for sm_90 with ptxas")
    out = tmp_path_factory.mktemp("gpu_report") / "small.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ddfast.gpu_report", "--small", "--arch", "90", "--csv", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with out.open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_triton_kernel_is_reported(small_report):
    scanned = _scanned_kernels()
    assert scanned == set(gpu_report.triton_kernels())
    assert len(scanned) >= 22  # K1 7, K2 3, K3 4, K4 2, ln_lrelu 6
    reported = {r["kernel"] for r in small_report if r["scope"] == "launch"}
    assert scanned <= reported, f"not in the report: {sorted(scanned - reported)}"


def test_no_spills_and_occupancy_in_range(small_report):
    for r in small_report:
        assert int(r["spills_sm90"]) == 0, (r["kernel"], r["config"])
        assert 0 < float(r["occ_sm90"]) <= 1, (r["kernel"], r["config"])


def test_roofline_bytes_by_hand(small_report):
    # ln_lrelu forward statistics of x [4, 32] fp32 (BLOCK_D = 32, one chunk per sample): x read
    # once, a (mean, M2) partial written per sample
    (line,) = [r for r in small_report if r["kernel"] == "ln_lrelu._fwd_stats_kernel"]
    assert int(line["bytes"]) == 4 * 32 * 4 + 2 * 4 * 4
    assert line["bound"] == "memory"
    assert float(line["h100_sxm_us"]) == pytest.approx(544 / 3.35e12 * 1e6, rel=1e-5)
    # APM head, z [3, 8, 10] fp32 + int64 labels, one program: z read, dz written, one partial
    (line,) = [r for r in small_report if r["kernel"] == "apm_loss._apm_loss_kernel"]
    assert int(line["bytes"]) == 2 * 3 * 8 * 10 * 4 + 8 * 8 + 4
