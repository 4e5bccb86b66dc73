"""Model kernels: each a Triton kernel with a plain-PyTorch reference in the same module."""
