"""The rollout producer with a real Redis, the native engine and a tiny model: prompts become valid, scored
groups; producers share prompts without duplicates; stopping hands prompts back; nothing is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
import torch
from instant_engine import ByteTokenizer, LateEngine, constant_reward
from transformers import AutoTokenizer

from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Keys, StreamClient, StreamConsumer
from miles_stream.codec import GroupCodec
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.models import TinyModelConfig, build_tiny_model
from miles_stream.prompts import decode_prompt
from miles_stream.rewards import toy_addition
from miles_stream.rollout import SamplingParams
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.producer import RolloutProducer
from miles_stream.rollout.turns import ToolLoop
from miles_stream.schema import validate_group


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe"), TinyModelConfig(kind="moe", max_position=8192))


def addition_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i + 1}=", "label": str(2 * i + 1)}) + "\n" for i in range(n)))
    return path


async def feed(redis: aioredis.Redis, keys: Keys, bus: BusConfig, path: Path) -> int:
    config = FeederConfig(path=str(path))
    return await Feeder(redis, keys, bus, config, load_rows(config)).run()


@pytest.fixture
async def make_producer(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, model_dir: Path
) -> AsyncIterator[object]:
    engines: list[NativeEngine] = []

    def make(
        name: str, rollout_fn: object = None, weights: object = None, bus: BusConfig | None = None, **overrides: object
    ) -> RolloutProducer:
        bus = bus or bus_config
        sampling = SamplingParams(max_new_tokens=int(overrides.pop("max_new_tokens", 4)),  # type: ignore[call-overload]
                                  ignore_eos=bool(overrides.pop("ignore_eos", False)),
                                  stop_token_ids=tuple(overrides.pop("stop_token_ids", ())))  # type: ignore[arg-type]  # fmt: skip
        config = RolloutConfig(model=str(model_dir), producer_id=name, n_samples_per_prompt=3, sampling=sampling,
                               **overrides)  # type: ignore[arg-type]  # fmt: skip
        engine = NativeEngine(str(model_dir), max_batch=8)
        engines.append(engine)
        prompts, partials = (StreamConsumer(redis, blocking, stream=stream, group="producers", consumer=name,
                                            dead_stream=keys.dead, config=bus)
                             for stream in (keys.prompts, keys.partials))  # fmt: skip
        extra = {"rollout_fn": rollout_fn} if rollout_fn is not None else {}
        if weights is not None:
            extra["weights"] = weights
        return RolloutProducer(config, engine=engine, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                               reward_fn=toy_addition, prompts=prompts, partials=partials,
                               publisher=GroupPublisher(blocking, keys.trajectories, bus), **extra)  # fmt: skip

    yield make
    for e in engines:
        await e.close()


async def collect(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus: BusConfig, want: int, commit: bool = True
) -> list:
    trainer = GroupConsumer(StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer",
                                           consumer="t", dead_stream=keys.dead, config=bus), keys)  # fmt: skip
    await trainer.start()
    got: list = []
    for _ in range(600):
        got += await trainer.read(10)
        if len(got) >= want:
            break
    if commit:
        await trainer.commit(got)
    return got


async def until(condition: object, timeout_s: float = 60.0, what: str = "") -> None:
    """Poll `condition()` (sync or async) until it holds; fail after `timeout_s` (a bound, not a timing
    assumption)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()  # type: ignore[operator]
        if asyncio.iscoroutine(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what}")
        await asyncio.sleep(0.05)


async def test_prompts_become_valid_scored_groups(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 5))
    producer = make_producer("p0")
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    got = await collect(redis, blocking, keys, bus_config, want=5)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert sorted(r.group.group_id for r in got) == [f"e0-i{i}" for i in range(5)]
    for r in got:
        validate_group(r.group)
        assert len(r.group.samples) == 3 and r.group.producer_id == "p0"
        assert all(0.0 <= s.reward <= 1.0 and s.routing is not None for s in r.group.samples)
    assert (await redis.xpending(keys.prompts, "producers"))["pending"] == 0
    assert producer.counters.groups == 5


async def test_two_producers_share_the_prompts_without_duplicates(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 8))
    stop = asyncio.Event()
    a, b = make_producer("a", max_inflight_prompts=2), make_producer("b", max_inflight_prompts=2)
    runs = [asyncio.create_task(p.run(stop)) for p in (a, b)]
    got = await collect(redis, blocking, keys, bus_config, want=8)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*runs), 30)
    ids = [r.group.group_id for r in got]
    assert len(ids) == len(set(ids)) == 8
    assert a.counters.groups + b.counters.groups == 8


async def test_stopping_hands_back_prompts_in_flight_and_loses_none(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 6))
    # One producer at a time: nothing is taken over, however slow this machine is (with the fixture's
    # claim_idle_ms=200, a loaded CPU let a partial go idle and be resumed twice).
    bus = dataclasses.replace(bus_config, claim_idle_ms=600_000)
    producer = make_producer("slow", max_new_tokens=6000, ignore_eos=True, max_inflight_prompts=3, bus=bus)
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    engine = producer.engine

    def under_way() -> bool:  # three prompts claimed, every row in the engine 8 tokens in
        return len(producer._generating) == 3 and bool(engine._rows) and all(len(r.tokens) >= 8 for r in engine._rows)

    await until(under_way, what="three prompts claimed, 8 tokens each")
    stop.set()
    await asyncio.wait_for(run, 30)
    assert producer.counters.recycled >= 1  # groups with tokens go to the partials stream, to be resumed
    assert (await redis.xpending(keys.prompts, "producers"))["pending"] == 0
    # every prompt is a published group, a partial on the partials stream, or back on the prompt stream
    rest = make_producer("rest", bus=bus, ignore_eos=True)  # every sample of a fresh prompt reaches 4 tokens
    stop2 = asyncio.Event()
    run2 = asyncio.create_task(rest.run(stop2))
    got = await collect(redis, blocking, keys, bus_config, want=6)
    stop2.set()
    await asyncio.wait_for(run2, 30)
    assert sorted(r.group.group_id for r in got) == sorted(f"e0-i{i}" for i in range(6))
    assert rest.counters.resumed == producer.counters.recycled  # the other producer finished each partial
    assert all(len(s.response_ids) >= 4 for r in got for s in r.group.samples)


async def test_stopping_repeats_the_abort_until_every_request_has_ended(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, tmp_path: Path
) -> None:
    """A request that reached the server after the stop's abort (so the server ignored that abort) is ended by the
    next one: the producer stops, hands both prompts back and leaves nothing pending. With one abort it waited
    forever (CI: a vLLM producer stopped mid-update, past its 6 s grace)."""
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 2))
    bus = dataclasses.replace(bus_config, claim_idle_ms=600_000)
    engine = LateEngine()
    prompts, partials = (StreamConsumer(redis, blocking, stream=stream, group="producers", consumer="late",
                                        dead_stream=keys.dead, config=bus)
                         for stream in (keys.prompts, keys.partials))  # fmt: skip
    config = RolloutConfig(model="unused", producer_id="late", n_samples_per_prompt=2, max_inflight_prompts=2)
    producer = RolloutProducer(config, engine=engine, tokenizer=ByteTokenizer(), reward_fn=constant_reward,
                               prompts=prompts, partials=partials,
                               publisher=GroupPublisher(blocking, keys.trajectories, bus))  # fmt: skip
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    await until(lambda: engine.calls == 2, what="both prompts in the engine")
    stop.set()
    await asyncio.wait_for(run, 30)
    assert engine.aborts >= 2
    assert producer.counters.returned == 2
    assert (await redis.xpending(keys.prompts, "producers"))["pending"] == 0


async def test_stopping_hands_back_nothing_for_a_group_the_trainer_has_done(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    """A prompt in flight whose group another producer already published and the trainer committed: stopping
    acks it and writes no new entry (a new one would outlive the done set's record of the group, bus/done.py)."""
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 3))
    bus = dataclasses.replace(bus_config, claim_idle_ms=600_000)
    producer = make_producer("slow", max_new_tokens=6000, ignore_eos=True, max_inflight_prompts=3, bus=bus)
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    await until(lambda: len(producer._generating) == 3, what="three prompts claimed")
    await redis.zadd(keys.done("trainer"), {f"e0-i{i}": 1 for i in range(3)})  # trained from copies
    stop.set()
    await asyncio.wait_for(run, 30)
    assert producer.counters.dropped_done == 3
    assert producer.counters.returned == producer.counters.recycled == 0
    assert (await redis.xpending(keys.prompts, "producers"))["pending"] == 0
    info = next(g for g in await redis.xinfo_groups(keys.prompts) if g["name"] == b"producers")
    assert await redis.xrange(keys.prompts, min="(" + info["last-delivered-id"].decode()) == []
    assert await redis.xlen(keys.partials) == 0


async def test_a_group_whose_prompt_was_taken_over_while_it_was_scored_is_not_published(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    """A producer frozen after generating (SIGSTOP) past claim_idle_ms wakes to find its prompt taken over by
    another producer, which makes and publishes that group: it must drop its own copy, not publish it (dedup
    would drop it downstream, but the bytes travel and the prompt's new owner loses its pending entry to the
    stale producer's XACK). The stall is simulated: the reward blocks until another consumer has claimed the
    entry, and keep-alive never runs (claim_idle_ms is long), so only the check at publication can see it."""
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 1))
    bus = dataclasses.replace(bus_config, claim_idle_ms=600_000)
    producer = make_producer("stalled", bus=bus)
    scoring, taken = threading.Event(), threading.Event()

    def reward(sample: object) -> float:  # per sample, in a thread: the first one waits for the takeover
        scoring.set()
        if not taken.wait(60):
            raise AssertionError("the entry was not taken over")
        return toy_addition(sample)  # type: ignore[arg-type]

    producer.reward_fn = reward
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    await until(scoring.is_set, what="the group generated and being scored")
    [pending] = await redis.xpending_range(keys.prompts, "producers", min="-", max="+", count=10)
    assert pending["consumer"] == b"stalled"
    await redis.xclaim(keys.prompts, "producers", "other", 0, [pending["message_id"]], justid=True)
    taken.set()
    await until(lambda: producer.counters.groups + getattr(producer.counters, "taken_over", 0) >= 1,
                what="the group published or dropped")  # fmt: skip
    stop.set()
    await asyncio.wait_for(run, 30)
    assert await redis.xlen(keys.trajectories) == 0
    assert producer.counters.groups == 0 and producer.counters.taken_over == 1
    [still] = await redis.xpending_range(keys.prompts, "producers", min="-", max="+", count=10)
    assert still["consumer"] == b"other"  # not acked away under its new owner


def test_cli_produce_stops_on_sigterm_and_loses_nothing(redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MILES_REDIS_URL": redis_url}
    ns = f"cli{int(time.time() * 1000) % 100000}"
    path = addition_jsonl(tmp_path / "p.jsonl", 4)
    cli = [sys.executable, "-m", "miles_stream.cli"]
    fed = subprocess.run([*cli, "feed", f"bus.namespace={ns}", f"feeder.path={path}"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert fed.returncode == 0, fed.stderr
    proc = subprocess.Popen([*cli, "produce", f"bus.namespace={ns}", f"rollout.model={model_dir}",
                             "rollout.sampling.max_new_tokens=6000", "rollout.sampling.ignore_eos=true",
                             "rollout.max_inflight_prompts=2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with sync_redis.Redis.from_url(redis_url) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.xinfo_groups(f"{ns}:prompts")[0]["pending"]:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "producer_stopped" in err
        waiting = client.xinfo_groups(f"{ns}:prompts")[0]
        assert waiting["pending"] == 0
        codec = GroupCodec()
        trained = {codec.decode(f[b"d"]).prompt_key for _, f in client.xrange(f"{ns}:trajectories")}
        after = "(" + waiting["last-delivered-id"].decode()  # handed back: re-published, not yet delivered
        returned = {decode_prompt(f[b"d"]).key for _, f in client.xrange(f"{ns}:prompts", min=after)}
        recycled = {decode_prompt(f[b"p"]).key for _, f in client.xrange(f"{ns}:partials")}
        assert len(recycled) >= 1  # it was generating when stopped: that work is kept as a partial
        # every prompt published as a group, recycled with its partial samples, or back in line
        assert trained | returned | recycled == {"0", "1", "2", "3"}


async def test_tool_turns_reach_the_trainer_with_tool_output_masked(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 2))
    every_char = tuple(range(4, 50))
    producer = make_producer("tools", rollout_fn=ToolLoop(lambda ids: [10, 11], max_turns=2),
                             max_new_tokens=20, stop_token_ids=every_char)  # fmt: skip
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    got = await collect(redis, blocking, keys, bus_config, want=2)
    stop.set()
    await asyncio.wait_for(run, 30)
    for r in got:
        validate_group(r.group)
        for s in r.group.samples:  # model turn, the tool's two tokens (masked), model turn
            assert s.loss_mask[0] == 1 and s.loss_mask[-1] == 1 and int((s.loss_mask == 0).sum()) == 2
            assert s.response_ids[s.loss_mask == 0].tolist() == [10, 11]
            assert s.logprobs[s.loss_mask == 0].tolist() == [0.0, 0.0]


async def test_producers_load_the_latest_weights_then_follow_and_reject_corrupt_ones(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path,
    model_dir: Path,
) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from miles_stream.weights.manifest import encode_manifest
    from miles_stream.weights.transports import FileTransport
    from miles_stream.weights.versions import WeightPublisher, WeightSubscriber

    # in-memory names, as a trainer publishes them (transformers 5 saves MoE experts under other names)
    base = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    transport = FileTransport(tmp_path / "weights")
    publisher = WeightPublisher(redis, keys, transport)
    await publisher.publish(1, {k: v + 0.01 for k, v in base.items()})  # before the producer exists
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 3))
    producer = make_producer("w", weights=WeightSubscriber(redis, keys, {"file": transport}))
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    got = await collect(redis, blocking, keys, bus_config, want=3)
    assert len(got) == 3
    assert all(s.version_spans.tolist() == [[0, 1]] for r in got for s in r.group.samples)
    await publisher.publish(2, {k: v - 0.01 for k, v in base.items()})
    for _ in range(100):
        if producer.engine.weight_version == 2:
            break
        await asyncio.sleep(0.05)
    assert producer.engine.weight_version == 2
    bad = await transport.write(3, dict(base))  # written, corrupted, then announced
    path = Path(bad.location) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    await redis.xadd(keys.weights, {b"version": b"3", b"manifest": encode_manifest(bad)})
    await feed_more(redis, keys, bus_config, tmp_path)
    got = await collect(redis, blocking, keys, bus_config, want=1)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert len(got) == 1
    assert producer.engine.weight_version == 2  # version 3 failed its checksum: the old weights stay
    assert all(s.version_spans.tolist() == [[0, 2]] for r in got for s in r.group.samples)


async def feed_more(redis: aioredis.Redis, keys: Keys, bus: BusConfig, tmp_path: Path) -> None:
    """The 3-prompt dataset again plus a fourth prompt: e0-i0..2 are duplicates the trainer drops, e0-i3 is new."""
    await redis.delete(f"{keys.namespace}:feeder")
    await feed(redis, keys, bus, addition_jsonl(tmp_path / "more.jsonl", 4))


async def test_a_prompt_the_model_cannot_run_is_dead_lettered_and_the_rest_go_on(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "", "label": "0"}) + "\n" + json.dumps({"prompt": "1+1=", "label": "2"}) + "\n"
    )
    await feed(redis, keys, bus_config, path)
    producer = make_producer("p")
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    got = await collect(redis, blocking, keys, bus_config, want=1)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert [r.group.prompt_key for r in got] == ["1"]
    dead = await redis.xrange(keys.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"].startswith(b"request: request")
    assert b"empty prompt" in dead[0][1][b"reason"]
    assert (await redis.xpending(keys.prompts, "producers"))["pending"] == 0


async def test_recycled_groups_resume_under_the_new_weights_with_each_token_scored_by_its_version(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path,
    model_dir: Path,
) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from miles_stream.weights.transports import FileTransport
    from miles_stream.weights.versions import WeightPublisher, WeightSubscriber

    models = [AutoModelForCausalLM.from_pretrained(model_dir).eval() for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    noise: dict[int, torch.Tensor] = {}  # one per storage: tied embeddings move together
    moved = {k: v + noise.setdefault(v.data_ptr(), 0.05 * torch.randn(v.shape, generator=generator))
             for k, v in models[1].state_dict().items()}  # fmt: skip
    models[1].load_state_dict(moved)
    transport = FileTransport(tmp_path / "weights")
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 2))
    producer = make_producer("r", weights=WeightSubscriber(redis, keys, {"file": transport}), on_update="recycle",
                             max_new_tokens=400, ignore_eos=True)  # fmt: skip
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    for _ in range(200):  # both groups in the engine, some tokens made
        if len(producer._generating) == 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    await WeightPublisher(redis, keys, transport).publish(1, moved)
    got = await collect(redis, blocking, keys, bus_config, want=2)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert producer.counters.recycled >= 1 and producer.counters.resumed >= 1 and producer.counters.groups == 2
    spanned = 0
    for r in got:
        validate_group(r.group)
        prompt = r.group.prompt_ids.tolist()
        for s in r.group.samples:
            assert len(s.response_ids) == 400 and s.finish_reason == "length"
            full = torch.tensor([prompt + s.response_ids.tolist()])
            ids = torch.from_numpy(s.response_ids.astype(np.int64))[:, None]
            with torch.no_grad():
                scored = [torch.log_softmax(m(full[:, :-1]).logits[0, len(prompt) - 1 :], -1).gather(-1, ids)[:, 0]
                          for m in models]  # fmt: skip
            bounds = [*s.version_spans[:, 0].tolist(), len(s.response_ids)]
            for (start, version), end in zip(s.version_spans.tolist(), bounds[1:], strict=True):
                got_lp = torch.from_numpy(np.array(s.logprobs[start:end]))
                assert torch.allclose(got_lp, scored[version][start:end], atol=1e-4), (start, version)
                assert not torch.allclose(got_lp, scored[1 - version][start:end], atol=1e-3)
            spanned += s.version_spans.tolist()[0][1] == 0 and len(s.version_spans) == 2
    assert spanned >= 1  # samples begun under version 0 and finished under version 1
    assert await redis.xlen(keys.partials) == 0 or (await redis.xpending(keys.partials, "producers"))["pending"] == 0


async def test_a_malformed_partial_is_dead_lettered_and_the_producer_goes_on(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    await redis.xadd(keys.partials, {b"d": b"junk", b"p": b"", b"m": b"{}"})
    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 2))
    producer = make_producer("p")
    stop = asyncio.Event()
    run = asyncio.create_task(producer.run(stop))
    got = await collect(redis, blocking, keys, bus_config, want=2)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert len(got) == 2
    dead = await redis.xrange(keys.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"].startswith(b"schema:")
    assert (await redis.xpending(keys.partials, "producers"))["pending"] == 0


async def test_admission_holds_new_groups_to_the_trainers_staleness_budget(
    redis: aioredis.Redis, blocking: StreamClient, keys: Keys, bus_config: BusConfig, make_producer, tmp_path: Path
) -> None:
    """Sync mode (max_staleness 0), a batch of 2: the producer makes 2 groups and waits; it still waits while
    the trainer holds them in its step and after the trainer moves to version 1 until the producer has version
    1 itself (a group started then would be stale); then it makes the next 2."""
    from miles_stream.bus import Heartbeat
    from miles_stream.rollout.admission import Admission

    await feed(redis, keys, bus_config, addition_jsonl(tmp_path / "p.jsonl", 8))
    trainer_says = {"rollout_batch_size": 2, "max_staleness": 0, "held": 0, "version": 0}
    producer = make_producer("a", max_inflight_prompts=8)
    admission = producer.admission = Admission(redis, keys, bus_config, producer_id="a",
                                               own_version=lambda: producer.engine.weight_version)  # fmt: skip
    stop = asyncio.Event()
    async with Heartbeat(redis, keys, role="trainer", member_id="t", config=bus_config,
                         describe=lambda: trainer_says) as beat:  # fmt: skip
        run = asyncio.create_task(producer.run(stop))
        await until(lambda: admission.waits >= 1 and producer.in_flight == 0, what="the producer waits")
        assert await redis.xlen(keys.trajectories) == 2 and producer.counters.groups == 2  # the budget, no more

        got = await collect(redis, blocking, keys, bus_config, want=2, commit=False)  # read into the trainer's step
        assert (await admission._read()).room(0, own_version=0) == 0  # in the step: nothing may start
        trainer_says.update(version=1, held=2)  # stepped and published version 1, not yet committed
        await beat.beat_now()

        async def trainer_at_1() -> bool:
            return (await admission._read()).trainer_version == 1

        await until(trainer_at_1, what="the trainer's heartbeat says version 1")
        budget = await admission._read()
        assert budget.trainer_version == 1 and budget.room(0, own_version=0) == 0  # would be stale at once
        assert producer.counters.groups == 2

        await producer.engine.update_weights(1, {})  # the producer has version 1 now: room for a batch
        await until(lambda: producer.counters.groups == 4, what="the next batch under version 1")
        await until(lambda: admission.waits >= 2 and producer.in_flight == 0, what="the producer waits again")
        assert producer.counters.groups == 4
        await GroupConsumer(StreamConsumer(redis, blocking, stream=keys.trajectories, group="trainer", consumer="t",
                                           dead_stream=keys.dead, config=bus_config), keys).commit(got)  # fmt: skip
        trainer_says["max_staleness"] = -1  # no bound: the rest go
        await beat.beat_now()
        got += await collect(redis, blocking, keys, bus_config, want=6)  # the 2 made since, and the last 4
        stop.set()
        await asyncio.wait_for(run, 30)
    assert sorted(r.group.group_id for r in got) == sorted(f"e0-i{i}" for i in range(8))
