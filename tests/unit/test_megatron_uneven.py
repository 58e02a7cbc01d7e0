"""Uneven pipeline stages (trainer.megatron.first_stage_layers / last_stage_layers, convert.StageSplit): Megatron's
num_layers_in_first/last_pipeline_stage, the middle stages sharing the rest evenly.

StageSplit gives each stage the layer count and offset megatron-core's own functions give it
(get_num_layers_to_build, get_transformer_layer_offset, over Qwen3-235B-A22B's 94 layers among others: a stage's
layer_number, which R3 reads its trace by, stays global); the conversion split by uneven stages is exact both ways
(dense tied and untied, MoE with EP); what cannot be split is refused in one line naming the key. PP=2 as 1 + 2
layers over two spawned gloo ranks against one rank on the whole batch: logprobs, loss, gradient norm and published
weights agree; a checkpoint written at that split resumes exactly, records the split in megatron.json, and resumes
resharded at another split (2 + 1) with the same weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
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
from miles_stream.trainer.megatron.convert import (
    Qwen3Shape,
    StageSplit,
    by_expert,
    by_stage,
    home,
    stage_home,
    to_megatron,
)
from miles_stream.trainer.megatron.model import transformer_config
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.megatron.reshard import SIZES_FILE, Sizes, saved_sizes
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import load_causal_lm
from miles_stream.trainer.torch.inputs import micro_inputs
from miles_stream.trainer.torch.logprobs import response_logprobs

ALGO = AlgoConfig(kl_loss_coef=0.01, entropy_coef=0.01)  # a frozen reference (split alike) and entropy


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-uneven")
    yield {"five": build_tiny_model(tmp / "five", TinyModelConfig(num_layers=5)),
           "four": build_tiny_model(tmp / "four", TinyModelConfig(num_layers=4, tie_embeddings=False, seed=3)),
           "three": build_tiny_model(tmp / "three", TinyModelConfig(num_layers=3)),
           "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe", num_layers=4, seed=5))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


def shape_of(model_dir: Path) -> Qwen3Shape:
    return Qwen3Shape.of(load_causal_lm(str(model_dir), dtype="float32", device="cpu").config)


@pytest.mark.parametrize(("layers", "pp", "split", "counts"), [
    (94, 8, StageSplit(11, 11), (11, 12, 12, 12, 12, 12, 12, 11)),  # Qwen3-235B-A22B over 8 stages
    (94, 4, StageSplit(22, 24), (22, 24, 24, 24)),
    (94, 2, StageSplit(46), (46, 48)),
    (5, 2, StageSplit(2), (2, 3)),
    (5, 2, StageSplit(None, 3), (2, 3)),
    (4, 3, StageSplit(1, 1), (1, 2, 1)),
    (7, 3, StageSplit(None, 3), (2, 2, 3)),
    (8, 4, StageSplit(), (2, 2, 2, 2)),
])  # fmt: skip
def test_stage_split_is_megatrons(layers: int, pp: int, split: StageSplit, counts: tuple[int, ...]) -> None:
    """Each stage's layer count and offset as megatron-core 0.16.1 computes them from the TransformerConfig the
    backend builds (transformer_block.py:75-145, transformer_layer.py:39-152)."""
    assert split.layers(layers, pp) == counts
    shape = Qwen3Shape(num_layers=layers, hidden=64, num_heads=4, num_groups=2, head_dim=16, ffn=128, vocab=50,
                       tied=False)  # fmt: skip

    class Hf:
        rms_norm_eps = 1e-6

    config = transformer_config(Hf(), shape, tp=1, pp=pp, device="cpu", dtype=torch.float32, split=split)
    assert config.num_layers_in_first_pipeline_stage == split.first
    assert config.num_layers_in_last_pipeline_stage == split.last
    assert tuple(get_num_layers_to_build(config, pp_rank=s) for s in range(pp)) == counts
    starts = split.starts(layers, pp)
    assert tuple(get_transformer_layer_offset(config, pp_rank=s) for s in range(pp)) == starts
    # a layer's home is the stage Megatron builds it on, under its local index (layer_number - offset - 1)
    for i in range(layers):
        stage, local = stage_home(f"decoder.layers.{i}.mlp.linear_fc1.weight", shape, pp, split)
        assert starts[stage] <= i < starts[stage] + counts[stage]
        assert local == f"decoder.layers.{i - starts[stage]}.mlp.linear_fc1.weight"


@pytest.mark.parametrize(("kind", "pp", "split"), [
    ("five", 2, StageSplit(2)), ("five", 2, StageSplit(4)), ("four", 3, StageSplit(1, 1)),
    ("four", 2, StageSplit(None, 1)),
])  # fmt: skip
def test_conversion_split_by_uneven_stages_is_exact_both_ways(models: dict[str, Path], kind: str, pp: int,
                                                              split: StageSplit) -> None:  # fmt: skip
    hf = load_causal_lm(str(models[kind]), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    counts, starts = split.layers(shape.num_layers, pp), split.starts(shape.num_layers, pp)
    for tp in (1, 2):
        shards = to_megatron(state, shape, tp)
        stages = [by_stage(shard, shape, pp, split) for shard in shards]  # [tp rank][stage]
        for s, part in enumerate(stages[0]):
            layers = {n.split(".")[2] for n in part if n.startswith("decoder.layers.")}
            assert layers == {str(i) for i in range(counts[s])}  # its count, numbered from 0
            first = starts[s]  # its first layer is the model's layer `first`
            assert torch.equal(part["decoder.layers.0.mlp.linear_fc2.weight"],
                               shards[0][f"decoder.layers.{first}.mlp.linear_fc2.weight"])  # fmt: skip
            assert ("embedding.word_embeddings.weight" in part) == (s == 0)
            assert ("decoder.final_layernorm.weight" in part) == (s == pp - 1)

        def shards_of(name: str, stages: list[list[dict[str, torch.Tensor]]] = stages) -> list[torch.Tensor]:
            owner, local = stage_home(name, shape, pp, split)
            return [ranks[owner][local] for ranks in stages]

        assert_joins(shards_of, shape, state)  # as the layout reads them


def test_moe_conversion_by_uneven_stage_and_expert_is_exact_both_ways(models: dict[str, Path]) -> None:
    hf = load_causal_lm(str(models["moe"]), dtype="float32", device="cpu")
    state, shape = hf.state_dict(), Qwen3Shape.of(hf.config)
    whole = to_megatron(state, shape)[0]
    split, pp, ep = StageSplit(1, 1), 3, 2  # 1 + 2 + 1 layers, each stage's experts over 2 EP ranks
    ranks = [by_expert(stage, shape, ep) for stage in by_stage(whole, shape, pp, split)]
    assert {n.split(".")[2] for n in ranks[1][0] if n.startswith("decoder.layers.")} == {"0", "1"}
    # the middle stage's local layer 1 is the model's layer 2: its router and its EP rank 1's first expert
    assert torch.equal(ranks[1][1]["decoder.layers.1.mlp.router.weight"], whole["decoder.layers.2.mlp.router.weight"])
    half = shape.experts // ep
    assert torch.equal(ranks[1][1]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"],
                       whole[f"decoder.layers.2.mlp.experts.local_experts.{half}.linear_fc1.weight"])  # fmt: skip

    def shards_of(name: str) -> list[torch.Tensor]:
        stage, owner, local = home(name, shape, pp, ep, split)
        return [ranks[stage][max(owner, 0)][local]]

    assert_joins(shards_of, shape, state)  # as the layout reads them


def test_uneven_stages_refuse_what_they_cannot_split(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"^trainer\.megatron\.first_stage_layers: must be >= 1 \(it is 0\)$"):
        MegatronConfig(pipeline_parallel=2, first_stage_layers=0)
    with pytest.raises(ConfigError, match=r"^trainer\.megatron\.last_stage_layers: .*only with pipeline_parallel > 1"):
        MegatronConfig(last_stage_layers=2)
    MegatronConfig(pipeline_parallel=4, first_stage_layers=11, last_stage_layers=11)  # checked against the model later
    five, four = shape_of(models["five"]), shape_of(models["four"])
    with pytest.raises(ConfigError, match=r"first_stage_layers \+ last_stage_layers \(4\) must equal the model's "
                                          r"num_hidden_layers \(5\) over pipeline_parallel=2"):  # fmt: skip
        five.check_split(1, 1, 2, StageSplit(2, 2))
    leave = r"^trainer\.megatron\.first_stage_layers \(1\) must leave the model's other 3 layers \(of 4\) a whole"
    with pytest.raises(ConfigError, match=leave + r" number >= 1 each over the 2 middle stages"):
        four.check_split(1, 1, 3, StageSplit(1))
    with pytest.raises(ConfigError, match=r"^trainer\.megatron\.first_stage_layers \(5\) must leave"):
        five.check_split(1, 1, 2, StageSplit(5))  # nothing left for the last stage
    with pytest.raises(ConfigError, match=r"pipeline_parallel=3 must divide the model's num_hidden_layers \(5\); or"):
        five.check_split(1, 1, 3)
    with pytest.raises(ConfigError, match=r"only with pipeline_parallel > 1 \(it is 1\)"):
        by_stage({}, five, 1, StageSplit(2))


def config(model_dir: Path, **megatron: int) -> TrainerConfig:
    return TrainerConfig(model=str(model_dir), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                         megatron=MegatronConfig(**megatron))  # fmt: skip


def _uneven_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    parallel = join_ranks(rank, world, port)
    cfg = config(Path(model_dir), pipeline_parallel=2, first_stage_layers=1)  # 1 + 2 of the 3 layers
    backend: Any = build_backend(cfg, ALGO, temperature=1.0, parallel=parallel)
    batch = fixed_batch(Path(model_dir), seed=0)
    with torch.no_grad():  # a forward runs through both stages: each returns the last stage's logprobs
        logp, entropy = response_logprobs(backend.model, micro_inputs(batch, "cpu"), temperature=1.0)
    rows = list(range(rank * 8, (rank + 1) * 8))
    metrics = backend.train(batch.rows(rows))
    published = {n: t.clone() for n, t in backend.weights()[0].items()}
    gpt = backend.model.gpt
    numbers = [int(layer.layer_number) for layer in gpt.decoder.layers]  # Megatron's global numbering (1-based)
    ckpt = Path(out).parent / "ckpt"
    second = fixed_batch(Path(model_dir), seed=2).rows(rows)
    after, again, resumed_equal = resume_check(
        backend, lambda: build_backend(cfg, ALGO, temperature=1.0, parallel=parallel), ckpt, parallel, second
    )
    # the same checkpoint at another split (2 + 1): resharded, it holds the weights saved
    other = config(Path(model_dir), pipeline_parallel=2, last_stage_layers=1)
    moved: Any = build_backend(other, ALGO, temperature=1.0, parallel=parallel)
    moved.load(ckpt)
    moved_weights = {n: t.clone() for n, t in moved.weights()[0].items()}
    moved_layers = sorted(n for n, _ in moved.model.gpt.named_parameters() if n.startswith("decoder.layers."))
    torch.save({"logp": logp, "entropy": entropy, "metrics": metrics, "weights": published, "numbers": numbers,
                "after": after, "again": again, "resumed_equal": resumed_equal, "moved": moved_weights,
                "moved_layers": moved_layers}, f"{out}.{rank}")  # fmt: skip
    leave_ranks(parallel)


def test_uneven_stages_over_gloo_ranks_take_the_step_one_rank_takes(models: dict[str, Path], tmp_path: Path) -> None:
    model_dir = models["three"]
    out = tmp_path / "rank"
    ranks = spawn_ranks(_uneven_worker, 2, out, str(model_dir), str(out))
    single: Any = build_backend(config(model_dir), ALGO, temperature=1.0, parallel=DataParallel())
    batch = fixed_batch(model_dir, seed=0)
    mask = batch.mask_BT.bool()
    logp, entropy, metrics, published = one_rank_step(single, batch)
    assert [r["numbers"] for r in ranks] == [[1], [2, 3]]  # the first stage 1 layer, the last 2; numbered globally
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["logp"][mask], logp[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"][mask], entropy[mask], atol=1e-5, rtol=1e-5)
        for name in ("loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "tokens"):
            assert got["metrics"][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
        assert_weights_close(got["weights"], published)
        assert got["again"]["loss"] == got["after"]["loss"] and got["again"]["grad_norm"] == got["after"]["grad_norm"]
        assert got["resumed_equal"], r
        for name, tensor in got["weights"].items():  # resumed at 2 + 1: the weights it saved, moved between stages
            assert torch.equal(got["moved"][name], tensor), name
    assert {n.split(".")[2] for n in ranks[0]["moved_layers"]} == {"0", "1"}  # 2 + 1 now
    assert {n.split(".")[2] for n in ranks[1]["moved_layers"]} == {"0"}
    assert not torch.equal(published["model.layers.2.mlp.down_proj.weight"],
                           load_causal_lm(str(model_dir), dtype="float32", device="cpu").state_dict()[
                               "model.layers.2.mlp.down_proj.weight"])  # fmt: skip
    ckpt = tmp_path / "ckpt"
    recorded = json.loads((ckpt / SIZES_FILE).read_text())
    assert (recorded["first_stage_layers"], recorded["last_stage_layers"]) == (1, None)
    assert saved_sizes(ckpt) == Sizes(1, 2, 1, first=1)
