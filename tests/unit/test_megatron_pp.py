"""trainer.megatron.pipeline_parallel on CPU: dense Qwen3's layers cut into pipeline stages over gloo ranks.

The conversion split by stage is exact both ways (each stage holds its layers under Megatron's local numbering, the
embedding on the first, the final norm and output layer on the last, a tied model's last stage a copy of the
embedding; reassembled they give the HF tensors back bit for bit), and what is not built is refused in one line.
PP=2 over two spawned gloo ranks (and, slow, TP=2 x PP=2 over four), each rank reading its own share of the
batch, a tied model (its two embedding copies' gradients summed over the embedding group), a frozen reference
and an entropy bonus, against one rank on the whole batch: logprobs (on every stage), loss, gradient norm and the
published weights agree within float32 tolerance; each rank holds half the layers; a checkpoint written per
stage resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron_helpers import (
    assert_joins,
    assert_weights_close,
    fixed_batch,
    join_ranks,
    leave_ranks,
    one_rank_step,
    resume_check,
    spawn_ranks,
)

from miles_stream.errors import ConfigError
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, by_stage, stage_home, to_megatron
from miles_stream.trainer.megatron.parallel import init_groups, release_groups
from miles_stream.trainer.megatron.pipeline import OneFOneB, _keep
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (pipelined too) and entropy


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-pp")
    yield {"tied": build_tiny_model(tmp / "tied", TinyModelConfig(num_layers=4)),
           "untied": build_tiny_model(tmp / "untied", TinyModelConfig(tie_embeddings=False, seed=3))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def config(model_dir: Path, **megatron: int) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         megatron=MegatronConfig(**megatron))  # fmt: skip


def share(rank: int, world: int) -> list[int]:
    """This rank's rows: whole groups of four, one after the other (the model-parallel group trains them all)."""
    per = 16 // world
    return list(range(rank * per, (rank + 1) * per))


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_conversion_split_by_stage_is_exact_both_ways(models: dict[str, Path], kind: str) -> None:
    hf = load_causal_lm(str(models[kind]), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    for tp in (1, 2):
        shards = to_megatron(state, shape, tp)
        for pp in [p for p in (1, 2, 4) if shape.num_layers % p == 0]:
            stages = [by_stage(shard, shape, pp) for shard in shards]  # [tp rank][stage]
            per = shape.num_layers // pp
            for s, part in enumerate(stages[0]):
                layers = {n.split(".")[2] for n in part if n.startswith("decoder.layers.")}
                assert layers == {str(i) for i in range(per)}  # local numbering from 0 on every stage
                assert ("embedding.word_embeddings.weight" in part) == (s == 0)
                assert ("decoder.final_layernorm.weight" in part) == (s == pp - 1)
                assert ("output_layer.weight" in part) == (s == pp - 1 and (pp > 1 or not shape.tied))
            if shape.tied and pp > 1:  # the last stage's copy of the embedding
                assert torch.equal(stages[0][-1]["output_layer.weight"], shards[0]["embedding.word_embeddings.weight"])
            i = shape.num_layers - 1
            assert torch.equal(stages[0][-1][f"decoder.layers.{per - 1}.mlp.linear_fc2.weight"],
                               shards[0][f"decoder.layers.{i}.mlp.linear_fc2.weight"])  # fmt: skip

            def shards_of(name: str, stages: list[list[dict[str, torch.Tensor]]] = stages,
                          pp: int = pp) -> list[torch.Tensor]:  # fmt: skip
                owner, local = stage_home(name, shape, pp)
                return [ranks[owner][local] for ranks in stages]

            assert_joins(shards_of, shape, state)  # as the layout reads them


def test_pipeline_parallel_refuses_what_it_cannot_split(models: dict[str, Path]) -> None:
    shape = Qwen3Shape.of(load_causal_lm(str(models["tied"]), dtype="float32", device="cpu").config)
    with pytest.raises(ConfigError, match=r"pipeline_parallel=3 must divide the model's num_hidden_layers \(4\)"):
        shape.check_split(1, 1, 3)
    with pytest.raises(ValueError, match=r"pipeline_parallel=2 x context_parallel=1 must divide the 3 ranks"):
        init_groups(DataParallel(rank=0, world=3), 1, 1, 2)
    with pytest.raises(ConfigError, match=r"trainer\.megatron\.pipeline_parallel: must be >= 1"):
        MegatronConfig(pipeline_parallel=0)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_the_1f1b_order_runs_every_micro_batch_once_each_way_and_the_stages_never_wait_on_each_other(
    stages: int, count: int
) -> None:
    """Each stage's order: every micro-batch's forward, then later its backward, at most P - s in flight; and the
    stages' orders together finish when sends never wait and receives wait for their send (stage s's forward i
    needs stage s-1's forward i, its backward i stage s+1's backward i): no deadlock, on gloo's terms."""
    orders = [OneFOneB(None, s, stages, None, stages - 1).order(count) for s in range(stages)]
    for s, order in enumerate(orders):
        assert sorted(order) == sorted((f, i) for i in range(count) for f in (True, False))
        live = peak = 0
        for forward, i in order:
            assert forward or (True, i) in order[: order.index((False, i))]
            live += 1 if forward else -1
            peak = max(peak, live)
        assert peak == min(stages - s, count)
    done: set[tuple[int, bool, int]] = set()
    at = [0] * stages
    while any(at[s] < len(orders[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            if at[s] == len(orders[s]):
                continue
            forward, i = orders[s][at[s]]
            source = s - 1 if forward else s + 1  # the stage whose send this one receives
            if not 0 <= source < stages or (source, forward, i) in done:
                done.add((s, forward, i))
                at[s] += 1
                moved = True
        assert moved, (at, orders)  # every stage waits on another: a deadlock


def test_a_completed_send_is_let_go_when_the_next_starts() -> None:
    class Work:
        def __init__(self, complete: bool) -> None:
            self.complete = complete

        def is_completed(self) -> bool:
            return self.complete

    sends: list[Any] = []
    first, second = Work(False), Work(False)
    _keep(sends, first, torch.zeros(1))
    _keep(sends, second, torch.zeros(1))
    first.complete = True
    _keep(sends, Work(False), torch.zeros(1))
    assert [w for w, _ in sends][:1] == [second] and len(sends) == 2


def _pp_worker(rank: int, world: int, port: int, model_dir: str, out: str, tp: int) -> None:
    parallel = join_ranks(rank, world, port)
    cfg = config(Path(model_dir), tensor_parallel=tp, pipeline_parallel=world // tp)
    backend: Any = build_backend(cfg, ALGO, temperature=1.0, parallel=parallel)
    batch = fixed_batch(Path(model_dir), seed=0)
    with torch.no_grad():  # a forward runs through every stage: each returns the last stage's logprobs
        logp, entropy = response_logprobs(backend.model, micro_inputs(batch, "cpu"), temperature=1.0)
    rows = share(rank, world)
    pipeline, orders = backend.policy.layout.pipeline, []
    order = pipeline.order
    pipeline.order = lambda count: orders.append(order(count)) or orders[-1]  # what the step ran
    metrics = backend.train(batch.rows(rows))
    published = {n: t.clone() for n, t in backend.weights()[0].items()}
    params = dict(backend.model.gpt.named_parameters())
    local = sorted(params)
    copy = params["output_layer.weight"].detach().clone() if "output_layer.weight" in params else None
    ckpt = Path(out).parent / "ckpt"
    second = fixed_batch(Path(model_dir), seed=2).rows(rows)
    after, again, resumed_equal = resume_check(
        backend, lambda: build_backend(cfg, ALGO, temperature=1.0, parallel=parallel), ckpt, parallel, second
    )
    torch.save({"logp": logp, "entropy": entropy, "metrics": metrics, "weights": published, "local": local,
                "copy": copy, "after": after, "again": again, "order": orders[0],
                "resumed_equal": resumed_equal,
                "files": sorted(p.name for p in ckpt.iterdir())}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


@pytest.mark.parametrize(
    ("world", "tp"), [(2, 1), pytest.param(4, 2, marks=pytest.mark.slow), pytest.param(4, 1, marks=pytest.mark.slow)]
)  # PP 4: two middle stages
def test_pipeline_parallel_over_gloo_ranks_takes_the_step_one_rank_takes(
    models: dict[str, Path], tmp_path: Path, world: int, tp: int
) -> None:
    model_dir = models["tied"]
    out = tmp_path / "rank"
    ranks = spawn_ranks(_pp_worker, world, out, str(model_dir), str(out), tp)
    single: Any = build_backend(config(model_dir), ALGO, temperature=1.0, parallel=DataParallel())
    batch = fixed_batch(model_dir, seed=0)
    mask = batch.mask_BT.bool()
    logp, entropy, metrics, published = one_rank_step(single, batch)
    pp = world // tp
    for r, got in enumerate(ranks):
        stage = r // tp  # Megatron's order: TP fastest, PP slowest
        layers = {n.split(".")[2] for n in got["local"] if n.startswith("decoder.layers.")}
        assert layers == {str(i) for i in range(4 // pp)}  # each stage holds its share of the 4 layers
        assert ("embedding.word_embeddings.weight" in got["local"]) == (stage == 0)
        assert ("output_layer.weight" in got["local"]) == (stage == pp - 1)  # the tied embedding's copy
        if stage == pp - 1:  # after the step, still equal to the (published) embedding: its TP rank's rows
            rows = got["weights"]["model.embed_tokens.weight"].chunk(tp)[r % tp]
            assert torch.equal(got["copy"], rows)
        torch.testing.assert_close(got["logp"][mask], logp[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"][mask], entropy[mask], atol=1e-5, rtol=1e-5)
        for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
        assert got["again"]["loss"] == got["after"]["loss"] and got["again"]["grad_norm"] == got["after"]["grad_norm"]
        assert got["resumed_equal"], r
        # 1F1B: the first stage forwards a second micro-batch before the first one's backward, the last stage runs
        # each micro-batch's backward right after its forward; every micro-batch once each way
        count = len(got["order"]) // 2
        assert count >= 3 and sorted(got["order"]) == sorted((f, i) for i in range(count) for f in (True, False))
        warmup = min(pp - 1 - stage, count)
        assert got["order"][: warmup + 2] == [(True, i) for i in range(warmup + 1)] + [(False, 0)]
    # the step moved the weights (a test that compared untouched weights could not fail)
    assert not torch.equal(published["model.layers.3.mlp.down_proj.weight"],
                           load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict()[
                               "model.layers.3.mlp.down_proj.weight"])  # fmt: skip
    files = [f"megatron-tp{k:02d}-pp{s:02d}.{x}" for k in range(tp) for s in range(pp) for x in ("pt", "safetensors")]
    assert ranks[0]["files"] == sorted([*files, "megatron.json"])  # the sizes, for a resume on others (reshard.py)
