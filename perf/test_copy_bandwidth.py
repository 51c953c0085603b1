"""The machine's measured copy bandwidth: the yardstick for memory-bound kernels' GB/s."""
from bench import copy_bandwidth_gbs, record


def test_copy_bandwidth():
    nbytes = 100 * 128 * 32 * 32 * 4  # the largest K1 activation, fp32
    gbs = copy_bandwidth_gbs(nbytes)
    row = record("copy", "reference", "fwd", "[100,128,32,32]", "bandwidth", "GB/s", (gbs, gbs, gbs))
    print(f"\ncopy bandwidth on {row['device']}: {gbs:.1f} GB/s")
    assert gbs > 0
