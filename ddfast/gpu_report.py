"""What the Triton kernels will do on a GPU we do not have: ``python -m ddfast.gpu_report``.

For every perf row (the shapes of perf/test_<op>.py) the host launchers of kernels/*.py run on CPU
tensors with every ``@triton.jit`` kernel swapped for a recorder, so each launch is captured with the
grid, arguments, block sizes and num_warps the launcher and its dispatcher (``blocks(...)``,
``patch_blocks``, ``batch_group``, ...) pick; nothing executes. Then:

* every distinct launch configuration is compiled ahead of time for sm_80 / sm_90 in one
  :func:`ddfast.testing.aot_compile_many` call (ptxas registers and spills; Triton's dynamic shared
  memory, which ptxas -v cannot see, from the same compilation's metadata via Triton's cache) and
  turned into a theoretical occupancy with the per-SM limits in :data:`SM_LIMITS`;
* every launch gets a roofline: bytes and flops counted from the kernel's loops for that grid and
  block choice (:data:`_COSTS`), time = max(bytes / bandwidth, flops / peak) on H100 SXM and H200
  (:data:`ROOFS`), summed over the row's launches, beside the CPU time of that perf row in
  perf/results/latest.csv when it exists.

Counting rules: bytes are the elements each load/store touches with its mask on (masked lanes move
nothing), every load counted as if it came from DRAM (L1/L2 reuse ignored: an upper bound where a
kernel re-reads, e.g. resize taps, Gram row tiles, a teacher row per checkpoint); flops are fp32
arithmetic operations per tile element read off the kernel body (add, sub, mul, div, abs, max, exp,
log: 1; tl.dot: 2 per multiply-add; compares, selects and index math: 0) times the tiles the programs
process, masked lanes included (they execute).

Must run without TRITON_INTERPRET (the compilation needs real JIT functions).
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib
import inspect
import math
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO / "perf" / "results" / "gpu_report.csv"
CPU_RESULTS = REPO / "perf" / "results" / "latest.csv"


# ----------------------------------------------------------------------------------------------
# Hardware model
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound resident blocks (CUDA occupancy calculator rules, simplified)."""

    gpu: str
    sms: int
    regs: int = 65536
    smem: int = 0            # shared memory per SM usable by blocks (bytes)
    warps: int = 64
    blocks: int = 32
    reg_granularity: int = 256   # registers are allocated per warp in units of 256
    smem_reserved: int = 1024    # the driver reserves 1 KB of shared memory per block (sm_80+)


SM_LIMITS = {
    80: SmLimits("A100", sms=108, smem=164 * 1024),
    90: SmLimits("H100/H200", sms=132, smem=228 * 1024),
}


@dataclasses.dataclass(frozen=True)
class Roof:
    gpu: str
    key: str  # column prefix
    bytes_per_s: float
    flops_per_s: float  # fp32, non-tensor-core (the kernels' tl.dot uses input_precision="ieee")


ROOFS = (Roof("H100 SXM", "h100_sxm", 3.35e12, 67e12), Roof("H200", "h200", 4.8e12, 67e12))
FLAG_OCCUPANCY = 0.25  # below this on an arch (or any spill) the config is flagged


def occupancy(registers: int, shared_bytes: int, num_warps: int, lim: SmLimits) -> float:
    """Resident warps / max warps per SM for blocks of ``num_warps`` warps: the fewest blocks any of
    registers, shared memory, warp slots and block slots allows."""
    regs_per_warp = -(-max(registers, 1) * 32 // lim.reg_granularity) * lim.reg_granularity
    by_regs = (lim.regs // regs_per_warp) // num_warps
    by_smem = lim.smem // (shared_bytes + lim.smem_reserved)
    blocks = min(by_regs, by_smem, lim.warps // num_warps, lim.blocks)
    return blocks * num_warps / lim.warps


# ----------------------------------------------------------------------------------------------
# Kernel discovery and launch recording
# ----------------------------------------------------------------------------------------------
def triton_kernels() -> dict[str, Any]:
    """Every launched ``@triton.jit`` kernel of kernels/*.py as ``{"module.name": kernel}``: the jit
    functions a host function launches as ``name[grid](...)`` (the rest are device helpers)."""
    from triton.runtime.jit import KernelInterface

    import ddfast.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        subscripted = {node.value.id for node in ast.walk(ast.parse(inspect.getsource(module)))
                       if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)}
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__ and name in subscripted:
                found[f"{info.name}.{name}"] = obj
    return found


def _is_constexpr(kernel: Any, param: str) -> bool:
    annotation = kernel.fn.__annotations__.get(param)  # a string under `from __future__ import annotations`
    return annotation is not None and "constexpr" in str(annotation)


@dataclasses.dataclass
class Launch:
    """One kernel launch as the host launcher issued it."""

    qualname: str                 # "module.kernel"
    kernel: Any
    grid: tuple[int, int, int]
    args: dict[str, Any]          # every parameter by name (runtime values and constexprs)
    num_warps: int

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def specialization(self) -> tuple[dict[str, str], dict[str, Any]]:
        """(signature, constexprs) as Triton's JIT specialises this call: tensors -> pointer types,
        ints -> i32/i64, an int equal to 1 -> a constexpr."""
        from triton.runtime.jit import mangle_type

        sig, consts = {}, {}
        for name, value in self.args.items():
            sig[name] = "constexpr" if _is_constexpr(self.kernel, name) else mangle_type(value, True)
            if sig[name] == "constexpr":
                consts[name] = value
        return sig, consts


class _Recorder:
    """Stands in for a jit kernel in its module: ``kernel[grid](*args, **kwargs)`` records a Launch."""

    def __init__(self, qualname: str, kernel: Any, log: list[Launch]):
        self.qualname, self.kernel, self.log = qualname, kernel, log

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, num_warps: int = 4, **kwargs: Any) -> None:
            params = list(inspect.signature(self.kernel.fn).parameters)
            values = dict(zip(params, args), **kwargs)
            unknown = set(values) - set(params)
            if unknown:  # a launch option this report does not model must not be dropped silently
                raise TypeError(f"{self.qualname}: unmodelled launch arguments {sorted(unknown)}")
            g = tuple(grid(values) if callable(grid) else grid)
            self.log.append(Launch(self.qualname, self.kernel, (g + (1, 1))[:3], values, num_warps))

        return launch


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Swap every launched kernel of kernels/*.py for a recorder while the block runs."""
    log: list[Launch] = []
    kernels = triton_kernels()
    modules = {q: sys.modules[k.fn.__module__] for q, k in kernels.items()}
    try:
        for q, k in kernels.items():
            setattr(modules[q], k.fn.__name__, _Recorder(q, k, log))
        yield log
    finally:
        for q, k in kernels.items():
            setattr(modules[q], k.fn.__name__, k)


# ----------------------------------------------------------------------------------------------
# Rows: what one perf measurement launches (inputs are torch.empty: nothing is computed or touched)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Row:
    op: str      # perf kernel name in latest.csv
    mode: str
    shape: str   # the shape string perf/test_<op>.py records (rows absent from perf get their own)
    run: Callable[[], None]


def _stat_match_row(shape: tuple[int, int, int, int], patch: int, label: str = "") -> Row:
    def run() -> None:
        from ddfast.kernels import stat_match as k

        b, c, h, w = shape
        x = torch.empty(shape)
        cmean, _, pmean, _ = k.stat_match_forward(x, patch)
        gc, gp = torch.empty_like(cmean), torch.empty_like(pmean)
        k.stat_match_backward(x, cmean, gc, gc, pmean if patch else None, gp, gp, patch,
                              float(b * h * w), float(b * c * patch * patch))

    return Row("stat_match", "fwd_bwd", "[" + ",".join(map(str, shape)) + "]" + label, run)


# perf/test_attention_match.py: two layers + embedding, p = 1, spatial, 10 classes
_ATT_LAYERS, _ATT_EMB, _ATT_WEIGHTS = [(128, 32, 32), (128, 16, 16)], 2048, [100.0, 100.0]


def _attention_row(case: str, kind: str, a: int, b: int, layers=_ATT_LAYERS, emb=_ATT_EMB, classes=10) -> Row:
    def run() -> None:
        from ddfast.kernels import attention_match as k

        gen = torch.Generator().manual_seed(0)
        if kind == "sorted":
            yr, ys = torch.arange(classes).repeat_interleave(a), torch.arange(classes).repeat_interleave(b)
        else:
            yr, ys = torch.randint(0, classes, (a,), generator=gen), torch.randint(0, classes, (b,), generator=gen)
        fr = [torch.empty(len(yr), *s) for s in layers]
        fs = [torch.empty(len(ys), *s) for s in layers]
        k.attention_match_forward(fr, fs, yr, ys, classes, 1.0, True, [100.0] * len(layers),
                                  torch.empty(len(yr), emb), torch.empty(len(ys), emb), 1.0, True)

    n_r, n_s = (a * classes, b * classes) if kind == "sorted" else (a, b)
    return Row("attention_match", "fwd_bwd", f"{case}: R{n_r} S{n_s}", run)


def _densify_row(case: str, classes: int, per_class: int, c: int, h: int, pool: int = 32) -> Row:
    def run() -> None:
        from ddfast.kernels import densify as k
        from ddfast.reference.densify import class_layout

        layout = class_layout(torch.arange(classes).repeat_interleave(per_class))
        k.densify_forward(torch.empty(classes * per_class, c, h, h), layout.counts, layout.order, 4.0, pool, True)

    return Row("densify", "fwd_bwd", f"{case}:{classes}cls x{per_class} [{classes * per_class},{c},{h},{h}]", run)


def _apm_row(case: str, k_ckpt: int, n: int, classes: int) -> Row:
    def run() -> None:
        from ddfast.kernels import apm_loss as k

        labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(0))
        k.apm_loss_forward(torch.empty(k_ckpt + 1, n, classes), labels, 1.0 / n, 0.1, False, 1e-8, True)

    return Row("apm_loss", "fwd_bwd", f"{case}: K{k_ckpt} [{k_ckpt + 1},{n},{classes}]", run)


def _ln_lrelu_row(shape: tuple[int, int, int, int], mode: str) -> Row:
    def run() -> None:
        from ddfast.kernels import ln_lrelu as k

        n, d = shape[0], math.prod(shape[1:])
        x, w = torch.empty(n, d), torch.empty(d)
        _, mean, rstd = k.ln_lrelu_forward(x, w, w, 0.01, 1e-5)
        if mode != "fwd":
            k.ln_lrelu_backward(x, x, w, w, mean, rstd, 0.01)
        if mode == "gp":  # WGAN-GP: the create_graph backward above, then its backward
            k.ln_lrelu_double_backward(x, w, w, x, x, w, w, mean, rstd, 0.01)

    return Row("ln_lrelu", mode, "[" + ",".join(map(str, shape)) + "]", run)


def perf_rows() -> list[Row]:
    """The perf rows of perf/test_{stat_match,attention_match,densify,apm_loss,ln_lrelu}.py, plus one
    row for each kernel no perf row launches (K1's patch-0 path, K4's chunked kernel)."""
    rows = [_stat_match_row(s, 4) for s in [(100, 128, 32, 32), (100, 128, 16, 16), (100, 64, 28, 28),
                                             (40, 64, 56, 56), (100, 64, 14, 14), (100, 128, 7, 7), (100, 144, 7, 7)]]
    rows.append(_stat_match_row((100, 128, 32, 32), 0, " patch 0 (BN layers)"))
    rows += [_attention_row("datadam-ipc1", "sorted", 64, 1), _attention_row("datadam-ipc10", "sorted", 64, 10),
             _attention_row("datadam-ipc50", "sorted", 64, 50), _attention_row("d2m", "ragged", 128, 128)]
    rows += [_densify_row("a", 10, 10, 3, 32), _densify_row("b", 100, 10, 3, 32), _densify_row("c", 10, 50, 3, 64)]
    rows += [_apm_row("c10-n100", 5, 100, 10), _apm_row("c10-n1000", 5, 1000, 10), _apm_row("c1000-n256", 5, 256, 1000),
             _apm_row("in21k (chunked)", 5, 256, 21841)]
    rows += [_ln_lrelu_row((192, w, s, s), mode) for w in (64, 196) for s in (28, 14, 7, 4) for mode in ("fwd", "fwd_bwd", "gp")]
    return rows


def small_rows() -> list[Row]:
    """One small shape per kernel family, launching every kernel (the test's set)."""
    return [_stat_match_row((2, 4, 8, 8), 4), _stat_match_row((2, 4, 7, 7), 4), _stat_match_row((2, 4, 8, 8), 0, " patch 0"),
            _attention_row("small", "ragged", 8, 4, layers=[(8, 8, 8)], emb=16, classes=2),
            _densify_row("small", 2, 4, 3, 8, pool=4),
            _apm_row("small", 2, 8, 10), _apm_row("small (chunked)", 2, 2, 5000),
            _ln_lrelu_row((4, 2, 4, 4), "gp")]


# ----------------------------------------------------------------------------------------------
# Roofline: bytes and flops per launch, counted from each kernel's loops
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cost:
    bytes: int
    flops: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _es(a: dict[str, Any], name: str) -> int:
    return a[name].element_size()


def _taps_hi(size: int, out: int) -> list[bool]:
    """Per x' index along a dim: whether its second bilinear tap has a nonzero weight (hi ≥ 0 in
    kernels/stat_match.py's _resize_taps, so the kernel loads it)."""
    return [max((2 * d + 1) * size - out, 0) % (2 * out) > 0 for d in range(out)]


def _bins(size: int, pool: int) -> int:
    """Σ over densify's adaptive pooling bins of their extent along one axis."""
    return sum(_cdiv((o + 1) * size, pool) - o * size // pool for o in range(pool))


def _stat_fwd_patch(l: Launch) -> Cost:
    a = l.args
    C, K, P, G, bk, bj = a["C"], a["K"], a["P"], a["G"], a["BLOCK_K"], a["BLOCK_J"]
    groups, nblk, xs = l.grid[0] // C, l.grid[1], _es(a, "x_ptr")
    # x once; shifts s_c per program and s_k per patch; (count, mean, M2) patch and channel partials
    nbytes = a["B"] * C * K * P * P * xs + groups * C * (nblk + K) * xs + 3 * groups * C * (K + nblk) * 4
    # per tile element: −s_c, Σ, −mean, ², Σ; per patch: mean + Chan merge (9)
    return Cost(nbytes, l.programs * G * _cdiv(P * P, bj) * (5 * bk * bj + 9 * bk))


def _stat_fwd_resize(l: Launch) -> Cost:
    a = l.args
    C, K, P, G, bk, bj = a["C"], a["K"], a["P"], a["G"], a["BLOCK_K"], a["BLOCK_J"]
    groups, nblk, xs = l.grid[0] // C, l.grid[1], _es(a, "x_ptr")
    hh, hw = sum(_taps_hi(a["H"], a["HR"])), sum(_taps_hi(a["W"], a["WR"]))
    taps = (a["HR"] + hh) * (a["WR"] + hw)  # per plane: tap ll always, lh / hl / hh where their weight is > 0
    nbytes = (a["B"] * C * (a["H"] * a["W"] + taps) * xs + groups * C * (nblk + K) * xs
              + 3 * groups * C * (K + nblk) * 4)
    # per element and batch item: channel stats 5, 4 taps − s_c, bilinear blend 11, patch stats 4;
    # per chunk: the two tap weights (div) and the in-x count
    return Cost(nbytes, l.programs * _cdiv(P * P, bj) * (G * (24 * bk * bj + 9 * bk) + 3 * bk * bj))


def _stat_fwd_channel(l: Launch) -> Cost:
    a = l.args
    C, G, tile = a["C"], a["G"], a["BLOCK_H"] * a["BLOCK_W"]
    groups, tiles, xs = l.grid[0] // C, l.grid[1], _es(a, "x_ptr")
    nbytes = a["B"] * C * a["H"] * a["W"] * xs + groups * C * tiles * (xs + 3 * 4)
    return Cost(nbytes, l.programs * G * 5 * tile)


def _stat_merge(l: Launch) -> Cost:
    a = l.args
    br, bn, xs = a["BLOCK_R"], a["BLOCK_N"], _es(a, "x_ptr")
    parts = [(a["rows_c"], a["C"], a["n_c_progs"])]
    if a["HAS_PATCH"]:
        parts.append((a["rows_p"], a["K"], l.programs - a["n_c_progs"]))
    # partials (3 fp32 planes) read once, one shift element and (mean, M2) written per column;
    # per partial element: Σcnt, cnt·mu, Σ, −mean, cnt·dev², Σ, Σq (8); per column: Chan merge (10)
    nbytes = sum(3 * rows * cols * 4 + cols * (xs + 2 * 4) for rows, cols, _ in parts)
    return Cost(nbytes, sum(progs * _cdiv(rows, br) * (8 * br * bn + 10 * bn) for rows, _, progs in parts))


def _stat_bwd_patch(l: Launch) -> Cost:
    a = l.args
    K, P, bk, bj = a["K"], a["P"], a["BLOCK_K"], a["BLOCK_J"]
    planes, nblk = l.grid[0], l.grid[1]  # (b, c) planes × patch blocks
    # per program: 3 channel scalars and (mu_k, g_pmean, g_pvar) of its patches; x in, dx out
    nbytes = planes * (nblk * 3 + K * 3) * 4 + planes * K * P * P * (_es(a, "x_ptr") + _es(a, "dx_ptr"))
    # per element: a_k + b_c(x − mu_c) + b_k(x − mu_k) (6); per patch: a_k, b_k (4)
    return Cost(nbytes, l.programs * (_cdiv(P * P, bj) * 6 * bk * bj + 4 * bk))


def _stat_bwd_channel(l: Launch) -> Cost:
    a = l.args
    tile = a["BLOCK_H"] * a["BLOCK_W"]
    nbytes = l.programs * 3 * 4 + l.grid[0] * a["H"] * a["W"] * (_es(a, "x_ptr") + _es(a, "dx_ptr"))
    return Cost(nbytes, l.programs * 3 * tile)


def _resize_span(start: int, end: int, size: int, out: int) -> tuple[int, int]:
    """kernels/stat_match.py's _resize_span: the x' indices whose taps may reach [start, end)."""
    return (max(start, 1) - 1) * out // size, min(out, ((end + 1) * out + size - 1) // size)


def _stat_bwd_resize(l: Launch) -> Cost:
    a = l.args
    H, W, HR, WR = a["H"], a["W"], a["HR"], a["WR"]
    bh, bw, bj = a["BLOCK_H"], a["BLOCK_W"], a["BLOCK_J"]
    xs, ds = _es(a, "x_ptr"), _es(a, "dx_ptr")
    hi_h, hi_w = _taps_hi(H, HR), _taps_hi(W, WR)
    nbytes = flops = 0
    for h0 in range(0, H, bh):  # one (b, c) plane's tiles; every plane is the same
        i0, i1 = _resize_span(h0, min(h0 + bh, H), H, HR)
        for w0 in range(0, W, bw):
            j0, j1 = _resize_span(w0, min(w0 + bw, W), W, WR)
            nj, njhi = j1 - j0, sum(hi_w[j0:j1])
            rows_hi = sum(hi_h[i0:i1])
            # per x' row: mu_k, g_pmean, g_pvar (fp32) and the 4 taps; then the x tile, dx, 3 scalars
            nbytes += (i1 - i0) * (3 * nj * 4 + (nj + njhi) * xs) + rows_hi * (nj + njhi) * xs
            nbytes += min(bh, H - h0) * min(bw, W - w0) * (xs + ds) + 3 * 4
            # per row: coefficients 3, taps 15, g 2, column weights 3 per j; tap match 2 per (j, w);
            # row adjoint 2 per tile element + 2 per column; epilogue 4 per tile element
            flops += (i1 - i0) * (23 * bj + 2 * bj * bw + 2 * bh * bw + 2 * bw) + 4 * bh * bw
    return Cost(l.grid[0] * nbytes, l.grid[0] * flops)


_POW_OPS = {1: 1, 2: 1, 4: 2, 0: 4}   # |x|^p: abs | x·x | (x·x)² | abs, log2, mul, exp2
_GRAD_OPS = {1: 2, 2: 2, 4: 4, 0: 8}  # p|x|^(p−1)sgn(x)·v


def _attention_steps(a: dict[str, Any]) -> int:
    if a["SPATIAL"]:
        return _cdiv(a["C"], a["BLOCK_R"])
    return _cdiv(a["H"], a["BLOCK_R"] // a["BLOCK_W"]) * _cdiv(a["W"], a["BLOCK_W"])


def _attention_map(l: Launch) -> Cost:
    a = l.args
    n = l.grid[0] // a["n_mblocks"]
    tile = a["BLOCK_R"] * a["BLOCK_M"]
    nbytes = n * a["C"] * a["H"] * a["W"] * _es(a, "x_ptr") + n * a["M"] * 4
    return Cost(nbytes, l.programs * (_attention_steps(a) * tile * (_POW_OPS[a["P_MODE"]] + 1) + tile))


def _attention_grad(l: Launch) -> Cost:
    a = l.args
    n = l.grid[0] // a["n_mblocks"]
    elems = n * a["C"] * a["H"] * a["W"]
    nbytes = elems * (_es(a, "x_ptr") + _es(a, "dx_ptr")) + n * a["M"] * 4
    return Cost(nbytes, l.programs * _attention_steps(a) * a["BLOCK_R"] * a["BLOCK_M"] * _GRAD_OPS[a["P_MODE"]])


def _class_mean(l: Launch) -> Cost:
    a = l.args
    bi, bm, nmb, M = a["BLOCK_I"], a["BLOCK_M"], a["n_mblocks"], a["M"]
    counts = a["seg_ptr"].diff().tolist()
    n = sum(counts)
    # each class's rows once per column block (the blocks split M), its perm entries once per block
    nbytes = n * M * _es(a, "x_ptr") + n * nmb * _es(a, "perm_ptr") + l.programs * 2 * _es(a, "seg_ptr") + len(counts) * M * 4
    return Cost(nbytes, nmb * sum((_cdiv(c, bi) + 1) * bi * bm + bm for c in counts))


def _pool(l: Launch) -> Cost:
    a = l.args
    planes, P = l.grid[0], a["P"]
    nbytes = planes * (_bins(a["H"], P) * _bins(a["W"], P) * _es(a, "img_ptr") + P * P * 4)
    return Cost(nbytes, l.programs * a["BLOCK"] * (a["KH"] * a["KW"] + 1))


def _pool_bwd(l: Launch) -> Cost:
    a = l.args
    planes, P = l.grid[0], a["P"]
    # a pixel reads every bin holding it: Σ over pixels = Σ over bins of their extent
    nbytes = planes * (_bins(a["H"], P) * _bins(a["W"], P) * 4 + a["H"] * a["W"] * _es(a, "dimg_ptr"))
    return Cost(nbytes, l.programs * a["BLOCK"] * a["NH"] * a["NW"] * 2)


def _gram(l: Launch) -> Cost:
    a = l.args
    bn, bd, D = a["BLOCK_N"], a["BLOCK_D"], a["D"]
    os_, xs = _es(a, "order_ptr"), _es(a, "x_ptr")
    nbytes = l.programs * (_es(a, "counts_ptr") + _es(a, "offsets_ptr"))
    flops = 0
    for n in a["counts_ptr"].tolist():
        for ti in range(_cdiv(n, bn)):  # active programs: lower-triangle tiles inside the class
            for tj in range(ti + 1):
                vi, vj = min(bn, n - ti * bn), min(bn, n - tj * bn)
                nbytes += (vi + vj) * (os_ + D * xs) + 2 * vi * vj * 8  # G tile and its mirror, fp64
                flops += _cdiv(D, bd) * (2 * bn * bn * bd + bn * bn)
    return Cost(nbytes, flops)


def _dx(l: Launch) -> Cost:
    a = l.args
    bm, bj, bd, D = a["BLOCK_M"], a["BLOCK_J"], a["BLOCK_D"], a["D"]
    os_, xs, outs = _es(a, "order_ptr"), _es(a, "x_ptr"), _es(a, "out_ptr")
    nbytes = l.programs * (_es(a, "counts_ptr") + _es(a, "offsets_ptr"))
    flops = 0
    for n in a["counts_ptr"].tolist():
        for tm in range(_cdiv(n, bm)):
            vi = min(bm, n - tm * bm)
            # over the feature tiles (which split D): coefficients and member indices per tile,
            # member rows, the output rows
            nbytes += l.grid[2] * (vi * n * 4 + n * os_ + vi * os_) + D * (n * xs + vi * outs)
            flops += l.grid[2] * _cdiv(n, bj) * (2 * bm * bj * bd + bm * bd)
    return Cost(nbytes, flops)


def _apm(l: Launch) -> Cost:
    a = l.args
    K, N, C, grad = a["K"], a["N"], a["C"], a["WITH_GRAD"]
    zs = _es(a, "z_ptr")
    nbytes = (K + 1) * N * C * zs + N * _es(a, "labels_ptr") + l.programs * 4
    if grad:
        nbytes += (K + 1) * N * C * _es(a, "dz_ptr")
    tile = a["BLOCK_N"] * a["BLOCK_C"]
    # teacher: max, −max, exp, Σ, t_y (5); per checkpoint: −t, abs, Σ, sgn, ·g (5) + ·inv_batch, acc (2);
    # dT: exp, −, /, −onehot, ·α, −acc, ·inv_batch (7)
    return Cost(nbytes, l.programs * tile * (5 + K * (5 + 2 * grad) + 7 * grad))


def _apm_chunked(l: Launch) -> Cost:
    a = l.args
    K, N, C, grad, log, bc = a["K"], a["N"], a["C"], a["WITH_GRAD"], a["LOG"], a["BLOCK_C"]
    zs, chunks = _es(a, "z_ptr"), _cdiv(a["C"], a["BLOCK_C"])
    # per row: label, T[0], t_y; pass 1 the teacher; pass 2 teacher + checkpoint per k; pass 3 the
    # teacher, every checkpoint, g_k per chunk (log) and dz; g_k stores (log); the partial
    per_row = _es(a, "labels_ptr") + 2 * zs + C * zs + 2 * K * C * zs + 4
    if grad:
        per_row += (K + 1) * C * zs + log * K * (chunks + 1) * 4 + (K + 1) * C * _es(a, "dz_ptr")
    flops = chunks * bc * (4 + 3 * K + grad * (4 * K + 7))
    return Cost(N * per_row, N * flops)


def _ln_fwd_stats(l: Launch) -> Cost:
    a = l.args
    N, D, P = l.grid[0], a["D"], a["P"]
    return Cost(N * D * _es(a, "x_ptr") + 2 * N * P * 4, l.programs * 4 * a["BLOCK_D"])


def _ln_fwd(l: Launch) -> Cost:
    a = l.args
    N, D, P, bp = l.grid[0], a["D"], a["P"], a["BLOCK_P"]
    # every program re-reads its sample's partials (mean pass, M2 pass); x, γ, β in; y out; mean, rstd
    nbytes = N * P * 3 * P * 4 + N * D * (_es(a, "x_ptr") + 2 * 4 + _es(a, "y_ptr")) + 2 * N * 4
    return Cost(nbytes, l.programs * (7 * bp * _cdiv(P, bp) + 5 * a["BLOCK_D"]))


def _ln_bwd_sums(l: Launch) -> Cost:
    a = l.args
    N, D, P = a["N"], a["D"], a["P"]
    nbytes = N * D * (_es(a, "x_ptr") + _es(a, "g_ptr") + 2 * 4) + l.programs * 2 * 4 + 2 * N * P * 4
    return Cost(nbytes, l.programs * 9 * a["BLOCK_D"])


def _ln_bwd_cols(l: Launch) -> Cost:
    a = l.args
    N, D, P, bp = a["N"], a["D"], a["P"], a["BLOCK_P"]
    nb = l.grid[1]
    # γ, β per program; per (chunk, sample): its 2·P partials, mean, rstd; x, g in, dx out; dγ, dβ partials
    nbytes = (nb * D * 2 * 4 + P * N * (2 * P + 2) * 4 + N * D * (_es(a, "x_ptr") + _es(a, "g_ptr") + _es(a, "dx_ptr"))
              + 2 * nb * D * 4)
    return Cost(nbytes, P * N * (13 * a["BLOCK_D"] + 2 * bp * _cdiv(P, bp)))


def _ln_dbl_sums(l: Launch) -> Cost:
    a = l.args
    N, D, P = a["N"], a["D"], a["P"]
    nbytes = (N * D * (_es(a, "x_ptr") + _es(a, "g_ptr") + _es(a, "u_ptr") + 3 * 4) + l.programs * 2 * 4
              + 7 * N * P * 4)
    return Cost(nbytes, l.programs * 18 * a["BLOCK_D"])


def _ln_dbl_cols(l: Launch) -> Cost:
    a = l.args
    N, D, P, bp = a["N"], a["D"], a["P"], a["BLOCK_P"]
    nb = l.grid[1]
    io = _es(a, "x_ptr") + _es(a, "g_ptr") + _es(a, "u_ptr") + _es(a, "dg_ptr") + _es(a, "dx_ptr")
    nbytes = nb * D * 4 * 4 + P * N * (7 * P + 2) * 4 + N * D * io + nb * D * 4
    return Cost(nbytes, P * N * (27 * a["BLOCK_D"] + 7 * bp * _cdiv(P, bp)))


_COSTS: dict[str, Callable[[Launch], Cost]] = {
    "stat_match._stat_fwd_patch_kernel": _stat_fwd_patch,
    "stat_match._stat_fwd_resize_kernel": _stat_fwd_resize,
    "stat_match._stat_fwd_channel_kernel": _stat_fwd_channel,
    "stat_match._stat_merge_kernel": _stat_merge,
    "stat_match._stat_bwd_patch_kernel": _stat_bwd_patch,
    "stat_match._stat_bwd_channel_kernel": _stat_bwd_channel,
    "stat_match._stat_bwd_resize_kernel": _stat_bwd_resize,
    "attention_match._attention_map_kernel": _attention_map,
    "attention_match._attention_grad_kernel": _attention_grad,
    "attention_match._class_mean_kernel": _class_mean,
    "densify._pool_kernel": _pool,
    "densify._gram_kernel": _gram,
    "densify._dx_kernel": _dx,
    "densify._pool_bwd_kernel": _pool_bwd,
    "apm_loss._apm_loss_kernel": _apm,
    "apm_loss._apm_loss_chunked_kernel": _apm_chunked,
    "ln_lrelu._fwd_stats_kernel": _ln_fwd_stats,
    "ln_lrelu._fwd_kernel": _ln_fwd,
    "ln_lrelu._bwd_sums_kernel": _ln_bwd_sums,
    "ln_lrelu._bwd_cols_kernel": _ln_bwd_cols,
    "ln_lrelu._dbl_sums_kernel": _ln_dbl_sums,
    "ln_lrelu._dbl_cols_kernel": _ln_dbl_cols,
}


def cost(launch: Launch) -> Cost:
    if launch.qualname not in _COSTS:
        raise KeyError(f"no roofline cost model for {launch.qualname}: add one to ddfast.gpu_report._COSTS")
    return _COSTS[launch.qualname](launch)


def roofline_us(c: Cost, roof: Roof) -> tuple[float, str]:
    """(predicted µs, "memory" | "compute") of one launch."""
    t_mem, t_flop = c.bytes / roof.bytes_per_s, c.flops / roof.flops_per_s
    return max(t_mem, t_flop) * 1e6, "memory" if t_mem >= t_flop else "compute"


# ----------------------------------------------------------------------------------------------
# Compilation and the report
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    spills: int
    shared_bytes: int
    occupancy: float


def _config_key(l: Launch) -> tuple:
    sig, consts = l.specialization()
    return (l.qualname, tuple(sig.items()), tuple(consts.items()), l.num_warps)


def _config_label(l: Launch) -> str:
    _, consts = l.specialization()
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items())


def compile_configs(launches: Sequence[Launch], archs: Sequence[int]) -> dict[tuple, dict[int, Resources]]:
    """ptxas registers/spills, Triton's shared memory and the occupancy of every distinct launch
    configuration per arch, from one aot_compile_many call."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ddfast.testing import AotRequest, aot_compile_many

    configs = {_config_key(l): l for l in launches}
    requests = [(key, arch, AotRequest(l.kernel, *l.specialization(), arch, l.num_warps))
                for key, l in configs.items() for arch in archs]
    reports = aot_compile_many([r for _, _, r in requests])
    out: dict[tuple, dict[int, Resources]] = {}
    for (key, arch, req), rep in zip(requests, reports):
        # Triton's shared memory is dynamic (ptxas -v reports 0): read it from the compilation's
        # metadata, which this identical compile finds in Triton's cache.
        compiled = triton.compile(ASTSource(req.kernel, req.signature, req.constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": req.num_warps})
        smem = rep.shared_bytes + compiled.metadata.shared
        occ = occupancy(rep.registers, smem, req.num_warps, SM_LIMITS[arch])
        out.setdefault(key, {})[arch] = Resources(rep.registers, rep.spills, smem, occ)
    return out


def _flags(res: dict[int, Resources]) -> str:
    flags = []
    for arch, r in sorted(res.items()):
        if r.spills:
            flags.append(f"SPILL sm_{arch}")
        if r.occupancy < FLAG_OCCUPANCY:
            flags.append(f"OCC<{FLAG_OCCUPANCY:.0%} sm_{arch}")
    return ", ".join(flags)


def _cpu_times(path: Path) -> dict[tuple[str, str, str], float]:
    """(op, mode, shape) -> p50 ms of the ddfast provider, the last such row of latest.csv."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {(r["kernel"], r["mode"], r["shape"]): float(r["p50"]) for r in csv.DictReader(f)
                if r["provider"] == "ddfast" and r["metric"] == "time"}


def build_report(rows: Sequence[Row], archs: Sequence[int], cpu_csv: Path = CPU_RESULTS) -> list[dict[str, Any]]:
    """One record per (row, kernel configuration) ("launch" scope) and one per row ("row" scope)."""
    recorded: list[tuple[Row, list[Launch]]] = []
    for row in rows:
        with recording() as log:
            row.run()
        recorded.append((row, log))
    launched = {l.qualname for _, log in recorded for l in log}
    missing = sorted(set(triton_kernels()) - launched)
    if missing:
        raise RuntimeError(f"no row launches {missing}: add a row that does (perf_rows / small_rows)")
    resources = compile_configs([l for _, log in recorded for l in log], archs)
    cpu = _cpu_times(cpu_csv)
    sm = SM_LIMITS[max(archs)]

    records = []
    for row, log in recorded:
        groups: dict[tuple, list[Launch]] = {}
        for l in log:
            groups.setdefault(_config_key(l), []).append(l)
        base = dict(op=row.op, mode=row.mode, shape=row.shape)
        row_recs = []
        for key, ls in groups.items():
            costs = [cost(l) for l in ls]
            rec = dict(base, scope="launch", kernel=ls[0].qualname, config=_config_label(ls[0]),
                       warps=ls[0].num_warps, launches=len(ls), programs=sum(l.programs for l in ls),
                       bytes=sum(c.bytes for c in costs), flops=sum(c.flops for c in costs))
            for arch, r in resources[key].items():
                rec.update({f"regs_sm{arch}": r.registers, f"spills_sm{arch}": r.spills,
                            f"smem_sm{arch}": r.shared_bytes, f"occ_sm{arch}": r.occupancy})
            blocks_per_sm = round(resources[key][max(archs)].occupancy * sm.warps / ls[0].num_warps)
            rec["waves"] = max(l.programs for l in ls) / (sm.sms * max(blocks_per_sm, 1))
            for roof in ROOFS:
                times = [roofline_us(c, roof) for c in costs]
                rec[f"{roof.key}_us"] = sum(t for t, _ in times)
                if roof == ROOFS[0]:  # the bound is stated for the first GPU (H200's ridge point is lower)
                    rec["bound"] = max(("memory", "compute"), key=lambda b: sum(t for t, kind in times if kind == b))
            rec["flag"] = _flags(resources[key])
            row_recs.append(rec)
        total = dict(base, scope="row", kernel="(all)", launches=len(log), programs=sum(l.programs for l in log),
                     bytes=sum(r["bytes"] for r in row_recs), flops=sum(r["flops"] for r in row_recs),
                     cpu_ms=cpu.get((row.op, row.mode, row.shape)))
        for arch in archs:
            total[f"regs_sm{arch}"] = max(r[f"regs_sm{arch}"] for r in row_recs)
            total[f"spills_sm{arch}"] = sum(r[f"spills_sm{arch}"] for r in row_recs)
            total[f"smem_sm{arch}"] = max(r[f"smem_sm{arch}"] for r in row_recs)
            total[f"occ_sm{arch}"] = min(r[f"occ_sm{arch}"] for r in row_recs)
        for roof in ROOFS:
            total[f"{roof.key}_us"] = sum(r[f"{roof.key}_us"] for r in row_recs)
        main = ROOFS[0].key + "_us"
        total["bound"] = max(("memory", "compute"), key=lambda b: sum(r[main] for r in row_recs if r["bound"] == b))
        total["flag"] = "; ".join(sorted({r["flag"] for r in row_recs if r["flag"]}))
        records += [*row_recs, total]
    return records


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _columns(archs: Sequence[int]) -> list[str]:
    per_arch = [f"{m}_sm{a}" for a in archs for m in ("regs", "spills", "smem", "occ")]
    return ["scope", "op", "mode", "shape", "kernel", "config", "warps", "launches", "programs", "waves", *per_arch,
            "bytes", "flops", "bound", *(f"{r.key}_us" for r in ROOFS), "cpu_ms", "flag"]


def write_csv(records: Sequence[dict[str, Any]], archs: Sequence[int], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, _columns(archs), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in records)


def _fmt(v: Any, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def tables(records: Sequence[dict[str, Any]], archs: Sequence[int]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(kernel header, kernel rows, perf-row header, perf rows): one line per distinct kernel
    configuration, one per row."""
    k_head = ["kernel", "config", "warps", *(f"sm_{a} regs/spill/smem/occ" for a in archs), "flag"]
    seen, k_rows = set(), []
    for r in records:
        if r["scope"] == "launch" and (r["kernel"], r["config"], r["warps"]) not in seen:
            seen.add((r["kernel"], r["config"], r["warps"]))
            k_rows.append([r["kernel"], r["config"], str(r["warps"]),
                           *(f"{r[f'regs_sm{a}']}/{r[f'spills_sm{a}']}/{r[f'smem_sm{a}']}/{r[f'occ_sm{a}']:.0%}" for a in archs),
                           r["flag"]])
    r_head = ["op", "mode", "shape", "launches", "MB", "MFLOP", "flop/B", "bound", *(f"{x.gpu} µs" for x in ROOFS),
              "CPU ms", f"min occ sm_{max(archs)}", "flag"]
    r_rows = [[r["op"], r["mode"], r["shape"], str(r["launches"]), f"{r['bytes'] / 1e6:.2f}", f"{r['flops'] / 1e6:.1f}",
               f"{r['flops'] / r['bytes']:.2f}", r["bound"], *(f"{r[f'{x.key}_us']:.2f}" for x in ROOFS),
               _fmt(r["cpu_ms"], ".2f"), f"{r[f'occ_sm{max(archs)}']:.0%}", r["flag"]]
              for r in records if r["scope"] == "row"]
    return k_head, k_rows, r_head, r_rows


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-" * sum(w + 2 for w in widths), *map(line, rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)])


DOC = """# Triton kernels on GPUs we do not have

Generated by `python -m ddfast.gpu_report --markdown docs/gpu.md` (do not edit by hand; the CSV with
every (row, kernel) line is `perf/results/gpu_report.csv`).

No GPU runs here, so this page predicts what the Triton kernels will do on one. For every perf row
(the shapes of `perf/test_{stat_match,attention_match,densify,apm_loss,ln_lrelu}.py`, plus one row for
each kernel no perf row launches) the host launchers in `kernels/*.py` run on CPU tensors with the
kernels swapped for recorders: each launch is captured with exactly the grid, block sizes and
num_warps the launcher and its dispatcher (`blocks(...)`, `patch_blocks`, `batch_group`, ...) choose.

**Resources.** Every distinct launch configuration (constexprs, and the integer arguments equal to 1
that Triton's JIT turns into constexprs) is compiled ahead of time for sm_80 and sm_90 with ptxas
(`ddfast.testing.aot_compile_many`): registers and spill bytes from `ptxas -v`, shared memory = the
dynamic shared memory Triton allocates (ptxas cannot see it). Theoretical occupancy = resident warps
/ 64 with the per-SM limits of A100 (sm_80: 65536 registers, 164 KB shared memory, 64 warps, 32
blocks) and H100/H200 (sm_90: 65536 registers, 228 KB, 64 warps, 32 blocks), registers allocated per
warp in units of 256 and 1 KB of shared memory reserved per block. Flagged: any spill, or occupancy
below 25 %.

**Roofline.** Per launch, bytes and flops are counted from the kernel's loops for that grid and block
choice (`ddfast/gpu_report.py`, `_COSTS`): bytes = the elements each load and store touches with its
mask on; flops = fp32 operations per tile element read off the kernel body (add, sub, mul, div, abs,
max, exp, log count 1, `tl.dot` 2 per multiply-add; compares, selects and index arithmetic 0) times
the tiles the programs process, masked lanes included. Predicted time = max(bytes / bandwidth, flops
/ peak) per launch, summed over the row's launches, on H100 SXM (3.35 TB/s, 67 TFLOP/s fp32
non-tensor) and H200 (4.8 TB/s, same flops); "bound" says which term dominates on H100 SXM. "CPU ms" is the ddfast provider's median in
`perf/results/latest.csv` (the C++/OpenMP backend on this machine) when that file has the row.

**Limits of the model.**
* No cache: every load counts as DRAM traffic (L1/L2 reuse ignored), an upper bound where a kernel
  re-reads data (K1's bilinear taps, the Gram kernel's row tiles, K4's teacher row per checkpoint,
  ln_lrelu's γ/β per sample); 32-byte sector granularity and uncoalesced strides are ignored too.
* Peak rates are assumed reachable: no launch latency (~2-5 µs per launch, which dominates the small
  rows; see the launch counts), no tail effect (`waves` in the CSV is programs / (132 SMs ×
  resident blocks); below 1 the grid cannot fill an H100), no latency-bound phases.
* Only the Triton kernels are counted: the host-side torch ops between them (K2's normalisation and
  loss on [N, M] tensors, K3's eigensolve and softmaxes, partial sums) are not.
* The Gram kernel's float64 accumulation is counted as fp32 flops (H100's fp64 rate is half).
* The AOT compilation lacks the divisibility-by-16 hints Triton's JIT derives on a GPU from aligned
  pointers and from integer arguments that are multiples of 16 (`ddfast.testing.AotRequest` has no
  attributes field), so global loads compile unvectorised. Compiling the perf configurations for sm_90
  with those hints once by hand moved registers both ways: K1's patch forward/backward 64 -> 32, K1's
  merge 54 -> 71, ln_lrelu's `_bwd_cols` 60 -> 50 and `_dbl_cols` 98 -> 91, K2 and K4 within ±2.
  Treat register and occupancy figures as those of the unhinted build.
"""


def summary(records: Sequence[dict[str, Any]], archs: Sequence[int]) -> str:
    launch = [r for r in records if r["scope"] == "launch"]
    configs = {(r["kernel"], r["config"], r["warps"]) for r in launch}
    parts = [f"{len({r['kernel'] for r in launch})} kernels in {len(configs)} configurations"]
    for a in archs:
        worst = min(launch, key=lambda r: r[f"occ_sm{a}"])
        spills = sorted({r["kernel"] for r in launch if r[f"spills_sm{a}"]})
        parts.append(f"sm_{a}: spills in {', '.join(spills) or 'none'}, lowest occupancy "
                     f"{worst[f'occ_sm{a}']:.0%} ({worst['kernel']} {worst['config']})")
    return "; ".join(parts) + "."


def write_markdown(records: Sequence[dict[str, Any]], archs: Sequence[int], path: Path) -> None:
    k_head, k_rows, r_head, r_rows = tables(records, archs)
    path.write_text(DOC + "\n**Summary.** " + summary(records, archs) + "\n\n## Kernel configurations\n\n"
                    + _md_table(k_head, k_rows) + "\n\n## Roofline per row\n\n" + _md_table(r_head, r_rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.gpu_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SM_LIMITS), default=sorted(SM_LIMITS))
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--small", action="store_true", help="one small shape per kernel family (the test's set)")
    parser.add_argument("--markdown", type=Path, help="also rewrite this markdown page (docs/gpu.md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1: the AOT compilation needs Triton's real JIT functions")
    archs = sorted(set(args.arch))
    records = build_report(small_rows() if args.small else perf_rows(), archs)
    write_csv(records, archs, args.csv)
    k_head, k_rows, r_head, r_rows = tables(records, archs)
    print(_text_table(k_head, k_rows) + "\n\n" + _text_table(r_head, r_rows) + "\n\n" + summary(records, archs))
    print(f"\nCSV: {args.csv}")
    if args.markdown:
        write_markdown(records, archs, args.markdown)
        print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
