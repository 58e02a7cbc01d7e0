"""The native engine on a GPU: static KV cache and CUDA graphs report what a teacher-forced pass computes,
in float32 tightly and in bf16 within a stated tolerance, and keep doing so after an in-place weight update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from miles_stream.engines.native.engine import NativeEngine
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.rollout import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def teacher_forced(model: torch.nn.Module, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + response], device="cuda")
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, len(prompt) - 1 :].float()
    target = torch.tensor(response, device="cuda")[:, None]
    return torch.log_softmax(logits / temperature, -1).gather(-1, target).squeeze(-1).cpu()


@pytest.mark.parametrize(("dtype", "mean_tol", "max_tol"), [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 0.03, 0.3)])
async def test_static_cache_and_graphs_match_a_teacher_forced_pass(
    tmp_path: Path, dtype: torch.dtype, mean_tol: float, max_tol: float
) -> None:
    model_dir = build_tiny_model(tmp_path, TinyModelConfig(kind="dense", max_position=1024))
    engine = NativeEngine(str(model_dir), device="cuda", dtype=dtype, max_batch=4, max_seq_len=512,
                          kv_cache="static")  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    params = SamplingParams(temperature=0.9, max_new_tokens=40, ignore_eos=True)
    requests = [GenerationRequest(request_id=f"r{i}", prompt_ids=list(range(5, 9 + 3 * i)), params=params)
                for i in range(7)]  # 7 requests through 4 slots: rows join, leave and are compacted  # fmt: skip
    try:
        for version in (0, 1):
            if version:  # in place: the captured graphs must see the new weights
                noise: dict[int, torch.Tensor] = {}  # one draw per storage: tied embeddings move together
                moved = {k: v + noise.setdefault(v.data_ptr(), 0.02 * torch.randn_like(v))
                         for k, v in reference.state_dict().items()}  # fmt: skip
                await engine.update_weights(1, moved)
                reference.load_state_dict(moved)
            for req, res in zip(requests, await engine.generate(requests), strict=True):
                want = teacher_forced(reference, list(req.prompt_ids), res.response_ids.tolist(), 0.9)
                diff = (torch.from_numpy(res.logprobs) - want).abs()
                assert float(diff.mean()) < mean_tol and float(diff.max()) < max_tol, (version, req.request_id)
                assert res.version_spans.tolist() == [[0, version]]
        assert engine._static is not None and engine._static._graphs  # the decode ran through CUDA graphs
    finally:
        await engine.close()
