"""Redis key names of one namespace. Every key of a run starts with `{ns}:` so runs can share a server.

Partitions (`bus.partitions: N`, N > 1): the prompt, partial and trajectory streams and the bookkeeping that a
commit or a hand-back touches with them (done set, prompt records, dead letters, the feeder's position) are
split N ways, partition p under a namespace of its own, `partition_namespace(ns, p)`: for a hash-tag namespace
`{run1}` that is `{run1.p0}`, `{run1.p1}`... (the tag extended, so each partition hashes to a slot of its own;
Redis hashes only what lies between a key's first `{` and the next `}`, so `{run1}:p0:...` could not leave the
run's slot); for an untagged namespace (one server) `run1.p0`. What stays in the namespace itself: the weights,
the lease, heartbeats, the run identity, evaluations. With N = 1 there is one partition, the namespace itself:
no key name changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from miles_stream.errors import ConfigError


def observers_of(stream: str) -> str:
    """Hash on `stream`'s key: observer group -> entries trimmed before that group read them, not yet reported.
    A group listed here observes the run (the recorder): it never holds producers back (`backpressure.py`)
    and, once dead, not the stream either (`streams.trim_acknowledged`)."""
    return f"{stream}:observers"


def _tag(namespace: str) -> tuple[int, int] | None:
    """(start, end) of the namespace's hash tag, what lies between its first `{` and the next `}` when that is not
    empty (all Redis hashes of a key that has one); None without one."""
    start = namespace.find("{")
    end = namespace.find("}", start + 1)
    return (start + 1, end) if start >= 0 and end > start + 1 else None


def one_slot(namespace: str) -> bool:
    """Whether every key `{namespace}:...` hashes to one cluster slot: the namespace is a hash tag, `{run1}`
    or holds one, `a{run1}`."""
    return _tag(namespace) is not None


def partition_namespace(namespace: str, p: int) -> str:
    """Partition p's namespace (module docstring): the hash tag extended by `.p{p}`, or `.p{p}` appended."""
    tag = _tag(namespace)
    close = tag[1] if tag else len(namespace)
    return f"{namespace[:close]}.p{p}{namespace[close:]}"


def names_a_partition(namespace: str) -> bool:
    """Whether `namespace` reads as a partition of another run's (`{run1.p0}`, `run1.p0`): its keys would be that
    partition's, and a key rule for one would grant the other."""
    tag = _tag(namespace)
    return re.search(r"\.p\d+$", namespace[tag[0] : tag[1]] if tag else namespace) is not None


def key_patterns(namespace: str, partitions: int) -> list[str]:
    """The ACL key rules (`~pattern`) that give a user a run's keys and only those: the namespace's and each
    partition's by name (a wildcard such as `{run1.p*}` would also match another run's `{run1.prod}`)."""
    spaces = [namespace, *(k.namespace for k in partition_keys(namespace, partitions) if k.namespace != namespace)]
    return [f"~{space}:*" for space in spaces]


def partition_keys(namespace: str, partitions: int) -> tuple[Keys, ...]:
    """The keys of each partition of the namespace's streams: the namespace itself when there is one."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, not {partitions}")
    if partitions == 1:
        return (Keys(namespace),)
    return tuple(Keys(partition_namespace(namespace, p)) for p in range(partitions))


def partitions_share(partitions: int, rank: int, world: int) -> tuple[int, ...]:
    """The partitions data-parallel rank `rank` of `world` reads: every world-th from its rank; where there are
    fewer partitions than ranks, ranks share one (its consumer group splits the entries among them). Unequal
    shares are refused: a rank with more partitions reads more groups than its batch share while the others
    wait for theirs, and the surplus holds admission's budget (a stall, or a third of generation dropped stale)."""
    if partitions % world and world % partitions:
        raise ConfigError(f"bus.partitions={partitions} over {world} trainer ranks: one must divide the other, "
                          f"so that every rank reads an equal share")  # fmt: skip
    mine = tuple(range(rank, partitions, world))
    return mine or (rank % partitions,)


PRODUCER_GROUP = "producers"  # the consumer group of producers on {ns}:prompts and {ns}:partials
TRAINER_GROUP = "trainer"  # the trainers' consumer group on {ns}:trajectories


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    def __post_init__(self) -> None:
        if not self.namespace or any(c in self.namespace for c in " :*?[]"):
            raise ValueError(f"namespace {self.namespace!r} must be non-empty, without spaces, ':' or glob chars")

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    @property
    def prompts(self) -> str:
        return self._key("prompts")

    @property
    def trajectories(self) -> str:
        return self._key("trajectories")

    @property
    def partials(self) -> str:
        return self._key("partials")

    @property
    def prompt_of(self) -> str:
        """Hash: trajectory-group id -> its prompt record, from publication until the trainer is done with it
        (kept so that a group dropped as stale can have its prompt generated again)."""
        return self._key("prompt_of")

    @property
    def weights(self) -> str:
        return self._key("weights")

    @property
    def eval(self) -> str:
        """Stream: one entry per weight version an evaluator scored (`evaluation/record.py`). Read with XREAD, no
        consumer group: nothing waits on it, and producers' backpressure never counts it."""
        return self._key("eval")

    @property
    def dead(self) -> str:
        return self._key("dead")

    @property
    def members(self) -> str:
        """Sorted set: member "role:id", score = last heartbeat (unix seconds)."""
        return self._key("members")

    @property
    def member_info(self) -> str:
        """Hash: "role:id" -> JSON description of that process."""
        return self._key("members:info")

    def sglang_servers(self, producer_id: str) -> str:
        """Set of the SGLang server URLs a producer drives; it attaches and detaches to match."""
        return self._key(f"sglang:{producer_id}")

    def done(self, group: str) -> str:
        """Sorted set of trajectory-group ids that consumer group `group` has committed (for dedup), bounded by
        a sweep (`bus/done.py`); its state and the count of those forgotten in `{this key}:sweep`."""
        return self._key(f"done:{group}")

    @property
    def streams(self) -> tuple[str, ...]:
        return (self.prompts, self.trajectories, self.partials, self.weights, self.eval, self.dead)

    @property
    def partition_streams(self) -> tuple[str, ...]:
        """The streams that each partition has of its own (`partition_keys`)."""
        return (self.prompts, self.trajectories, self.partials, self.dead)
