"""Fused kernels (Triton on CUDA) with chunked PyTorch references that run on CPU."""
