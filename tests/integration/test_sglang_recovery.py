"""`SGLangEngine` where SGLang 0.5.23 differs from the first picture of it (the stand-in plays each case as read in
SGLang's source, tests/sglang_standin.py): a paused server fails /health_generate; a weight-update group is
made once per name; a version is recorded per successful bucket; a session left open refuses the next begin;
a /generate refused with 400; what /server_info must say; separate api and admin keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import test_sglang
import torch
from test_sglang import GREEDY, Standin, config, free_port, perturbed, publish, requests

from miles_stream.engines.base import GenerationRequest, SamplingParams
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.engines.sglang.client import RequestRefused, SGLangClient, Unauthorized
from miles_stream.engines.sglang.config import SGLangConfig
from miles_stream.engines.sglang.engine import SGLangEngine, make_push, moe_layout
from miles_stream.engines.sglang.server_info import Unsuitable
from miles_stream.engines.sglang.updates import WeightUpdateError
from miles_stream.errors import InvalidRequest

dense_dir, moe_dir, native, servers = (test_sglang.dense_dir, test_sglang.moe_dir, test_sglang.native,
                                      test_sglang.servers)  # fmt: skip  # the fixtures


def distributed(*urls: str) -> tuple[SGLangConfig, SGLangEngine]:
    cfg = config(*urls, weight_sync="distributed", sync_backend="gloo", sync_device="cpu",
                 sync_master_port=free_port(), health_interval_s=3600)  # fmt: skip  # recover() called by hand
    push = make_push(cfg)
    push.bucket_bytes = 16 << 10  # type: ignore[attr-defined]  # the tiny model in several buckets
    return cfg, SGLangEngine(cfg, push=push)


async def same_as_native(engine: SGLangEngine, native: NativeEngine, version: int, state: dict[str, torch.Tensor],
                         times: int = 4) -> None:  # fmt: skip
    await native.update_weights(version, state)
    (want,) = await native.generate(requests(1))
    for _ in range(times):  # spread over the servers
        (got,) = await engine.generate(requests(1))
        assert got.response_ids.tolist() == want.response_ids.tolist()
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.version_spans.tolist() == [[0, version]]


async def test_a_paused_server_fails_the_health_probe_and_is_resumed_when_attached(dense_dir: Path) -> None:
    server = Standin("--model", str(dense_dir), health_timeout_s=1.0)
    engine = SGLangEngine(config(server.url))
    try:
        await server.call("/pause_generation", {"mode": "retract"})  # as a failed update left it
        client = SGLangClient(server.url)
        assert not await client.health_generate(timeout_s=15)  # SGLang: waits on the pause lock, then 503
        await client.close()
        await engine.start()
        assert engine.servers == {server.url: True}
        assert not (await server.call("/standin/stats"))["paused"]
        (result,) = await engine.generate(requests(1))
        assert len(result.response_ids) == 12
    finally:
        await engine.close()
        server.stop()


async def test_a_push_failing_at_bucket_two_sets_no_version_ends_the_session_and_a_good_push_follows(
    servers: list[Standin], native: NativeEngine, dense_dir: Path, tmp_path: Path
) -> None:
    _, engine = distributed(*(s.url for s in servers))
    await engine.start()
    try:
        await servers[0].call("/standin/faults", {"fail_update_call": 2})
        bad = perturbed(dense_dir, seed=11)

        async def load_bad() -> dict[str, torch.Tensor]:
            return bad

        with pytest.raises(WeightUpdateError, match="injected failure"):
            await engine.apply_manifest(await publish(tmp_path, 1, bad), load_bad)
        first_groups = []
        for s in servers:
            stats = await s.call("/standin/stats")
            assert stats["version"] == "default" and not stats["session"] and stats["paused"]
            first_groups += stats["groups"]
        assert len((await servers[0].call("/standin/stats"))["loaded"]) == 1  # bucket 1 is in: half new
        assert engine.weight_version == 0 and not any(engine.servers.values())
        await engine.recover()  # no whole version to give them yet: they stay out, and paused
        assert not any(engine.servers.values())
        assert all([(await s.call("/standin/stats"))["paused"] for s in servers])

        state = perturbed(dense_dir, seed=12)

        async def load() -> dict[str, torch.Tensor]:
            return state

        await engine.apply_manifest(await publish(tmp_path, 2, state), load)
        assert engine.weight_version == 2
        await engine.recover()  # whole and resumed: the health loop's probe puts them back
        assert all(engine.servers.values())
        for s in servers:
            stats = await s.call("/standin/stats")
            assert stats["version"] == "2" and not stats["paused"] and not stats["session"]
            assert len(stats["groups"]) == 1 and stats["groups"][0] not in first_groups  # a new group
        await same_as_native(engine, native, 2, state)
    finally:
        await engine.close()
    for s in servers:
        assert (await s.call("/standin/stats"))["groups"] == []  # destroyed at close


async def test_membership_changes_remake_the_weight_group_on_every_side(
    servers: list[Standin], native: NativeEngine, dense_dir: Path, tmp_path: Path
) -> None:
    from torch.distributed.distributed_c10d import _world

    first, second = servers
    _, engine = distributed(first.url, second.url)
    await engine.start()
    names: list[str] = []
    states = {v: perturbed(dense_dir, seed=20 + v) for v in (1, 2, 3)}

    async def apply(v: int) -> None:
        async def load() -> dict[str, torch.Tensor]:
            return states[v]

        await engine.apply_manifest(await publish(tmp_path, v, states[v]), load)

    async def groups(s: Standin) -> list[str]:
        return list((await s.call("/standin/stats"))["groups"])

    try:
        await apply(1)
        assert await groups(first) == await groups(second) and len(await groups(first)) == 1
        names += await groups(first)
        await engine.detach(second.url, grace_s=1)  # destroyed on both servers and on our side
        assert await groups(first) == [] and await groups(second) == []
        assert names[0] not in _world.pg_names.values()
        await apply(2)
        names += await groups(first)
        await engine.attach(second.url)  # synced to 2 alone: a group over it alone
        assert (await second.call("/standin/stats"))["version"] == "2"
        names += await groups(second)
        assert await groups(first) == []
        await apply(3)
        assert await groups(first) == await groups(second)
        names += await groups(first)
        assert len(names) == len(set(names)) == 4  # a name is never used twice
        await same_as_native(engine, native, 3, states[3])
    finally:
        await engine.close()


async def test_tensor_push_sends_each_tp_rank_its_own_entry_and_ends_a_stale_session(
    dense_dir: Path, native: NativeEngine, tmp_path: Path
) -> None:
    server = Standin("--model", str(dense_dir), "--tp-size", "2")  # it plays rank 0; /server_info says 2
    state = perturbed(dense_dir, seed=30)

    async def load() -> dict[str, torch.Tensor]:
        return state

    strategy = torch.multiprocessing.get_sharing_strategy()  # type: ignore[no-untyped-call]
    torch.multiprocessing.set_sharing_strategy("file_system")  # type: ignore[no-untyped-call]  # CPU handles
    engine = SGLangEngine(config(server.url, weight_sync="tensor", tensor_devices=("cpu", "cpu")))
    try:
        await engine.start()
        await server.call("/begin_weight_update", {})  # a session an earlier update left open
        await engine.apply_manifest(await publish(tmp_path, 1, state), load)
        stats = await server.call("/standin/stats")
        assert stats["version"] == "1" and not stats["session"]
        assert stats["entries"][:2] == [2, 2]  # two entries, each pickled on its own
        await same_as_native(engine, native, 1, state, times=1)
    finally:
        await engine.close()
        server.stop()
        torch.multiprocessing.set_sharing_strategy(strategy)  # type: ignore[no-untyped-call]


async def test_attach_refuses_a_server_the_run_cannot_use(dense_dir: Path, moe_dir: Path) -> None:
    moe, dp2 = Standin("--model", str(moe_dir)), Standin("--model", str(dense_dir), "--dp-size", "2")
    try:
        layout = moe_layout(str(moe_dir))
        engine = SGLangEngine(config(moe.url), layout=layout)
        with pytest.raises(Unsuitable, match="--enable-return-routed-experts"):
            await engine.start()
        await engine.close()
        engine = SGLangEngine(config(moe.url, require_routed_experts=False), layout=layout)
        await engine.start()
        (result,) = await engine.generate(requests(1))
        assert result.routing is None and len(result.response_ids) == 12
        await engine.close()
        for sync in ("distributed", "tensor"):
            engine = SGLangEngine(config(dp2.url, weight_sync=sync, sync_device="cpu"))
            with pytest.raises(Unsuitable, match="dp_size 2"):
                await engine.start()
            await engine.close()
        engine = SGLangEngine(config(dp2.url))  # disk: each replica loads from disk
        await engine.start()
        await engine.close()
    finally:
        moe.stop()
        dp2.stop()


async def test_api_and_admin_keys_go_to_the_routes_sglang_guards_with_them(dense_dir: Path, tmp_path: Path) -> None:
    server = Standin("--model", str(dense_dir), "--api-key", "user", "--admin-api-key", "admin", key="user")
    user_only = SGLangClient(server.url, api_key="user")
    admin_as_user = SGLangClient(server.url, api_key="admin")
    engine = SGLangEngine(config(server.url, api_key="user", admin_api_key="admin"))
    try:
        assert await SGLangClient(server.url).health_generate()  # health needs no key
        with pytest.raises(Unauthorized, match=r"rollout\.sglang\.api_key"):
            await admin_as_user.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})
        with pytest.raises(Unauthorized, match="admin_api_key"):
            await user_only.pause("retract")
        await engine.start()
        state = perturbed(dense_dir, seed=40)
        await engine.apply_manifest(await publish(tmp_path, 1, state), _no_state)  # pause, flush, disk, continue
        (result,) = await engine.generate(requests(1))
        assert result.version_spans.tolist() == [[0, 1]]
    finally:
        await engine.close()
        await user_only.close()
        await admin_as_user.close()
        server.stop()


async def test_a_refused_generate_is_a_bad_request_not_a_dead_server(dense_dir: Path) -> None:
    server = Standin("--model", str(dense_dir), "--context-length", "32")
    engine = SGLangEngine(config(server.url))
    client = SGLangClient(server.url)
    try:
        await engine.start()
        too_long = GenerationRequest(request_id="long", prompt_ids=list(range(1, 33)), params=GREEDY)
        with pytest.raises(RequestRefused, match=r"longer than the model's context length \(32 tokens\)") as info:
            await engine.generate([too_long])
        assert isinstance(info.value, InvalidRequest) and "HTTP" not in str(info.value)
        over = dataclasses.replace(GREEDY, max_new_tokens=40)
        with pytest.raises(RequestRefused, match="exceeds the model's maximum context length of 32 tokens"):
            await engine.generate(requests(1, over))
        with pytest.raises(RequestRefused, match=r"top_p must be in \(0, 1\], got 0.0"):
            await client.generate({"input_ids": [1, 2], "sampling_params": {"top_p": 0.0, "max_new_tokens": 4}})
        assert engine.servers == {server.url: True}  # not taken out of rotation
        (result,) = await engine.generate(requests(1, SamplingParams(temperature=0.0, max_new_tokens=4)))
        assert len(result.response_ids) >= 1
    finally:
        await engine.close()
        await client.close()
        server.stop()


async def _no_state() -> dict[str, torch.Tensor]:
    raise AssertionError("the disk push must not load tensors in this process")


async def test_a_server_an_update_failed_on_leaves_the_router_until_it_is_current_again(
    dense_dir: Path, tmp_path: Path
) -> None:
    server, router = Standin("--model", str(dense_dir)), Standin("--router")
    engine = SGLangEngine(config(server.url, router_url=router.url, health_interval_s=3600))
    try:
        await engine.start()
        assert [w["url"] for w in (await router.call("/workers"))["workers"]] == [server.url]
        await server.call("/standin/faults", {"fail_next_update": True})
        with pytest.raises(WeightUpdateError):
            await engine.apply_manifest(await publish(tmp_path, 1, perturbed(dense_dir, seed=50)), _no_state)
        assert (await router.call("/workers"))["workers"] == []  # paused: the router must not wait on it
        await engine.recover()
        assert [w["url"] for w in (await router.call("/workers"))["workers"]] == [server.url]
        assert engine.servers == {server.url: True}
    finally:
        await engine.close()
        server.stop()
        router.stop()
