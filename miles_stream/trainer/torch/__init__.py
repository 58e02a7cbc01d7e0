"""The torch trainer backend: a Hugging Face causal LM trained with PyTorch (data parallel over torch.distributed).

build.py     the backend from trainer.* and algo.* (policy, reference, teacher, critic models)
policy.py    `PolicyTrainer`: one rollout batch in, `updates_per_batch` optimizer steps out
inputs.py    a micro-batch's forward inputs;  logprobs.py  response-token logprobs (fused kernel)
critic.py    PPO's value model;  routing_replay.py  R3 in HF MoE routers;  optim.py  AdamW + schedule
hf.py        HF checkpoints in and out;  state.py  what a checkpoint holds for this backend
"""
