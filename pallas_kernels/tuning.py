"""Block sizes per backend and shape, kept apart from the kernel logic."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuShrinkBlocks:
  """Triton shrink tiling: block_k columns of x per step, k_splits programs share one tile's d_in."""
  block_k: int
  k_splits: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class GpuExpandBlocks:
  """Triton expand tiling: block_n output columns per program."""
  block_n: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
  """Mosaic tiling: (8,128)-aligned blocks."""
  block_k: int
  block_n: int


def block_t(num_tokens: int, backend: str) -> int:
  """Tokens per tile. Shared by shrink and expand, so one metadata serves a whole step."""
  if backend in ("mosaic", "interpret_mosaic"):
    preferred = 16 if num_tokens <= 256 else 128
    for cand in (preferred, preferred // 2, preferred // 4, preferred // 8, preferred // 16):
      if cand >= 8 and num_tokens % cand == 0:
        return cand
    if num_tokens <= 512:
      return num_tokens  # a block as tall as the whole array is always legal
    return preferred  # the Mosaic wrapper pads the rows (engines pad T to buckets anyway)
  if backend in ("mosaic_gpu", "interpret_mosaic_gpu"):
    return 64  # wgmma's M: a tile is a slot's rows of one 64-row block (aligned tables)
  # Triton: 16-token tiles measured best on the H100 for decode and for T=8192 (shrink 34.6 us at d=4096,
  # r=16, 128 adapters); A and B re-reads per tile are served from L2. 32-token tiles (with a 4-way split shrink)
  # made expands over many short segments 10-50% slower at T >= 1024.
  return 16


# Shared memory a Triton shrink may ask for, under Hopper's 227 KiB per block. Its pipeline holds num_stages - 1
# copies of the x tile [block_t, block_k] and the A tile [block_k, rank padded to a power of two]: on the H200, a
# rank-128 bucket's fused q|k|v (384 -> 512 columns) at block_k 128 and 3 stages asked for exactly
# 2 * 128 * (16 + 512) * 2 = 270,336 bytes and failed. Float32 operands need more than this count (240 KiB at
# rank 48, below), so they keep their own halved tiling first.
GPU_SHRINK_SMEM_BYTES = 200 * 1024


def shrink_smem_bytes(blocks: GpuShrinkBlocks, block_t: int, rank: int, itemsize: int) -> int:
  rank_p = max(16, 1 << max(0, rank - 1).bit_length())  # as triton_lora._padded
  return max(1, blocks.num_stages - 1) * blocks.block_k * (block_t + rank_p) * itemsize


def gpu_shrink_blocks(num_tokens: int, d_in: int, rank: int, itemsize: int = 2, block_t: int = 16
                      ) -> GpuShrinkBlocks:
  """The measured tiling for this shape, with block_k halved (then stages cut) until the pipeline's shared memory
  fits GPU_SHRINK_SMEM_BYTES (wide fused ranks)."""
  blocks = _gpu_shrink_tiling(num_tokens, d_in, rank, itemsize)
  while shrink_smem_bytes(blocks, block_t, rank, itemsize) > GPU_SHRINK_SMEM_BYTES and blocks.block_k > 16:
    blocks = dataclasses.replace(blocks, block_k=blocks.block_k // 2)
  while shrink_smem_bytes(blocks, block_t, rank, itemsize) > GPU_SHRINK_SMEM_BYTES and blocks.num_stages > 2:
    blocks = dataclasses.replace(blocks, num_stages=blocks.num_stages - 1)
  return blocks


def _gpu_shrink_tiling(num_tokens: int, d_in: int, rank: int, itemsize: int = 2) -> GpuShrinkBlocks:
  if itemsize >= 4:
    # float32 operands take twice the shared memory per stage: the bf16 decode tiling asks for 240 KiB
    # at rank 48 (fused qkv) and fails on Hopper's 227 KiB, so halve the K block and keep two stages.
    bf16 = _gpu_shrink_tiling(num_tokens, d_in, rank)
    return dataclasses.replace(bf16, block_k=max(16, bf16.block_k // 2), num_stages=2)
  if num_tokens <= 256 and d_in >= 2048:
    # Decode: few tiles when few adapters are in the batch, so split d_in 16 ways over programs per tile. H100
    # (kernels_tune_decode_h100.json): one adapter at T=16, d=4096 5.6 -> 3.3 us against 2 splits of 256, at d=14336
    # 13.6 -> 5.9 us; 64 adapters (the engine's q|k|v, R=48) 13.3 us either way. The 16 partial sums cost a Triton
    # expand more than they save (engine decode 6232 against 6565 tok/s), so they go to XLA's gather expand.
    return GpuShrinkBlocks(block_k=128, k_splits=16, num_warps=4, num_stages=2)
  if num_tokens <= 4096 and d_in >= 2048:
    # Mid-sized prefill: one long segment makes too few programs for the GPU, so split d_in 4 ways per tile
    # (H100, one adapter at T=2048: 15.9 -> 10.4 us at d=4096, 50.6 -> 28.0 us at d=14336). At T=8192 there are
    # programs enough, and the split cost 5-8% (kernels_h100_r16_prefill_split.json).
    return GpuShrinkBlocks(block_k=128, k_splits=4, num_warps=4, num_stages=3)
  return GpuShrinkBlocks(block_k=128, k_splits=1, num_warps=4, num_stages=3)


def mosaic_gpu_shrink_splits(num_tokens: int, d_in: int) -> int:
  """Programs per row block that share the Mosaic GPU shrink's d_in. A first guess copied from the Triton
  tiling's H100 measurements (decode-sized steps have one or a few row blocks); not yet measured on Mosaic."""
  if d_in < 2048:
    return 1
  return 16 if num_tokens <= 256 else 4 if num_tokens <= 4096 else 1


def gpu_expand_blocks(num_tokens: int, d_out: int, rank: int, itemsize: int = 2) -> GpuExpandBlocks:
  # H100: bn=128 with 4 warps was best or within 5% at T=256 and T=8192 for one expand alone; in the model's decode
  # groups (shrink + expand over the stacked bank) bn=256 was 3-10% faster (decode_group_sweep_h100.json).
  return GpuExpandBlocks(block_n=256 if num_tokens <= 256 else 128, num_warps=4, num_stages=2)


# How decode-sized GPU steps (at most 256 tokens) run the fused expand, unless the caller says otherwise: "gather"
# (XLA's gather-einsum, `xla.gather_lora_expand`) or "triton" (the tiled kernel). H100: XLA's fusion was faster than
# the tiled kernel (and than a Triton program per token, since removed) on every T <= 256 case alone
# (kernels_h100_r16.json), and level in the engine's decode (decode_sweep_expand_h100.json,
# decode_sweep_split16_h100.json).
DEFAULT_DECODE_EXPAND = "gather"
DECODE_EXPANDS = ("gather", "triton")


def gpu_expand_variant(num_tokens: int, decode_expand: str) -> str:
  """The expand variant for a step of num_tokens tokens on GPU: `decode_expand` for decode-sized steps."""
  if decode_expand not in DECODE_EXPANDS:
    raise ValueError(f"decode_expand must be one of {DECODE_EXPANDS}, got {decode_expand!r}")
  return decode_expand if num_tokens <= 256 else "triton"


def tpu_blocks(d_in: int, d_out: int) -> TpuBlocks:
  return TpuBlocks(block_k=min(512, d_in), block_n=min(512, d_out))
