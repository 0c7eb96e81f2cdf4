"""The Triton shrink tiling stays within the shared memory a Hopper block has, for every fused rank the default
bank can make, and keeps the measured tiling where it already fits."""

import itertools

import pytest

from jlora.config import DEFAULT_RANK_BUCKETS
from pallas_kernels import tuning


def test_the_h200_failure_is_what_the_budget_counts():
    # H200: a rank-128 bucket's fused q|k|v at d_in 576, bf16, 3 stages asked for 270,336 bytes of 232,448.
    measured = tuning.GpuShrinkBlocks(block_k=128, k_splits=1, num_warps=4, num_stages=3)
    assert tuning.shrink_smem_bytes(measured, 16, 3 * 128, 2) == 270336


@pytest.mark.parametrize("itemsize", [2, 4])
def test_every_default_fused_rank_fits(itemsize):
    for r, fused, T, d_in in itertools.product(DEFAULT_RANK_BUCKETS, (1, 2, 3), (1, 64, 256, 2048, 8192),
                                               (576, 1536, 4096, 14336)):
        blocks = tuning.gpu_shrink_blocks(T, d_in, fused * r, itemsize)
        assert tuning.shrink_smem_bytes(blocks, 16, fused * r, itemsize) <= tuning.GPU_SHRINK_SMEM_BYTES, (r, fused, T)
        assert blocks.block_k >= 16 and blocks.num_stages >= 2


def test_narrow_ranks_keep_the_measured_tiling():
    assert tuning.gpu_shrink_blocks(8192, 4096, 16) == tuning.GpuShrinkBlocks(128, 1, 4, 3)
    assert tuning.gpu_shrink_blocks(64, 4096, 48) == tuning.GpuShrinkBlocks(128, 16, 4, 2)
    assert tuning.gpu_shrink_blocks(2048, 4096, 48) == tuning.GpuShrinkBlocks(128, 4, 4, 3)
