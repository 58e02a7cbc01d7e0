"""The cuda_ipc transport between two processes on one GPU: what a producer process copies equals what the
trainer wrote, and a slot overwritten by a newer version is refused, never loaded half-new."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles_stream.weights.cuda_ipc import CudaIpcSender
from miles_stream.weights.manifest import encode_manifest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

READER = textwrap.dedent(
    """
    import asyncio, sys
    from safetensors.torch import save_file
    from miles_stream.errors import WeightIntegrityError
    from miles_stream.weights.cuda_ipc import CudaIpcReceiver
    from miles_stream.weights.manifest import decode_manifest
    out = sys.argv[1]
    receiver = CudaIpcReceiver("cuda")
    manifests = [decode_manifest(open(f"{out}/m{v}", "rb").read()) for v in (1, 2)]
    for m in manifests:
        state = asyncio.run(receiver.read(m))
        assert all(t.device.type == "cuda" for t in state.values())
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, f"{out}/got{m.version}.safetensors")
    print("read", flush=True)
    sys.stdin.readline()  # the trainer has written version 3 into version 1's slot
    try:
        asyncio.run(receiver.read(manifests[0]))
        print("loaded-stale", flush=True)
    except WeightIntegrityError as exc:
        print("refused", exc, flush=True)
    """
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "embed.weight": torch.randn(1000, 64, device="cuda", generator=g).to(torch.bfloat16),
        "layer.norm": torch.randn(64, device="cuda", generator=g),
        "head.bias": torch.randn(7, device="cuda", generator=g).to(torch.float16),
    }


def test_a_producer_process_copies_each_version_and_refuses_an_overwritten_slot(tmp_path: Path) -> None:
    sender = CudaIpcSender()
    states = {v: _state(v) for v in (1, 2, 3)}
    for v in (1, 2):
        manifest = asyncio.run(sender.write(v, states[v]))
        (tmp_path / f"m{v}").write_bytes(encode_manifest(manifest))
    with subprocess.Popen([sys.executable, "-c", READER, str(tmp_path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]) as reader:  # fmt: skip
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "read"
        for v in (1, 2):
            got = load_file(str(tmp_path / f"got{v}.safetensors"))
            assert set(got) == set(states[v])
            for name, tensor in states[v].items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor.cpu())
        asyncio.run(sender.write(3, states[3]))  # slots alternate: version 3 lands where version 1 was
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().startswith("refused")
        reader.stdin.close()
        reader.wait(timeout=60)
    assert reader.returncode == 0
