"""Token logprobs and entropy straight from hidden states, without the [tokens, vocab] logits.

    token_logprobs(hidden [N, D], weight [V, D], targets [N], temperature) -> (logp [N], entropy [N])
        z = hidden @ weight.T / temperature        (the output layer, then SGLang's temperature)
        logp = z[target] - logsumexp(z)            entropy = logsumexp(z) - sum(softmax(z) * z)

The naive way materialises z for every token: for 16,384 tokens and a 151,936-token vocabulary that is
10 GB in float32 before softmax makes a second copy. Here tokens go through in chunks of `chunk` rows: one
chunk's logits (in the input dtype) exist at a time, and only three floats per token are kept for the
backward pass (logsumexp, sum(p * z), the target's z). The backward recomputes each chunk's logits, turns them
into d loss / d z in place, and multiplies twice: into d hidden (chunk rows) and into d weight (accumulated in
float32). Per chunk the work is one pass over its logits: a Triton kernel on CUDA (`triton_rows.py`), torch
elsewhere (the CPU reference, float32 arithmetic).

Gradients: d logp / d z_j = [j = target] - p_j;  d entropy / d z_j = -p_j (z_j - sum(p * z)); both / T for
the logits. Extra memory, forward: chunk x V logits (input dtype) + a few floats per token; backward: that
again plus a float32 copy of d weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

CHUNK_BYTES = 256 << 20  # logits of one chunk, in the input dtype


def token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """(logp [N], entropy [N]) in float32 (float64 for float64 inputs), both differentiable in hidden and
    weight. `chunk`: tokens per chunk (default: as many as fit CHUNK_BYTES of logits)."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows = chunk or max(1, CHUNK_BYTES // (weight.shape[0] * weight.element_size()))
    out: tuple[Tensor, Tensor] = _TokenLogprobs.apply(  # type: ignore[no-untyped-call]
        hidden, weight, targets.long().contiguous(), 1.0 / temperature, rows
    )
    return out


def naive_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The same through full float32 logits: the reference for tests and benchmarks."""
    z = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long()[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, inv_t: float, rows: int) -> Any:
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        lse, mean_z, target_z = (torch.empty(n, device=hidden.device, dtype=acc) for _ in range(3))
        for start in range(0, n, rows):
            part = slice(start, min(start + rows, n))
            logits = hidden[part] @ weight.T
            _row_stats(logits, targets[part], inv_t, lse[part], mean_z[part], target_z[part])
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z, target_z)
        ctx.inv_t, ctx.rows = inv_t, rows
        return target_z - lse, lse - mean_z

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor | None, grad_entropy: Tensor | None) -> Any:
        hidden, weight, targets, lse, mean_z, _ = ctx.saved_tensors
        n, acc = hidden.shape[0], lse.dtype
        zeros = torch.zeros(n, device=hidden.device, dtype=acc)
        g_lp = zeros if grad_logp is None else grad_logp.to(acc).contiguous()
        g_h = zeros if grad_entropy is None else grad_entropy.to(acc).contiguous()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        for start in range(0, n, ctx.rows):
            part = slice(start, min(start + ctx.rows, n))
            logits = hidden[part] @ weight.T
            _row_grads(logits, targets[part], ctx.inv_t, lse[part], mean_z[part], g_lp[part], g_h[part])
            if grad_hidden is not None:
                grad_hidden[part] = logits @ weight
            if grad_weight is not None:
                _accumulate(grad_weight, logits.T, hidden[part])
        grad_w = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_w, None, None, None


def _row_stats(logits: Tensor, targets: Tensor, inv_t: float, lse: Tensor, mean_z: Tensor, target_z: Tensor) -> None:
    """Per row of z = logits * inv_t: logsumexp, sum(softmax(z) * z) and z[target], into the given outputs."""
    if logits.is_cuda:
        from miles_stream.kernels.triton_rows import row_stats

        row_stats(logits, targets, inv_t, lse, mean_z, target_z)
        return
    z = logits.to(lse.dtype) * inv_t
    lse.copy_(torch.logsumexp(z, dim=-1))
    mean_z.copy_((torch.softmax(z, dim=-1) * z).sum(-1))
    target_z.copy_(z.gather(-1, targets[:, None]).squeeze(-1))


def _row_grads(
    logits: Tensor, targets: Tensor, inv_t: float, lse: Tensor, mean_z: Tensor, g_lp: Tensor, g_h: Tensor
) -> None:
    """Overwrite `logits` with d loss / d logits, given d loss / d logp (g_lp) and d loss / d entropy (g_h)."""
    if logits.is_cuda:
        from miles_stream.kernels.triton_rows import row_grads

        row_grads(logits, targets, inv_t, lse, mean_z, g_lp, g_h)
        return
    z = logits.to(lse.dtype) * inv_t
    p = torch.exp(z - lse[:, None])
    grad = -(g_lp[:, None] * p) - g_h[:, None] * p * (z - mean_z[:, None])
    grad.scatter_add_(-1, targets[:, None], g_lp[:, None])
    logits.copy_(grad * inv_t)


def _accumulate(total: Tensor, a: Tensor, b: Tensor) -> None:
    """total (float32) += a @ b. On CUDA, low-precision inputs accumulate into float32 inside the matmul
    (cuBLAS with beta = 1): no [V, D] temporary, 0.70 ms instead of 1.11 for one chunk on an H100."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    else:
        total.add_(a @ b)
