"""The Megatron-core trainer backend (`trainer.backend: megatron`): Megatron's GPTModel built from a Hugging Face
Qwen3 or Qwen3-MoE checkpoint, split over tensor-parallel ranks, pipeline stages and context-parallel ranks (MoE:
its experts over expert-parallel ranks), trained by the torch backend's step (same objective, corrections and
optimizer), published under Hugging Face names. Nothing is imported here: the run config reads `config.py`
without torch or Megatron.

config.py      trainer.megatron: parallel sizes (TP, PP, EP, CP), sequence parallel and uneven stages
convert.py     Qwen3 / Qwen3-MoE tensors HF <-> Megatron, split over TP ranks, by expert, by stage (pure)
moe.py         MoE routers that run without TE and on a CPU; R3 through Megatron's RouterReplay hook
dispatch.py    expert parallel's token exchange: Megatron's all-gather dispatcher, padded, on gloo too
model.py       GPTModel from the HF config; `MegatronPolicy`, what the train step drives (padded or packed rows:
               trainer.pack_sequences hands Megatron's PackedSeqParams, qkv_format thd, to the decoder)
attention.py   PyTorch SDPA as the layer spec's core attention (packed: kernels/packed_attention.py)
context.py     context parallel: each sequence split over the CP ranks, keys and values gathered
sequence.py    sequence parallel: with TP, the norms and residual stream hold 1/tp of the positions (MoE with TP)
logprobs.py    vocab-parallel logprobs
parallel.py    Megatron's process groups (TP, PP, CP, DP, EP, expert-DP); the model-parallel group's union of batches
pipeline.py    pipeline parallel's hand-offs between stages (autograd send / receive)
layout.py      `MegatronLayout`: gradient sums, clipping, publication, checkpoints, HF export
reshard.py     a checkpoint saved at other TP, PP or EP sizes: each rank's parameters and AdamW moments rebuilt
build.py       the backend (`MegatronTrainer`) from trainer.* and algo.*
"""
