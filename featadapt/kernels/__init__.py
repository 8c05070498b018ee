"""Fused kernels behind the kernel backends (see featadapt.ops.dispatch).

Nothing here is imported by `import featadapt` directly: the backend modules in
featadapt.ops import what they need and report why they cannot when that fails.
"""
