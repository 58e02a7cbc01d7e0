"""Weight publication: bit-exact round trips over both transports, corruption rejected, pruning, following."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch

from miles_stream.bus import BusConfig, Heartbeat, Keys
from miles_stream.engines.native.engine import NativeEngine
from miles_stream.errors import SchemaError, WeightIntegrityError
from miles_stream.models import build_tiny_model
from miles_stream.weights.manifest import decode_manifest, encode_manifest
from miles_stream.weights.transports import FileTransport, RedisTransport
from miles_stream.weights.versions import WeightPublisher, WeightSubscriber


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 33, generator=g),
        "b.weight": torch.randn(17, generator=g).to(torch.bfloat16),
        "c.index": torch.arange(10, dtype=torch.int64),
        "d.flag": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
    }


@pytest.fixture(params=["redis", "file"])
def transport(request: pytest.FixtureRequest, redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> object:
    return RedisTransport(redis, keys, bucket_bytes=4096) if request.param == "redis" else FileTransport(tmp_path)


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)  # safetensors orders tensors its own way
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].view(-1).view(torch.uint8).tolist() == b[name].view(-1).view(torch.uint8).tolist(), name


async def test_published_weights_load_back_bit_exactly(redis: aioredis.Redis, keys: Keys, transport) -> None:
    publisher = WeightPublisher(redis, keys, transport)
    manifest = await publisher.publish(1, state())
    if transport.name == "redis":
        assert len(manifest.chunks) > 1  # 4 KiB buckets: several chunks
    subscriber = WeightSubscriber(redis, keys, {transport.name: transport})
    entry = await subscriber.latest()
    assert entry is not None and entry[1].version == 1
    assert_bit_exact(state(), await subscriber.load(entry[1]))
    assert decode_manifest(encode_manifest(manifest)) == manifest


async def test_a_corrupted_chunk_is_rejected(redis: aioredis.Redis, keys: Keys, transport) -> None:
    manifest = await WeightPublisher(redis, keys, transport).publish(1, state())
    if transport.name == "redis":
        await redis.setrange(f"{manifest.location}:0", 5, b"\xff")
    else:
        path = Path(manifest.location) / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(WeightIntegrityError, match="chunk 0 fails its sha256"):
        await transport.read(manifest)


async def test_a_missing_version_is_an_integrity_error(redis: aioredis.Redis, keys: Keys, transport) -> None:
    manifest = await transport.write(1, state())
    await transport.delete(1)
    with pytest.raises(WeightIntegrityError):
        await transport.read(manifest)


async def test_subscribers_follow_new_versions(redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    transport = FileTransport(tmp_path)
    publisher = WeightPublisher(redis, keys, transport)
    subscriber = WeightSubscriber(redis, keys, {"file": transport})
    assert await subscriber.latest() is None
    await publisher.publish(1, state())
    first = await subscriber.latest()
    assert first is not None
    assert await subscriber.next_after(first[0], block_ms=50) is None
    await publisher.publish(2, {"a.weight": torch.ones(2)})
    nxt = await subscriber.next_after(first[0], block_ms=50)
    assert nxt is not None and nxt[1].version == 2
    assert_bit_exact({"a.weight": torch.ones(2)}, await subscriber.load(nxt[1]))


async def test_malformed_announcements_are_passed_over(redis: aioredis.Redis, keys: Keys, tmp_path: Path) -> None:
    """An announcement with no manifest, or one that does not decode, is logged and skipped by `latest` and
    by followers: it used to stop every producer and a trainer's --resume."""
    transport = FileTransport(tmp_path)
    publisher = WeightPublisher(redis, keys, transport)
    subscriber = WeightSubscriber(redis, keys, {"file": transport})
    await publisher.publish(1, state())
    good = await subscriber.latest()
    assert good is not None
    await redis.xadd(keys.weights, {b"version": b"99", b"manifest": b"\xc1 not msgpack"})
    await redis.xadd(keys.weights, {b"version": b"100"})
    latest = await subscriber.latest()
    assert latest is not None and latest[1].version == 1  # the newest that decodes
    only_garbage = await subscriber.next_after(good[0], block_ms=50)
    assert only_garbage is not None and only_garbage[1] is None  # read past, nothing to load
    await publisher.publish(2, {"a.weight": torch.ones(2)})
    nxt = await subscriber.next_after(only_garbage[0], block_ms=50)
    assert nxt is not None and nxt[1] is not None and nxt[1].version == 2


async def test_old_versions_are_deleted_once_no_producer_uses_them(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig
) -> None:
    transport = RedisTransport(redis, keys)
    publisher = WeightPublisher(redis, keys, transport, heartbeat_ttl_s=bus_config.heartbeat_ttl_s)
    in_use = {"weight_version": 1}
    async with Heartbeat(redis, keys, role="producer", member_id="p", config=bus_config, describe=lambda: in_use) as hb:
        for v in (1, 2, 3):
            await publisher.publish(v, {"w": torch.full((2,), float(v))})
        assert await redis.exists(f"{keys.weights}:v1:0")  # the producer still uses version 1
        in_use["weight_version"] = 3
        await hb.beat()
        await publisher.publish(4, {"w": torch.zeros(2)})
    assert [await redis.exists(f"{keys.weights}:v{v}:0") for v in (1, 2, 3, 4)] == [0, 0, 1, 1]


async def test_a_version_written_but_never_announced_is_pruned_by_the_next_publication(
    redis: aioredis.Redis, keys: Keys, bus_config: BusConfig, transport
) -> None:
    """A trainer killed between writing a version's chunks and announcing it left them behind for good (a
    full model copy per crash): the next trainer's publication deletes them, and keeps what is announced
    and in use."""
    publisher = WeightPublisher(redis, keys, transport, heartbeat_ttl_s=bus_config.heartbeat_ttl_s)
    in_use = {"weight_version": 1}
    async with Heartbeat(redis, keys, role="producer", member_id="p", config=bus_config, describe=lambda: in_use):
        await publisher.publish(await publisher.new_version(0), state())  # 1: announced, a producer uses it
        crashed = await publisher.new_version(1)  # 2: drawn and written, the trainer dies before announcing
        await transport.write(crashed, state())
        assert await stored_versions(redis, keys, transport) == [1, 2]
        restarted = WeightPublisher(redis, keys, transport, heartbeat_ttl_s=bus_config.heartbeat_ttl_s)
        await restarted.publish(await restarted.new_version(1), state())  # 3
        assert await stored_versions(redis, keys, transport) == [1, 3]
        subscriber = WeightSubscriber(redis, keys, {transport.name: transport})
        for announced in await redis.xrange(keys.weights):
            assert_bit_exact(await subscriber.load(decode_manifest(announced[1][b"manifest"])), state())


async def stored_versions(redis: aioredis.Redis, keys: Keys, transport: object) -> list[int]:
    """The versions whose bytes are stored, read from Redis or the directory (not through the transport)."""
    if isinstance(transport, RedisTransport):
        found = [k.decode() async for k in redis.scan_iter(match=f"{keys.weights}:v[0-9]*:*")]
        return sorted({int(k.split(":")[-2][1:]) for k in found})
    assert isinstance(transport, FileTransport)
    return sorted(int(p.name[1:]) for p in transport.root.glob("v[0-9]*"))


async def test_a_model_published_by_one_side_loads_into_the_engine(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    model_dir = build_tiny_model(tmp_path / "m")
    engine = NativeEngine(str(model_dir))
    try:
        trained = dict(engine.model.state_dict())  # tied: lm_head.weight is embed_tokens.weight
        trained = {k: v + 0.5 if k != "lm_head.weight" else v for k, v in trained.items()}
        trained["lm_head.weight"] = trained["model.embed_tokens.weight"]
        transport = FileTransport(tmp_path / "weights")
        await WeightPublisher(redis, keys, transport).publish(7, trained)
        entry = await WeightSubscriber(redis, keys, {"file": transport}).latest()
        assert entry is not None
        loaded = await WeightSubscriber(redis, keys, {"file": transport}).load(entry[1])
        await engine.update_weights(entry[1].version, loaded)
        assert engine.weight_version == 7
        for name, param in engine.model.named_parameters():
            assert torch.equal(param, trained[name]), name
    finally:
        await engine.close()


def test_malformed_manifests_are_schema_errors() -> None:
    with pytest.raises(SchemaError):
        decode_manifest(b"\x00garbage")
    from miles_stream.weights.manifest import chunk_infos, pack_chunks

    tensors, chunks = pack_chunks({"w": torch.zeros(4)}, 1 << 20)
    from miles_stream.weights.manifest import WeightManifest

    good = WeightManifest(
        version=1, transport="redis", location="x", tensors=tuple(tensors), chunks=chunk_infos(chunks)
    )
    lying = dataclasses.replace(good, tensors=(dataclasses.replace(tensors[0], shape=(5,)),))
    with pytest.raises(SchemaError, match="needs 20 bytes"):
        decode_manifest(encode_manifest(lying))
