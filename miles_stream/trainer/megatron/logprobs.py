"""Response-token logprobs and entropy from the output layer of a GPTModel whose vocabulary may be split over
tensor-parallel ranks.

Legend: N response tokens, H hidden, V vocabulary, tp ranks each holding V/tp rows of the output layer.

One rank (tp = 1): the project's fused kernel (`kernels.token_logprobs`, chunked, never [N, V] logits), as the
torch backend uses it. Split vocabulary (tp > 1): each rank computes its [N, V/tp] float32 logits and the three
sums a softmax needs are all-reduced over the TP group, as Megatron's vocab-parallel cross entropy does:

    m = max over ranks of max_v z        (no gradient)
    S = sum over ranks of sum_v exp(z - m)            logsumexp = m + log S
    logp = z[target] (on the rank holding it, summed) - logsumexp
    entropy = logsumexp - sum over ranks of sum_v p z

The hidden state enters through `copy_to_tensor_model_parallel_region` (forward: itself; backward: the
gradients of every rank's vocabulary share summed), the sums through `reduce_from_tensor_model_parallel_region`
(forward: all-reduce; backward: each rank's own share), as Megatron's ColumnParallelLinear and its cross
entropy do; under sequence parallel the hidden states come all-gathered over the TP group instead, and that
gather's backward (a reduce-scatter) is the sum (model.py). The [N, V/tp] logits are materialised per micro-batch:
a chunked kernel for the split vocabulary is not written yet.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from miles_stream.kernels import token_logprobs

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )


def output_logprobs(
    h_NH: Tensor,
    weight_vH: Tensor,
    targets_N: Tensor,
    *,
    temperature: float,
    vocab_start: int,
    tp_group: object,
    tp: int,
    entropy_grad: bool,
    fused: bool = True,
    gathered: bool = False,
) -> tuple[Tensor, Tensor]:
    """(logp [N], entropy [N]) float32; the entropy differentiable only with `entropy_grad`. `gathered`: `h_NH` comes
    out of sequence parallel's gather (sequence.py), whose backward already sums the ranks' gradients."""
    if tp == 1 and fused:
        logp, entropy = token_logprobs(h_NH, weight_vH, targets_N, temperature=temperature)
        return logp, entropy if entropy_grad else entropy.detach()
    if tp > 1 and not gathered:
        h_NH = copy_to_tensor_model_parallel_region(h_NH, group=tp_group)
    z = (h_NH @ weight_vH.T).float() / temperature  # [N, V/tp]
    m = z.detach().max(dim=-1).values
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)

    def total(x: Tensor) -> Tensor:
        return reduce_from_tensor_model_parallel_region(x, group=tp_group) if tp > 1 else x

    e = torch.exp(z - m[:, None])
    s = total(e.sum(dim=-1))
    lse = m + torch.log(s)
    local = targets_N.long() - vocab_start
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1) * inside
    logp = total(picked) - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - total((e * z).sum(dim=-1)) / s
    return logp, entropy if entropy_grad else entropy.detach()
