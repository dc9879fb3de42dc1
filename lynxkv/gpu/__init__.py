"""CuPy kernels from chunk bytes to engine-ready tensors (issue 5); the only cupy importer."""
