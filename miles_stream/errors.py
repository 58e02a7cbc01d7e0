"""The error hierarchy. Every error miles-stream raises on purpose derives from `MilesStreamError`."""

from __future__ import annotations


class MilesStreamError(Exception):
    """Base of all errors raised by miles-stream."""


class ConfigError(MilesStreamError, ValueError):
    """A configuration key or value is wrong. The message names the key and what is allowed."""


class SchemaError(MilesStreamError, ValueError):
    """A record on the wire is malformed: wrong version, dtype, shape, length or size."""


class RetriableError(MilesStreamError):
    """A transient failure (connection lost, server loading, out of memory); the operation may be retried."""


class RedisUnavailableError(RetriableError):
    """The Redis server did not answer."""


class BackpressureTimeout(RetriableError):
    """The consumers' backlog stayed above its bound for longer than the caller would wait."""


class InvalidRequest(MilesStreamError, ValueError):
    """A generation request the engine cannot serve (empty prompt, token ids outside the vocabulary, too long)."""


class WeightIntegrityError(MilesStreamError):
    """Published weights failed verification (a checksum, a size, a missing chunk): keep the old weights."""


class EmbeddedRedisError(MilesStreamError):
    """The embedded Redis server could not be found, started or stopped."""


class CheckpointError(MilesStreamError):
    """A checkpoint could not be written (a full disk, a read-only directory): the message names where."""


class LeaseHeldError(MilesStreamError):
    """Another process holds this role's lease in the namespace (a second trainer): the message names it."""


class LeaseLostError(MilesStreamError):
    """This process's lease passed to another (it was frozen or cut off past the ttl): it must not write."""


class DataLossError(MilesStreamError):
    """Redis lost this run's data (restarted without persistence, flushed): accounting cannot go on silently."""


class StopTimeout(MilesStreamError):
    """A process told to stop (SIGTERM, Ctrl-C) did not finish cleanly in time and was stopped where it was."""


class RecordingError(MilesStreamError):
    """A recording could not be written (a full disk): the message names the directory."""
