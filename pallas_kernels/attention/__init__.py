"""jlora's paged attention kernels on Pallas Mosaic GPU, with their float32 references. Imports only jax."""
from pallas_kernels.attention.common import decode_splits, supports
from pallas_kernels.attention.decode import paged_decode_attention
from pallas_kernels.attention.prefill import BlockMetadata, paged_prefill_attention, prefill_block_metadata
from pallas_kernels.attention.reference import ref_paged_decode_attention, ref_paged_prefill_attention

__all__ = [
    "BlockMetadata",
    "decode_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_block_metadata",
    "ref_paged_decode_attention",
    "ref_paged_prefill_attention",
    "supports",
]
