"""Kernels of the trainer's hot path: token logprobs and entropy without materialising the logits.

Pure functions of tensors (DESIGN.md): no Redis, no config objects, no process groups. Triton on CUDA, a
chunked torch reference elsewhere.
"""

from miles_stream.kernels.logprobs import naive_token_logprobs, token_logprobs

__all__ = ["naive_token_logprobs", "token_logprobs"]
