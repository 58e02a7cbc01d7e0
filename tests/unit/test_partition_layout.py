"""The key layout of a partitioned run (`bus.partitions`) and how the feeder spreads a dataset over it: pure
functions, no Redis."""

from __future__ import annotations

from typing import Any, cast

import pytest
from redis.crc import key_slot

from miles_stream.bus import BusConfig, Keys
from miles_stream.bus.keys import key_patterns, partition_keys, partition_namespace, partitions_share
from miles_stream.bus.lease import Lease, PartitionFence
from miles_stream.bus.run import run_key
from miles_stream.errors import ConfigError
from miles_stream.feeder import Feeder, FeederConfig, Row
from miles_stream.run_config import load_run_config


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_one_partition_is_the_namespace_itself_no_key_changes() -> None:
    assert partition_keys("{run1}", 1) == (Keys("{run1}"),)
    assert partition_keys("miles", 1) == (Keys("miles"),)
    assert BusConfig().partitions == 1
    assert Keys("{run1}").prompts == "{run1}:prompts"


def test_a_partition_extends_the_hash_tag_so_it_has_a_slot_of_its_own() -> None:
    assert partition_namespace("{run1}", 2) == "{run1.p2}"
    assert partition_namespace("a{run1}b", 0) == "a{run1.p0}b"  # the tag, wherever it is
    assert partition_namespace("run1", 1) == "run1.p1"  # one server: no tag needed
    parts = partition_keys("{run1}", 3)
    run_slot = slot(Keys("{run1}").weights)
    slots = [slot(k.prompts) for k in parts]
    assert len({*slots, run_slot}) == 4  # each partition's slot differs from the others' and from the run's
    for k in parts:  # everything a commit or a hand-back touches together stays in the partition's slot
        lease = Lease(cast(Any, None), Keys("{run1}"), "trainer", "t", ttl_s=1.0)
        together = [k.prompts, k.partials, k.trajectories, k.prompt_of, k.dead, k.done("trainer"),
                    f"{k.done('trainer')}:sweep", f"{k.done('trainer')}:clock", f"{k.namespace}:feeder",
                    f"{k.namespace}:feeder:published", run_key(k),
                    PartitionFence(lease, cast(Any, None), k.namespace).key]  # fmt: skip
        assert {slot(key) for key in together} == {slot(k.prompts)}
        assert slot(lease.key) == run_slot  # the lease itself stays with the run


def test_trainer_ranks_read_their_share_of_the_partitions() -> None:
    assert [partitions_share(4, r, 2) for r in range(2)] == [(0, 2), (1, 3)]
    with pytest.raises(ConfigError, match="one must divide the other"):  # unequal shares would stall a step
        partitions_share(3, 0, 2)
    assert [partitions_share(2, r, 4) for r in range(4)] == [(0,), (1,), (0,), (1,)]  # fewer partitions: shared
    every = sorted(p for r in range(3) for p in partitions_share(6, r, 3))
    assert every == list(range(6))


def test_a_users_key_rules_name_each_partition_and_no_namespace_reads_as_a_partition() -> None:
    assert key_patterns("{run1}", 1) == ["~{run1}:*"]
    assert key_patterns("{run1}", 3) == ["~{run1}:*", "~{run1.p0}:*", "~{run1.p1}:*", "~{run1.p2}:*"]
    assert key_patterns("run1", 2) == ["~run1:*", "~run1.p0:*", "~run1.p1:*"]
    for taken in ("{run1.p0}", "run1.p12", "a{run1.p3}b"):
        with pytest.raises(ConfigError, match=r"bus\.namespace: .* ends like another run's partition"):
            load_run_config(None, [f"bus.namespace={taken}"])
    for fine in ("{run1.prod}", "{run1.p}", "run1.p0x", "a{run1}b"):
        assert load_run_config(None, [f"bus.namespace={fine}"]).bus.namespace == fine


def test_bad_partition_counts_are_refused_in_one_line() -> None:
    for bad in (0, 65):
        with pytest.raises(ConfigError, match=r"bus\.partitions: must be between 1 and 64"):
            load_run_config(None, [f"bus.partitions={bad}"])
    config = load_run_config(None, ["bus.namespace={r}", "bus.partitions=3"])
    assert config.bus.partitions == 3


def feeder(rows: int, partitions: int) -> Feeder:
    lanes = [(cast(Any, None), k) for k in partition_keys("{f}", partitions)]
    return Feeder(cast(Any, None), Keys("{f}"), BusConfig(namespace="{f}"), FeederConfig(max_queued=10, num_epochs=2),
                  [Row(str(i), None) for i in range(rows)], lanes)  # fmt: skip


@pytest.mark.parametrize(("rows", "partitions"), [(10, 3), (9, 3), (2, 3), (5, 1)])
def test_the_feeder_sends_position_i_to_partition_i_mod_n_every_position_once_per_epoch(
    rows: int, partitions: int
) -> None:
    f = feeder(rows, partitions)
    seen = []
    for lane in range(partitions):
        at = (0, lane)
        while not f._finished(lane, at[0]):  # two epochs
            seen.append((at, lane))
            at = f._after(lane, *at)
    assert sorted(a for a, _ in seen) == [(e, i) for e in range(2) for i in range(rows)]
    assert all(position % partitions == lane for (_, position), lane in seen)
    assert all(f._finished(lane, 0) for lane in range(rows, partitions))  # more partitions than rows: idle ones
    assert all(f._finished(lane, 2) for lane in range(partitions))
    assert f.pressure[0].config.max_backlog_entries == -(-10 // partitions)  # max_queued shared among them
