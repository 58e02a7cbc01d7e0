"""Redis key names of one namespace. Every key of a run starts with `{ns}:` so runs can share a server."""

from __future__ import annotations

from dataclasses import dataclass


def observers_of(stream: str) -> str:
    """Hash on `stream`'s key: observer group -> entries trimmed before that group read them, not yet reported.
    A group listed here observes the run (the recorder): it never holds producers back (`backpressure.py`)
    and, once dead, not the stream either (`streams.trim_acknowledged`)."""
    return f"{stream}:observers"


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
