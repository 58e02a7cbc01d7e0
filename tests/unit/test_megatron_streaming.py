"""The Megatron backend at a model's real size: a rank reads only its own share of the Hugging Face checkpoint
(its pipeline stage's layers, its expert-parallel rank's experts), one tensor at a time, and a publication streams
the gathered HF tensors one at a time (the trainer never holds the whole model twice), in the publish dtype, and an
export streams them into safetensors shards as save_pretrained would write them.

The split a rank reads is checked against the eager conversion the other tests check against HF (`to_megatron`,
`by_stage`, `by_expert`); the reads are recorded by name, so reading the whole checkpoint on every rank fails."""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.trainer.algo_config import AlgoConfig
from miles_stream.trainer.backends import build_backend
from miles_stream.trainer.config import TrainerConfig
from miles_stream.trainer.megatron.build import Checkpoint
from miles_stream.trainer.megatron.config import MegatronConfig
from miles_stream.trainer.megatron.convert import Qwen3Shape, by_expert, by_stage, rank_name, rank_params, to_megatron
from miles_stream.trainer.megatron.layout import MegatronLayout
from miles_stream.trainer.megatron.parallel import release_groups
from miles_stream.trainer.parallel import DataParallel
from miles_stream.trainer.torch.hf import export_streamed, load_causal_lm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("megatron-streaming")
    yield {"tied": build_tiny_model(tmp / "tied"),
           "untied": build_tiny_model(tmp / "untied", TinyModelConfig(tie_embeddings=False, seed=3)),
           "moe": build_tiny_model(tmp / "moe", TinyModelConfig(kind="moe"))}  # fmt: skip
    release_groups()  # the one-rank process group the backend made in this process


class Recording(Checkpoint):
    """The lazy checkpoint, remembering which tensors were read."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.read: list[str] = []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.append(name)
        return super().__getitem__(name)


def rank_share(path: Path, shape: Qwen3Shape, **where: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(this rank's parameters under their local names, the checkpoint tensors read), as build.load_policy reads."""
    hf = Recording(str(path))
    keep = lambda n: rank_name(n, shape, **where) is not None  # noqa: E731
    got = {rank_name(n, shape, **where): t for n, t in rank_params(hf, shape, 1, 0, keep=keep)}
    return {n: t for n, t in got.items() if n is not None}, hf.read


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_a_pipeline_stage_reads_only_its_layers(models: dict[str, Path], kind: str) -> None:
    config = load_causal_lm(str(models[kind]), dtype="float32", device="cpu").config
    shape = Qwen3Shape.of(config)
    whole = to_megatron(Checkpoint(str(models[kind])), shape)[0]
    for stage, expected in enumerate(by_stage(whole, shape, 2)):
        got, read = rank_share(models[kind], shape, pp=2, stage=stage)
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
        other = f"model.layers.{1 - stage}."  # two layers: one a stage
        assert not [n for n in read if n.startswith(other)]
        assert ("model.norm.weight" in read) == (stage == 1)
        # the embedding: the first stage's, and a tied model's last stage's copy
        assert ("model.embed_tokens.weight" in read) == (stage == 0 or kind == "tied")


def test_an_expert_parallel_rank_reads_only_its_experts(models: dict[str, Path]) -> None:
    config = load_causal_lm(str(models["moe"]), dtype="float32", device="cpu").config
    shape = Qwen3Shape.of(config)
    hf = Checkpoint(str(models["moe"]))
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in hf  # the on-disk form: one tensor an expert
    whole = to_megatron(hf, shape)[0]
    for ep_rank, expected in enumerate(by_expert(whole, shape, 2)):
        got, read = rank_share(models["moe"], shape, ep=2, ep_rank=ep_rank)
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
        experts = {int(n.split(".")[5]) for n in read if ".mlp.experts." in n}  # model.layers.i.mlp.experts.e.
        assert experts == set(range(4 * ep_rank, 4 * ep_rank + 4))  # 8 experts, 4 a rank


def test_the_lazy_checkpoint_reads_nothing_until_asked(models: dict[str, Path], monkeypatch: Any) -> None:
    from safetensors.torch import load_file

    reads: list[str] = []
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: reads.append("whole") or load_file(*a, **k))
    hf = Checkpoint(str(models["tied"]))
    assert not reads and "model.embed_tokens.weight" in hf and len(hf) == len(load_file(
        str(models["tied"] / "model.safetensors")))  # fmt: skip
    with pytest.raises(KeyError):
        hf["model.nothing.weight"]


def test_a_publication_streams_one_tensor_at_a_time_in_the_publish_dtype(models: dict[str, Path]) -> None:
    cfg = TrainerConfig(model=str(models["untied"]), lr=1e-3, micro_batch_tokens=40, backend="megatron",
                        megatron=MegatronConfig())  # fmt: skip
    backend: Any = build_backend(cfg, AlgoConfig(), temperature=1.0, parallel=DataParallel())
    published, dtype = backend.weights()
    assert dtype is None  # float32 compute over float32 parameters
    expected = {n: t.clone() for n, t in published.items()}  # the stream, read whole
    assert list(expected) == list(load_causal_lm(str(models["untied"]), dtype="float32", device="cpu").state_dict())

    # reading it again, a layer's tensors are gone once the reader has moved past the layer (the old dict held
    # every tensor until the publication ended), the embedding too (it was held for lm_head until the end)
    alive: dict[str, weakref.ref[torch.Tensor]] = {}
    for name, tensor in published.items():
        if name.startswith("model.layers.1."):
            assert not [n for n, ref in alive.items() if n.startswith("model.layers.0.") and ref() is not None]
            assert alive["model.embed_tokens.weight"]() is None
        alive[name] = weakref.ref(tensor)
        del tensor

    # in bf16 (the publish dtype under bf16 compute over float32 main params, CUDA only for this backend): cast
    # before the gather, the same values as a cast after it
    policy = backend.policy
    layout = MegatronLayout(policy.layout.groups, DataParallel(), backend.model, publish_dtype=torch.bfloat16)
    half = dict(layout.weights(backend.model).items())
    assert list(half) == list(expected)
    for name, tensor in expected.items():
        assert half[name].dtype == torch.bfloat16
        assert torch.equal(half[name], tensor.to(torch.bfloat16)), name
    assert dict(layout.weights(backend.model)).keys() == half.keys()  # by name: gathered whole once
    gathers = 0
    streamed = layout.weights(backend.model)
    produce = streamed._produce  # type: ignore[attr-defined]

    def counted() -> Any:
        nonlocal gathers
        gathers += 1
        return produce()

    streamed._produce = counted  # type: ignore[attr-defined]
    assert [n for n, _ in list(streamed.items())] == list(half) and gathers == 1  # list() streams once


@pytest.mark.parametrize("kind", ["tied", "untied", "moe"])
def test_a_streamed_export_writes_what_save_pretrained_writes(models: dict[str, Path], tmp_path: Path,
                                                              kind: str) -> None:  # fmt: skip
    """Shards of at most `shard_bytes` (here small: several files and their index), the on-disk names (a MoE
    layer's fused experts one tensor an expert, no tied lm_head), loadable by transformers; the writing rank's
    tensors came one at a time."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(str(models[kind]), dtype="float32", device="cpu")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    export_streamed(skeleton, models[kind], tmp_path / "out", iter(model.state_dict().items()), write=True,
                    shard_bytes=200_000)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    written = {k: t for f in files for k, t in load_file(str(tmp_path / "out" / f)).items()}
    assert set(index["weight_map"]) == set(written)
    model.save_pretrained(tmp_path / "hf")  # transformers' own
    theirs = {k: t for p in (tmp_path / "hf").glob("*.safetensors") for k, t in load_file(str(p)).items()}
    assert set(written) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(written[name], tensor), name
    back = load_causal_lm(str(tmp_path / "out"), dtype="float32", device="cpu").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back[name], tensor), name
    assert (tmp_path / "out" / "tokenizer.json").is_file() or (tmp_path / "out" / "tokenizer_config.json").is_file()
