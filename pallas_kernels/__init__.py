"""Multi-LoRA segmented matmul kernels (Pallas Triton on GPU, Pallas Mosaic on TPU, XLA on CPU).

Imports only jax and numpy.
"""
from pallas_kernels.backend import resolve_backend
from pallas_kernels.dispatch import lora_expand, lora_shrink, lora_shrink_expand
from pallas_kernels.metadata import SegmentMetadata, segment_metadata
from pallas_kernels.reference import ref_lora_expand, ref_lora_shrink

__all__ = [
    "SegmentMetadata",
    "lora_expand",
    "lora_shrink",
    "lora_shrink_expand",
    "ref_lora_expand",
    "ref_lora_shrink",
    "resolve_backend",
    "segment_metadata",
]
