"""CuPy kernels between chunk bytes and engine tensors (issue 5); the only cupy importer.

``decode_anchor`` dequantizes an object's anchor sections straight into the engine's
tensors (``hnd``: transformers' [1, H, T, D] per layer; ``paged``: vLLM's
[2, num_blocks, block_size, H, D] per layer with a slot mapping), and
``refine_residual`` later overwrites them with the full decode. ``encode`` and
``encode_chunks`` go the other way: per-layer K and V tensors ([T, H, D] or
[1, H, T, D]) to objects, quantized on the GPU (``compare_objects`` counts where their
codes differ from the numpy encoder's). cupy is imported only when a GPU path runs;
without it (or without a GPU) the same calls use the numpy codec.
"""

from lynxkv.gpu.api import AnchorCache, Backend, decode_anchor, gpu_available, refine_residual
from lynxkv.gpu.compare import CodeDiff, compare_objects
from lynxkv.gpu.encode import encode, encode_chunks
from lynxkv.gpu.targets import Layout

__all__ = [
    "AnchorCache",
    "Backend",
    "CodeDiff",
    "Layout",
    "compare_objects",
    "decode_anchor",
    "encode",
    "encode_chunks",
    "gpu_available",
    "refine_residual",
]
