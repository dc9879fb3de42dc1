"""CuPy kernels from chunk bytes to engine-ready tensors (issue 5); the only cupy importer.

``decode_anchor`` dequantizes an object's anchor sections straight into the engine's
tensors (``hnd``: transformers' [1, H, T, D] per layer; ``paged``: vLLM's
[2, num_blocks, block_size, H, D] per layer with a slot mapping), and
``refine_residual`` later overwrites them with the full decode. cupy is imported only
when a GPU path runs; without it (or without a GPU) the same calls use the numpy codec.
"""

from lynxkv.gpu.api import AnchorCache, Backend, decode_anchor, gpu_available, refine_residual
from lynxkv.gpu.targets import Layout

__all__ = [
    "AnchorCache",
    "Backend",
    "Layout",
    "decode_anchor",
    "gpu_available",
    "refine_residual",
]
