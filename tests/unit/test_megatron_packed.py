"""trainer.pack_sequences in the Megatron backend on CPU: each micro-batch one row, the sequences side by side,
handed to Megatron's decoder as its own `PackedSeqParams` (qkv_format "thd"; trainer/megatron/model.py) and kept
apart by the backend's core attention (attention.py -> kernels/packed_attention.py).

On the same batch, packed and padded give the same logprobs, loss and gradient norm (float32, 1e-5) and updated
weights (all but a few elements within 1e-5, every one within 5e-5: see `assert_same`): on one rank for dense
Qwen3 (with a frozen reference and an entropy bonus) and for Qwen3-MoE with R3 (the recorded routes consumed in
the packed order: routing_mismatch agrees too); the packed Megatron step is also the torch backend's packed step.
Over two spawned gloo ranks: TP=2, PP=2 and EP=2 packed against one rank padded (slow tier: four ranks, TP=2 x
PP=2 and EP=2 x expert-DP 2). The forward is checked to fail where it must: positions that run on across
sequences change the rotated query and key the attention receives; sequences attending across their boundaries
move the logprobs."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import fixed_batch, join_ranks, leave_ranks, spawn_ranks

from miles_stream.kernels.packed_attention import attend_packed
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.batch import RolloutBatch
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron import attention
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.model import MegatronPolicy
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs, packed_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

with warnings.catch_warnings():  # Megatron warns at import that Apex and Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.packed_seq_params import PackedSeqParams

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (packed too) and the entropy
TRACE = (8, 2, 2)  # the tiny Qwen3-MoE's experts, layers, top-k: a routing trace for every group but the third
METRICS = ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens")
# (layout, model, tensor_parallel, pipeline_parallel, expert_parallel) run by the spawned ranks
TWO_RANKS = [("tp2", "dense", 2, 1, 1), ("pp2", "dense", 1, 2, 1), ("ep2", "moe", 1, 1, 2)]
FOUR_RANKS = [("tp2-pp2", "dense", 2, 2, 1), ("ep2-dp2", "moe", 1, 1, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-packed")
    yield {"dense": build_tiny_model(tmp / "dense", TinyModelConfig(num_layers=4)),  # 4 layers: 2 stages of 2
           "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe"))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, *, packed: bool, tp: int = 1, pp: int = 1, ep: int = 1) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         pack_sequences=packed, routing_replay=True,  # (R3: MoE only; a dense model has no router)
                         megatron=MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp,
                                                 expert_parallel=ep))  # fmt: skip


def batch_of(models: dict[str, Path], kind: str, seed: int = 0) -> RolloutBatch:
    return fixed_batch(models[kind], seed=seed, trace=TRACE if kind == "moe" else None)


def outcome(backend: Any, batch: RolloutBatch, *, packed: bool, train: RolloutBatch | None = None) -> dict[str, Any]:
    """What a backend gives: the logprobs of one forward on `batch` before the step, the metrics of a step on
    `train` (default `batch`) and the published weights after it."""
    x = packed_inputs(batch, "cpu") if packed else micro_inputs(batch, "cpu")
    with torch.no_grad():
        logp, _ = response_logprobs(backend.model, x, temperature=1.0)
    metrics = backend.train(batch if train is None else train)
    return {"logp": logp, "metrics": metrics, "weights": {n: t.clone() for n, t in backend.weights()[0].items()}}


@pytest.fixture(scope="module")
def padded(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """One rank, padded rows, the whole batch: what every packed run is held to."""
    out = {}
    for kind in ("dense", "moe"):
        backend = build_backend(config(models[kind], packed=False), ALGO, temperature=1.0, parallel=DataParallel())
        out[kind] = outcome(backend, batch_of(models, kind), packed=False)
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], mask: torch.Tensor, *, rows: list[int] | None = None,
                routed: bool = False) -> None:  # fmt: skip
    """`got` (on `rows` of the batch, default all) within float32 tolerance of `want`."""
    logp = want["logp"] if rows is None else want["logp"][rows]
    mask = mask if rows is None else mask[rows]
    t = got["logp"].shape[1]  # (a share's rows may be shorter than the batch's longest)
    torch.testing.assert_close(got["logp"][mask[:, :t]], logp[:, :t][mask[:, :t]], atol=1e-5, rtol=1e-5)
    for name in METRICS + (("routing_mismatch",) if routed else ()):
        assert got["metrics"][name] == pytest.approx(want["metrics"][name], rel=1e-5, abs=1e-7), name
    assert list(got["weights"]) == list(want["weights"])
    # AdamW's first step moves an element by lr x g / (|g| + eps): where g is float noise (seen: an expert weight's
    # gradient 6.5e-11 padded, -1.0e-10 packed, against a gradient norm of 1.2) the two steps differ by up to 2 x lr x
    # |g| / eps (1.7e-5 there). As test_megatron_pp.py: every element within 5% of a step, all but a few within 1e-5
    far = 0
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=5e-5, rtol=0, msg=name)
        far += int(((got["weights"][name] - tensor).abs() > 1e-5 + 1e-5 * tensor.abs()).sum())
    assert far <= 4, far


def rotated(model: Any, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) as the first layer's core attention receives them (after RoPE), one forward of `x`."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    core = model.gpt.decoder.layers[0].self_attention.core_attention
    hook = core.register_forward_pre_hook(lambda _m, args: seen.append((args[0].clone(), args[1].clone())))
    try:
        with torch.no_grad():
            response_logprobs(model, x, temperature=1.0)
    finally:
        hook.remove()
    return seen[0]


def test_packed_forward_restarts_positions_and_keeps_sequences_apart(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logprobs and entropy are the padded forward's. RoPE is relative, so with the boundaries kept, positions that
    ran on across sequences would move the logprobs by float error only (4.8e-7 seen): the positions are checked
    where they act, on the rotated query and key the attention receives."""
    backend: Any = build_backend(config(models["dense"], packed=True), AlgoConfig(), temperature=0.7,
                                 parallel=DataParallel())  # fmt: skip
    model = backend.model
    batch = batch_of(models, "dense", seed=1)
    mask = batch.mask_BT.bool()
    x, padded_x = packed_inputs(batch, "cpu"), micro_inputs(batch, "cpu")
    with torch.no_grad():
        want, want_h = response_logprobs(model, padded_x, temperature=0.7)
        got, got_h = response_logprobs(model, x, temperature=0.7)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h[mask], want_h[mask], atol=1e-5, rtol=1e-5)

    def same_rotation(packed_qk: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Each token's rotated query and key are its padded row's: packed [t, heads, d], padded [s, b, heads, d]."""
        cu = x.cu_seqlens.tolist()  # type: ignore[union-attr]
        return all(torch.allclose(p[cu[i] : cu[i + 1]], w[: cu[i + 1] - cu[i], i], atol=1e-6)
                   for p, w in zip(packed_qk, padded_qk, strict=True) for i in range(batch.size))  # fmt: skip

    padded_qk = rotated(model, padded_x)
    assert same_rotation(rotated(model, x))
    with monkeypatch.context() as patch:
        # positions running on across sequences: a RoPE table as long as the row makes Megatron's thd RoPE give each
        # sequence its offset in the row (rope_utils.py:211-231)
        row = MegatronPolicy.rope_table(model, replace(x, cu_seqlens=None))
        patch.setattr(MegatronPolicy, "rope_table", lambda self, _x, _split=None: row)
        assert not same_rotation(rotated(model, x))

    # the sequences attending across their boundaries (the attention told the row is one sequence)
    def across_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, _n: int,
                   **kw: Any) -> torch.Tensor:  # fmt: skip
        return attend_packed(q, k, v, torch.tensor([0, q.shape[0]], dtype=torch.int32), q.shape[0], **kw)

    monkeypatch.setattr(attention, "attend_packed", across_row)
    with torch.no_grad():
        across, _ = response_logprobs(model, x, temperature=0.7)
    assert float((across - want)[mask].abs().max()) > 1e-3


def test_the_core_attention_refuses_packings_it_does_not_run(models: dict[str, Path]) -> None:
    backend: Any = build_backend(config(models["dense"], packed=True), AlgoConfig(), temperature=1.0,
                                 parallel=DataParallel())  # fmt: skip
    core = backend.model.gpt.decoder.layers[0].self_attention.core_attention
    q, kv = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def params(**kw: Any) -> PackedSeqParams:
        return PackedSeqParams(**{"qkv_format": "thd", "cu_seqlens_q": cu, "cu_seqlens_kv": cu, "max_seqlen_q": 4,
                                  "max_seqlen_kv": 4, **kw})  # fmt: skip

    assert core(q, kv, kv, None, packed_seq_params=params()).shape == (6, 64)
    with pytest.raises(ValueError, match="thd layout only, not 'sbhd'"):
        core(q, kv, kv, None, packed_seq_params=params(qkv_format="sbhd"))
    with pytest.raises(ValueError, match="without padding"):
        core(q, kv, kv, None, packed_seq_params=params(cu_seqlens_q_padded=cu))
    with pytest.raises(ValueError, match="without padding"):
        core(q, kv, kv, None, packed_seq_params=params(cu_seqlens_kv=torch.tensor([0, 3, 6], dtype=torch.int32)))
    core.dropout = 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        core(q, kv, kv, None, packed_seq_params=params())


def test_one_packed_megatron_step_is_the_padded_step_and_the_torch_backends_packed_step(
    models: dict[str, Path], padded: dict[str, dict[str, Any]]
) -> None:
    batch = batch_of(models, "dense")
    cfg = config(models["dense"], packed=True)
    got = outcome(build_backend(cfg, ALGO, temperature=1.0, parallel=DataParallel()), batch, packed=True)
    assert_same(got, padded["dense"], batch.mask_BT.bool())
    torch_backend = build_backend(replace(cfg, backend="torch"), ALGO, temperature=1.0, parallel=DataParallel())
    assert_same(got, outcome(torch_backend, batch, packed=True), batch.mask_BT.bool())
    fresh = load_causal_lm(str(models["dense"]), dtype="float32", device="cpu").state_dict()
    assert max(float((fresh[n] - t).abs().max()) for n, t in got["weights"].items()) > 1e-4  # the step moved them


def test_one_packed_moe_step_with_replay_is_the_padded_step(
    models: dict[str, Path], padded: dict[str, dict[str, Any]]
) -> None:
    batch = batch_of(models, "moe")
    cfg = config(models["moe"], packed=True)
    got = outcome(build_backend(cfg, ALGO, temperature=1.0, parallel=DataParallel()), batch, packed=True)
    assert_same(got, padded["moe"], batch.mask_BT.bool(), routed=True)
    assert got["metrics"]["routing_mismatch"] > 0.5  # random traces: most recorded tokens' own routing differs
    torch_backend = build_backend(replace(cfg, backend="torch"), ALGO, temperature=1.0, parallel=DataParallel())
    assert_same(got, outcome(torch_backend, batch, packed=True), batch.mask_BT.bool(), routed=True)


def share(layout: str, rank: int, world: int) -> list[int]:
    """This rank's rows of the 16: expert parallel trains each rank's own, unequal over two ranks (three groups
    and one); a TP x PP group trains the union of its ranks' equal shares."""
    if layout.startswith("ep"):
        groups = {2: [[0, 1, 2], [3]], 4: [[0], [1], [2], [3]]}[world][rank]
        return [4 * g + i for g in groups for i in range(4)]
    per = 16 // world
    return list(range(rank * per, (rank + 1) * per))


def _worker(rank: int, world: int, port: int, dirs: dict[str, str], out: str,
            layouts: list[tuple[str, str, int, int, int]]) -> None:  # fmt: skip
    parallel = join_ranks(rank, world, port)
    models = {k: Path(v) for k, v in dirs.items()}
    results = {}
    for layout, kind, tp, pp, ep in layouts:  # one process set for every layout: Megatron imports once
        backend = build_backend(config(models[kind], packed=True, tp=tp, pp=pp, ep=ep), ALGO, temperature=1.0,
                                parallel=parallel)  # fmt: skip
        batch = batch_of(models, kind)
        mine = batch.rows(share(layout, rank, world))
        # a forward: EP ranks each on their own rows; a TP x PP group's ranks all on the same (the whole batch)
        results[layout] = outcome(backend, mine if ep > 1 else batch, packed=True, train=mine)
    torch.save(results, f"{out}.{rank}")
    leave_ranks(parallel)


def run_ranks(models: dict[str, Path], tmp_path: Path, world: int,
              layouts: list[tuple[str, str, int, int, int]]) -> list[dict[str, Any]]:  # fmt: skip
    out = tmp_path / "rank"
    dirs = {k: str(v) for k, v in models.items()}
    return spawn_ranks(_worker, world, out, dirs, str(out), layouts)


# slow tier (opt-in): the one-rank tests above hold packing's own logic in the default tier, which is near its
# 25-minute budget; these add TP / PP / EP's hand-offs of a packed row (about 10 s for two ranks, 14 s for four)
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_packed_over_gloo_ranks_takes_the_padded_step_one_rank_takes(
    models: dict[str, Path], padded: dict[str, dict[str, Any]], tmp_path: Path, world: int
) -> None:
    layouts = TWO_RANKS if world == 2 else FOUR_RANKS
    ranks = run_ranks(models, tmp_path, world, layouts)
    for layout, kind, _tp, _pp, ep in layouts:
        mask = batch_of(models, kind).mask_BT.bool()
        for r, got in enumerate(ranks):
            rows = share(layout, r, world) if ep > 1 else None
            try:
                assert_same(got[layout], padded[kind], mask, rows=rows, routed=kind == "moe")
            except AssertionError as e:
                raise AssertionError(f"{layout}, rank {r}: {e}") from e


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_bf16_on_cuda_through_varlen_attention_takes_the_padded_step(models: dict[str, Path]) -> None:
    """On CUDA in bf16 the packed row goes through PyTorch's varlen flash attention (kernels/packed_attention.py)
    and Megatron's own RoPE table (`rotary_pos_emb(max_seqlen, packed_seq=True)`): logprobs and the step's
    gradient norm within bf16 rounding of the padded path's (SDPA)."""
    batch = batch_of(models, "dense")
    results = {}
    for packed in (False, True):
        cfg = replace(config(models["dense"], packed=packed), device="cuda", dtype="bfloat16",
                      main_params_dtype="bfloat16")  # fmt: skip
        backend: Any = build_backend(cfg, AlgoConfig(entropy_coef=0.01), temperature=1.0, parallel=DataParallel())
        x = packed_inputs(batch, "cuda") if packed else micro_inputs(batch, "cuda")
        with torch.no_grad():
            logp, _ = response_logprobs(backend.model, x, temperature=1.0)
        results[packed] = (logp.float().cpu(), backend.train(batch))
    mask = batch.mask_BT.bool()
    assert float((results[True][0] - results[False][0])[mask].abs().max()) < 5e-2
    assert results[True][1]["grad_norm"] == pytest.approx(results[False][1]["grad_norm"], rel=5e-2)
    assert results[True][1]["loss"] == pytest.approx(results[False][1]["loss"], abs=2e-2)
