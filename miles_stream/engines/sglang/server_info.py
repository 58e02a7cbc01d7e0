"""What a run needs of an SGLang server, checked against its `/server_info` before it is attached.

`/server_info` is the server's resolved arguments (sglang/srt/entrypoints/http_server.py:863-893,
utils/common.py:3584-3593): `tp_size`, `dp_size`, `pp_size` (arg_groups/fields/parallel.py:45-80),
`enable_return_routed_experts` (fields/exec_.py:158-160).
"""

from __future__ import annotations

from typing import Any

from miles_stream.engines.sglang.client import SGLangError


class Unsuitable(SGLangError):
    """The server runs, but not as this run needs it: refused at attach, with what to change."""


def check_server(url: str, info: dict[str, Any], *, routing: bool, weight_sync: str, tensor_ranks: int) -> None:
    """Raise `Unsuitable` naming the first thing `info` lacks.

    - `routing` (an MoE model with rollout.sglang.require_routed_experts): without
      --enable-return-routed-experts SGLang sends no `routed_experts` and no error either (the capturer is None,
      managers/scheduler_components/batch_result_processor.py:149-152): groups would carry no routing for R3.
    - `distributed` and `tensor` pushes: SGLang asserts dp_size == 1 for them
      (managers/tokenizer_control_mixin.py:451-453, 509-511, 569-571); the ranks that join a weight group are
      rank_offset + tp_rank (model_runner_components/weight_updater.py:124) and a tensor entry is read by
      tp_rank (managers/tp_worker.py:194-201): pipeline stages have no place in either, so pp_size must be 1.
    - `tensor`: one entry per TP rank, staged on rollout.sglang.tensor_devices (`tensor_ranks` of them).
    """
    tp, dp, pp = (int(info.get(k) or 1) for k in ("tp_size", "dp_size", "pp_size"))
    if routing and not info.get("enable_return_routed_experts"):
        raise Unsuitable(url, "the model is MoE and the run needs its routing (R3), but the server was not started "
                              "with --enable-return-routed-experts; restart it with that flag, or set "
                              "rollout.sglang.require_routed_experts=false to run without routing traces")  # fmt: skip
    if weight_sync in ("distributed", "tensor") and (dp != 1 or pp != 1):
        raise Unsuitable(url, f"weight_sync={weight_sync} pushes to servers with dp_size 1 and pp_size 1; this one "
                              f"has dp_size {dp}, pp_size {pp}: run one server per data-parallel replica, or use "
                              "weight_sync=disk")  # fmt: skip
    if weight_sync == "tensor" and tp != tensor_ranks:
        raise Unsuitable(url, f"weight_sync=tensor stages one copy per TP rank on rollout.sglang.tensor_devices "
                              f"({tensor_ranks} given); this server has tp_size {tp}: one device per rank")  # fmt: skip
