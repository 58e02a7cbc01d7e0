"""Kernels of the trainer's hot path: token logprobs and entropy without materialising the logits; and the
low-precision quantizers both the engine and the trainer run (`fp8.py`: blockwise e4m3; `int4.py`: W4A16).

Pure functions of tensors (DESIGN.md): no Redis, no config objects, no process groups. Triton on CUDA, a
chunked torch reference elsewhere.
"""

from miles_stream.kernels.logprobs import naive_token_logprobs, token_logprobs

__all__ = ["naive_token_logprobs", "token_logprobs"]
