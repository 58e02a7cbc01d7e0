"""Per-token logprobs of the response tokens under a Hugging Face causal LM.

Only the response positions go through the output layer. With `fused` (the default, where the output
layer is a plain bias-free linear, as in Llama, Qwen and Mistral) their logprobs and entropy come from the
hidden states through `kernels.token_logprobs`, chunk by chunk, never holding the [b, T, V] logits; without,
a micro-batch's full-vocabulary float32 logits [b, T, V] are materialised. Shapes as in `batch.py`; V is the
vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from miles_stream.kernels import token_logprobs
from miles_stream.trainer.torch.inputs import MicroInputs

# A model sharded by FSDP (trainer/torch/fsdp.py) carries this function as a registered forward method under
# this name: the output layer's weight is read outside any module's forward below, so the sharded root must
# gather its parameters (and hook their gradients) around the whole function, as it does around `forward`.
SHARDED_ENTRY = "sharded_response_logprobs"
# A model that packs sequences itself (the Megatron backend's GPTModel wrapper: its logprob entry hands
# `MicroInputs.cu_seqlens` to its own attention) carries this attribute, True: no Hugging Face attention to switch.
PACKS_ITSELF = "packs_sequences_itself"


def response_logprobs(
    model: Any, x: MicroInputs, *, temperature: float, entropy_grad: bool = False, fused: bool = True
) -> tuple[Tensor, Tensor]:
    """(logp_bT, entropy_bT): log_softmax(logits / temperature) at each response token, and the entropy of
    that distribution (differentiable only with `entropy_grad`). Values past a response's end are garbage
    and must be masked by the caller."""
    sharded = getattr(model, SHARDED_ENTRY, None)
    if sharded is not None:
        out: tuple[Tensor, Tensor] = sharded(x, temperature=temperature, entropy_grad=entropy_grad, fused=fused)
        return out
    return logprobs_of(model, x, temperature=temperature, entropy_grad=entropy_grad, fused=fused)


def logprobs_of(
    model: Any, x: MicroInputs, *, temperature: float, entropy_grad: bool = False, fused: bool = True
) -> tuple[Tensor, Tensor]:
    """`response_logprobs` itself (the model's parameters whole, or gathered around this call)."""
    h_bTH = response_hidden(model.base_model, x)
    head = model.get_output_embeddings()
    if fused and type(head) is torch.nn.Linear and getattr(head, "bias", None) is None:
        b, t, width = h_bTH.shape
        weight = head.weight
        if torch.is_autocast_enabled(h_bTH.device.type):  # the kernel is not autocast's: cast as it would
            dtype = torch.get_autocast_dtype(h_bTH.device.type)
            h_bTH, weight = h_bTH.to(dtype), weight.to(dtype)
        logp, entropy = token_logprobs(h_bTH.reshape(b * t, width), weight, x.targets_bT.reshape(b * t),
                                       temperature=temperature)  # fmt: skip
        entropy = entropy if entropy_grad else entropy.detach()
        return logp.view(b, t), entropy.view(b, t)
    logits = head(h_bTH).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, x.targets_bT[..., None]).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_hidden(decoder: Any, x: MicroInputs) -> Tensor:
    """[b, T, H] the decoder's last hidden states at the positions that predict each response token (the
    state before the token: what the output layer, or a critic's value head, reads)."""
    packed: dict[str, Any] = {}
    if x.cu_seqlens is not None:  # transformers passes these down to the attention function
        packed = {"cu_seq_lens_q": x.cu_seqlens, "cu_seq_lens_k": x.cu_seqlens, "max_length_q": x.max_length,
                  "max_length_k": x.max_length}  # fmt: skip
    hidden = decoder(input_ids=x.input_ids, attention_mask=x.attention_mask, position_ids=x.position_ids,
                     use_cache=False, **packed).last_hidden_state  # fmt: skip
    rows = (torch.arange(hidden.shape[0], device=hidden.device) if x.row_b is None else x.row_b)[:, None]
    out: Tensor = hidden[rows, x.positions_bT]
    return out
