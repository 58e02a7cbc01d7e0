"""`TrainerConfig`: the trainer process's settings (no torch here, so configs load fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from miles_stream.config import check
from miles_stream.trainer.megatron.config import MegatronConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class FsdpConfig:
    """trainer.fsdp: shard the policy over the data-parallel ranks with PyTorch's FSDP2 (trainer/torch/fsdp.py)
    instead of replicating it. Parameters, gradients and AdamW's state are split 1/N per rank; checkpoints go
    through torch.distributed.checkpoint (one shard file per rank, resumable on the same world size)."""

    enabled: bool = False
    # bf16 compute (parameters gathered in bf16, gradients reduced in float32) over float32 sharded parameters,
    # FSDP's MixedPrecisionPolicy; it stands in for trainer.dtype=bfloat16's autocast. "auto": when
    # trainer.dtype is bfloat16; "off": compute in the parameters' dtype
    mixed_precision: Literal["auto", "off"] = "auto"
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live in CPU memory
    reshard_after_forward: bool = True  # free each layer's gathered parameters after its forward (ZeRO-3);
    # False keeps them until the backward pass (ZeRO-2: less communication, more memory)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainerConfig:
    # what trains the model (trainer/backends.py): torch (the HF model, PyTorch DP or FSDP2); megatron
    # (Megatron-core's GPTModel built from the HF checkpoint, tensor parallel: trainer/megatron/, trainer.megatron)
    backend: Literal["torch", "megatron"] = "torch"
    model: str = ""  # a local Hugging Face model directory (the policy's starting point)
    ref_model: str = ""  # a frozen reference for the KL loss; empty: `model` when algo.kl_loss_coef > 0
    critic_model: str = ""  # PPO's value model starts from this LM's decoder; empty: `model`
    critic_lr: float = 0.0  # 0 = lr
    teacher_model: str = ""  # on-policy distillation (algo.use_opd): the teacher whose logprobs the trainer computes
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"  # what the forward and backward passes compute in
    # bfloat16 compute: the parameters and the optimizer's state stay float32 (autocast; published weights are
    # cast to bfloat16). "bfloat16" here keeps them in bf16 (half the memory), where an update smaller than
    # half a weight's bf16 spacing is lost: near 0.03 that spacing is 1.2e-4, so RL learning rates (1e-6 to
    # 1e-5, Adam's step is at most lr) leave most weights unchanged. Megatron calls these the main params.
    main_params_dtype: Literal["float32", "bfloat16"] = "float32"
    # the forward's linear layers and MoE experts quantized as the engine's are (models/quantized.py), over the
    # master weights, straight-through gradients: "fp8" (rollout.precision fp8's quantizer), and qat "int4"
    # (rollout.precision int4's: weight-only fake quantization). docs/precision.md
    precision: Literal["dtype", "fp8"] = "dtype"
    qat: Literal["none", "int4"] = "none"
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    decay_steps: int = 0  # cosine: optimizer steps from the end of warm-up to `min_lr`; 0 = max_steps
    min_lr: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    grad_spike_factor: float = 10.0  # log a gradient norm over this many times its recent average
    updates_per_batch: int = 1  # optimizer steps per rollout batch (the batch is cut into this many parts)
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward pass (summed tokens when packed)
    pack_sequences: bool = False  # one row per micro-batch, sequences side by side, no padding; attention through
    # PyTorch's variable-length flash kernel on CUDA (kernels/packed_attention.py); needs no sliding window. Both
    # backends (megatron: Megatron's PackedSeqParams, qkv_format thd, through its attention; trainer/megatron/)
    recompute_old_logprobs: bool = True  # False: trust the rollout logprobs as the old policy's
    fused_logprobs: bool = True  # logprobs/entropy from hidden states in chunks (kernels/); False: full logits
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    routing_replay: bool = False  # R3: MoE layers use the experts recorded at rollout (routing_replay.py); the
    # fraction of tokens routed differently is logged either way (routing_mismatch)
    compile: bool = False  # torch.compile each decoder layer (fuses norms, activations, rotary; compiles once)
    temperature: float = 0.0  # logprobs are log_softmax(logits / T); 0 = rollout.sampling.temperature (1 if greedy)
    max_steps: int = 0  # rollout batches to train on, then stop; 0 = until stopped
    publish_every: int = 1  # publish new weights every k rollout batches
    # broadcast: weights_group (weights/broadcast.py); cuda_ipc: producers on this GPU's host (weights/cuda_ipc.py)
    transport: Literal["redis", "file", "broadcast", "cuda_ipc"] = "redis"
    weights_dir: str = ""  # the file transport's shared directory
    # where rank 0 keeps the snapshot it publishes from (weights/background.py: up to two, one in flight and one
    # waiting): "device" (a device copy: fastest, but the whole model once or twice more on its GPU) or "host"
    # (pinned host memory: what a sharded model too large to hold twice needs; redis and file transports only,
    # which read through host memory anyway)
    publish_snapshot: Literal["device", "host"] = "device"
    checkpoint_dir: str = ""  # empty: no checkpoints (groups are committed after every step)
    checkpoint_every: int = 10  # rollout batches between checkpoints; groups are committed at each one
    keep_checkpoints: int = 2
    # after SIGTERM / Ctrl-C: time to finish the step, checkpoint and commit before the trainer is stopped where
    # it is (aio.run_process); raise it where a step plus a checkpoint takes longer (a large model)
    stop_grace_s: float = 6.0
    export_dir: str = ""  # at the end, save the final policy here as a Hugging Face checkpoint
    metrics_path: str = ""  # a JSONL file, one line per step; empty: the structured log only
    tensorboard_dir: str = ""  # when set and tensorboard is installed
    trainer_id: str = ""  # consumer name in the "trainer" group; empty: trainer-{rank}
    standby_s: float = 0.0  # wait this long for another trainer's lease to end (0: refuse to start at once)
    seed: int = 0
    torch_threads: int = 0  # intra-op threads; 0 = torch's default (all cores)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)

    def __post_init__(self) -> None:
        check(self.torch_threads >= 0, "trainer.torch_threads", "must be >= 0 (0 = torch's default)")
        check(self.lr > 0, "trainer.lr", "must be positive")
        check(self.critic_lr >= 0, "trainer.critic_lr", "must be >= 0 (0 = trainer.lr)")
        check(self.weight_decay >= 0, "trainer.weight_decay", "must be >= 0")
        check(all(0 <= b < 1 for b in self.adam_betas), "trainer.adam_betas", "each must be in [0, 1)")
        check(self.warmup_steps >= 0, "trainer.warmup_steps", "must be >= 0")
        check(0 <= self.min_lr <= self.lr, "trainer.min_lr", "must be in [0, trainer.lr]")
        check(self.grad_clip >= 0, "trainer.grad_clip", "must be >= 0 (0 = off)")
        check(self.updates_per_batch >= 1, "trainer.updates_per_batch", "must be >= 1")
        check(self.micro_batch_tokens >= 1, "trainer.micro_batch_tokens", "must be >= 1")
        check(self.grad_spike_factor > 1, "trainer.grad_spike_factor", "must be > 1")
        check(self.temperature >= 0, "trainer.temperature", "must be >= 0")
        check(self.max_steps >= 0, "trainer.max_steps", "must be >= 0")
        check(self.publish_every >= 1, "trainer.publish_every", "must be >= 1")
        check(self.publish_snapshot == "device" or self.transport in ("redis", "file"), "trainer.publish_snapshot",
              f"host needs the redis or file transport ({self.transport} sends from GPU memory)")  # fmt: skip
        check(self.checkpoint_every >= 1, "trainer.checkpoint_every", "must be >= 1")
        check(self.standby_s >= 0, "trainer.standby_s", "must be >= 0 (0 = refuse when another trainer runs)")
        check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
        check(self.stop_grace_s > 0, "trainer.stop_grace_s", "must be positive")
        check(self.transport != "file" or bool(self.weights_dir), "trainer.weights_dir",
              "the file transport needs a shared directory")  # fmt: skip
        check(
            self.schedule != "cosine" or self.decay_steps > 0 or self.max_steps > 0,
            "trainer.decay_steps",
            "a cosine schedule needs decay_steps or max_steps",
        )
        check(self.main_params_dtype == "float32" or self.dtype == "bfloat16", "trainer.main_params_dtype",
              "bfloat16 main params need trainer.dtype bfloat16")  # fmt: skip
        check(self.precision == "dtype" or self.qat == "none", "trainer.qat",
              "int4 QAT and trainer.precision fp8 are two quantizations: choose one")  # fmt: skip
        if self.precision != "dtype" or self.qat != "none":
            check(not self.fsdp.enabled and not self.compile, "trainer.precision",
                  "fp8 / int4 QAT are not tried with trainer.fsdp or trainer.compile: turn those off")  # fmt: skip
        if self.fsdp.enabled:
            check(self.main_params_dtype == "float32", "trainer.fsdp.enabled",
                  "FSDP keeps float32 sharded parameters: leave trainer.main_params_dtype float32")  # fmt: skip
            check(not self.compile, "trainer.fsdp.enabled", "not tried with trainer.compile: set compile false")
            check(not self.fsdp.cpu_offload or self.device.startswith("cuda"), "trainer.fsdp.cpu_offload",
                  "offloads a GPU's shards to the CPU: it needs trainer.device cuda")  # fmt: skip

        if self.backend == "megatron":
            for on, key in (
                (self.fsdp.enabled, "fsdp.enabled"),
                (self.activation_checkpointing, "activation_checkpointing"),
                (self.compile, "compile"),
            ):
                check(not on, f"trainer.{key}", "not built in the megatron backend yet: set it false")  # fmt: skip

    @property
    def params_dtype(self) -> str:
        """What the policy's parameters are held in (and its optimizer's state): `dtype` unless that is bf16
        computed over float32 main params."""
        return self.main_params_dtype if self.dtype == "bfloat16" else self.dtype


@dataclass(frozen=True, slots=True, kw_only=True)
class SftConfig:
    """`miles-stream train --sft DATA`: supervised fine-tuning on given answers, with the trainer's model,
    optimizer, checkpoints, export and metrics (trainer.*). Steps: `num_epochs` passes over the data, or
    trainer.max_steps if that is set and sooner."""

    path: str = ""  # a .jsonl or .parquet file of prompt / response records (--sft sets it)
    prompt_key: str = "prompt"
    response_key: str = "response"  # the answer to learn; the model's end-of-sequence token is appended
    apply_chat_template: bool = False  # the prompt as one user turn of trainer.model's chat template
    batch_size: int = 32  # examples per optimizer step (split among data-parallel ranks)
    num_epochs: int = 1

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "sft.batch_size", "must be >= 1")
        check(self.num_epochs >= 1, "sft.num_epochs", "must be >= 1")
