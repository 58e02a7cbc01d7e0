"""One writer per role: a lease in Redis with a fencing token that every write of the role checks.

    {ns}:lease:{role}          "<token> <holder json>", expires after `ttl_s` unless renewed
    {ns}:lease:{role}:tokens   the last token handed out: tokens only grow, never reused

A trainer takes the lease before it reads a group and renews it every ttl/4. Its commits (SADD done +
XACK), its weight versions and its announcements run in transactions that WATCH the lease key and first
check that it still holds this token (`fenced`). A trainer frozen past the ttl (SIGSTOP, a long GC pause,
a cut network) finds on waking that another holds the lease, or that its token is not the last one: it
raises `LeaseLostError` and commits, publishes and checkpoints nothing; its entries stay pending and the
new holder takes them over. Expiry is judged by the Redis server's clock, never a process's.

A lease that expired while nobody else took it (Redis was away longer than the ttl) is taken again with
the same token: no other writer can have acted in between, since any other would have drawn a new token.
A lease whose holder ran on this host and is no longer alive (kill -9, then a restart) is ended at once.

Partitions (`bus.partitions` > 1): a commit touches one partition's keys, in that partition's slot, where the
lease key is not (MULTI stays within one slot). Each partition keeps a copy of the lease's value, the fence:

    {ns.p}:lease:{role}:fence  "<token> <holder json>" of the last holder that committed in partition p (no expiry)

A commit in partition p WATCHes the fence, reads it and the lease key (both must hold our value), and applies in
one MULTI (`PartitionFence`). A new holder installs its value in every partition's fence right after taking the
lease, before it reads anything: from then on an old holder's commit fails there (the WATCH breaks, or the fence
or the lease key names another holder). A fence with a lower token, none (a failover lost it), or our token
with another holder (the run's slot failed over and lost a draw, so a token was drawn twice) is set to our value,
in the same MULTI as the commit, only after the lease key was read as ours. A fence with a higher token means a
newer holder: the lease is lost. Reading the lease key at each commit (one GET a partition a commit) covers a
fence rolled back by a failover to an older holder's value: that holder finds the lease key naming another. A
holder that takes the lease after that read installs its fence after our WATCH, which breaks our EXEC; on one
server the lease key is WATCHed too. What is left, on a cluster: a new holder's install in p landing after our
WATCH and lost to a failover of p before our EXEC (the failover drops our connection, and the transaction with
it, unless the cut comes after the EXEC was sent). A lease key that expired while nobody took it is taken again
with the same token (`Lease.renew`), then the commit is tried again.
Every value carries a random id (`holder json`'s "id"), so two takes never share a value. The fence needs no
renewal: expiry is the lease's business (who may take over), fencing the values' (whose writes apply).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog
from redis.asyncio.client import Pipeline

from miles_stream.aio import stop_task
from miles_stream.bus.connection import RetryPolicy, is_transient, read_watched
from miles_stream.bus.keys import Keys
from miles_stream.errors import LeaseHeldError, LeaseLostError
from miles_stream.procs import pid_alive

log = structlog.get_logger(__name__)

_FENCE_ATTEMPTS = 8  # a WATCH broken by our own renewal is tried again


class Lease:
    """The lease of `role` in one namespace, held by this process as `holder`."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, role: str, holder: str, *, ttl_s: float,
                 retry: RetryPolicy | None = None) -> None:  # fmt: skip
        self.redis, self.role, self.holder, self.ttl_s = redis, role, holder, ttl_s
        self.key = f"{keys.namespace}:lease:{role}"
        self.tokens_key = f"{self.key}:tokens"
        self.retry = retry or RetryPolicy(attempts=0, max_delay_s=2.0)
        self.token = 0
        self.value = b""
        self.lost: str | None = None  # why the lease was lost, once it was
        self._task: asyncio.Task[None] | None = None

    async def acquire(self, wait_s: float = 0.0, stop: asyncio.Event | None = None) -> int:
        """Take the lease, waiting up to `wait_s` for the holder's to end; returns the fencing token.
        Raises `LeaseHeldError` naming the holder when it is not free in time."""
        deadline = time.monotonic() + wait_s
        describe = json.dumps(
            {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "id": secrets.token_hex(4)}
        )  # one value per take (PartitionFence)
        waiting_logged = False
        while True:
            token, value, _ = await self.retry.run(lambda: self._take(describe, again=0))
            if token:
                self.token, self.value, self.lost = int(token), bytes(value), None
                log.info("lease_taken", role=self.role, holder=self.holder, token=self.token)
                return self.token
            if await self._break_if_dead(value):
                continue
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                raise LeaseHeldError(f"another {self.role} holds this namespace's lease: {_describe(value)}. "
                                     f"Stop it, use another bus.namespace, or set a standby wait "
                                     f"(trainer.standby_s) to take over when its lease ends")  # fmt: skip
            if not waiting_logged:
                log.info("lease_standby", role=self.role, holder=_describe(value), wait_s=wait_s)
                waiting_logged = True
            await _sleep(min(self.ttl_s / 4, max(deadline - time.monotonic(), 0.01)), stop)

    async def _break_if_dead(self, value: bytes) -> bool:
        """End a lease whose holder ran on this host and is gone (a trainer restarted after kill -9 need
        not wait out the ttl). Safe even if the pid was misjudged: the holder is fenced, not duplicated."""
        try:
            holder = json.loads(value.decode().partition(" ")[2])
            here, pid = holder["host"] == socket.gethostname(), int(holder["pid"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return False
        if not here or pid == os.getpid() or pid_alive(pid):
            return False
        _, applied = await self._if_value(value, lambda pipe: pipe.delete(self.key))
        if applied is None:
            return True  # it changed meanwhile: look again
        log.warning("lease_of_dead_process_ended", role=self.role, was=_describe(value))
        return True

    async def renew(self) -> bool:
        """Extend the lease; False (and `lost` says why) once another holds it or a newer token was drawn."""
        if self.lost:
            return False
        if await self.retry.run(self._extend):
            return True
        # expired: ours again only if no token was drawn since ours
        _, value, again = await self.retry.run(lambda: self._take(self._holder_json(), again=self.token))
        if again or (value and bytes(value) == self.value):  # (or a commit of ours took it again just before)
            self.value = bytes(value)
            log.warning("lease_taken_again", role=self.role, token=self.token)
            return True
        now = _describe(value) if value else "a newer token (another holder came and went, or Redis lost it)"
        self.lost = f"the {self.role} lease (token {self.token}) passed to {now}"
        log.error("lease_lost", role=self.role, token=self.token, now=_describe(value))
        return False

    async def _take(self, holder: str, again: int) -> tuple[int, bytes, bool]:
        """(token, value, whether it is `again`'s) when taken, (0, holder's value or b"", False) when not.
        With `again` 0 a new token is drawn; otherwise only that token is taken, and only while it is still
        the last one drawn. WATCH/MULTI rather than a script, so a namespace-limited ACL user without
        @scripting can hold it."""
        tried = b""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                current, last_drawn = await _watch_and_get(pipe, self.key, self.tokens_key)
                if current is not None and current == tried:  # our EXEC applied, its reply lost in a cut
                    return int(current.split()[0]), bytes(current), bool(again)
                if current is not None:
                    return 0, bytes(current), False
                last = int(last_drawn or 0)
                if again and again != last:
                    return 0, b"", False  # a token was drawn since ours (or the counter went with Redis's data)
                token = again or last + 1
                value = f"{token} {holder}".encode()
                tried = value
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(self.tokens_key, token)
                pipe.set(self.key, value, px=int(self.ttl_s * 1000))
                try:
                    await pipe.execute()
                except rexc.WatchError:
                    continue  # another process took it or drew a token meanwhile (or a cut): look again
                return token, value, bool(again)

    async def _extend(self) -> bool:
        """Push the lease's expiry out by a ttl, if it is still ours."""
        _, applied = await self._if_value(self.value, lambda pipe: pipe.pexpire(self.key, int(self.ttl_s * 1000)))
        return applied is not None

    async def _if_value(self, expected: bytes, queue: Callable[[Pipeline], object]) -> tuple[Any, list[Any] | None]:
        """WATCH the lease key and, while it holds `expected`, run `queue`'s commands in one MULTI/EXEC.
        Returns (the value found, the results); results are None where the key held something else or
        changed before the EXEC."""
        async with self.redis.pipeline(transaction=True) as pipe:
            (current,) = await _watch_and_get(pipe, self.key)
            if current != expected:
                return current, None
            pipe.multi()  # type: ignore[no-untyped-call]
            queue(pipe)
            try:
                result: list[Any] = await pipe.execute()
            except rexc.WatchError:
                return current, None
            return current, result

    def check(self) -> None:
        """Raise `LeaseLostError` if the renewals found the lease gone (the transactions check it again)."""
        if self.lost:
            raise LeaseLostError(self.lost)

    async def fenced(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Run the commands `queue` adds in one MULTI/EXEC that applies only while this lease is held; raises
        `LeaseLostError` (nothing applied) otherwise. Transient errors are for the caller's retry."""
        for _ in range(_FENCE_ATTEMPTS):
            self.check()
            current, result = await self._if_value(self.value, queue)
            if current is None and await self.renew():
                continue  # it expired while nobody took it (Redis away past the ttl): ours again, same token
            if current != self.value:
                self.lost = f"the {self.role} lease (token {self.token}) is now {_describe(current)}"
                raise LeaseLostError(self.lost)
            if result is not None:
                return result
            # the key was touched before the EXEC (our own renewal, or a new holder): look again
        raise LeaseLostError(f"the {self.role} lease key kept changing under {_FENCE_ATTEMPTS} transactions")

    async def start_renewing(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._renew_loop(), name=f"lease-{self.role}")

    async def release(self) -> None:
        """Stop renewing and give the lease up (when still ours), so a standby need not wait out the ttl."""
        task, self._task = self._task, None
        if task is not None and not await stop_task(task):
            log.error("lease_renewal_did_not_stop", role=self.role)
        if self.lost or not self.token:
            return
        try:
            await self.fenced(lambda pipe: pipe.delete(self.key))
        except LeaseLostError:
            pass
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("lease_release_failed", role=self.role, error=str(exc))  # it expires after the ttl

    async def _renew_loop(self) -> None:
        while not self.lost:
            await asyncio.sleep(self.ttl_s / 4)
            try:
                await self.renew()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("lease_renewal_failed", role=self.role, error=str(exc))

    def _holder_json(self) -> str:
        return self.value.decode().partition(" ")[2]


def _describe(value: Any) -> str:
    """A lease value for people: 'trainer-0 (pid 12 on host-a, token 3)'."""
    if not value:
        return "nobody (expired)"
    token, _, holder = (value.decode() if isinstance(value, bytes) else str(value)).partition(" ")
    try:
        h = json.loads(holder)
        return f"{h['holder']} (pid {h['pid']} on {h['host']}, token {token})"
    except (ValueError, KeyError, TypeError):
        return f"token {token}"


async def _sleep(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _watch_and_get(pipe: Pipeline, *keys: str) -> list[Any]:
    """WATCH `keys` and read them (a connection lost meanwhile is a ConnectionError, for the retry)."""
    await read_watched(pipe.watch(*keys))
    return [await read_watched(pipe.get(key)) for key in keys]


class PartitionFence:
    """`lease`'s fence in one partition's slot (module docstring): commits in that partition run through
    `fenced`, as the lease's own do in the namespace's slot. `redis` reaches the partition's slot."""

    def __init__(self, lease: Lease, redis: aioredis.Redis, namespace: str) -> None:
        self.lease, self.redis = lease, redis
        self.key = f"{namespace}:lease:{lease.role}:fence"

    async def install(self) -> None:
        """Put the lease's value in this partition's fence (the new holder, before it reads anything)."""
        await self.fenced(lambda pipe: None)

    async def fenced(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Run `queue`'s commands in one MULTI/EXEC in this partition's slot that applies only while the lease key
        and this partition's fence hold our value (setting the fence first where it is older); `LeaseLostError`
        otherwise. The fence is WATCHed before the lease key is read: a holder that takes the lease after that
        read installs its fence after the WATCH, which breaks our EXEC. On one server the lease key is WATCHed in
        the same transaction too (one connection, nothing between the read and the EXEC)."""
        lease = self.lease
        one_server = self.redis is lease.redis
        for _ in range(_FENCE_ATTEMPTS):
            lease.check()
            expired = False
            async with self.redis.pipeline(transaction=True) as pipe:
                found, *also = await _watch_and_get(pipe, self.key, *([lease.key] if one_server else []))
                held = also[0] if one_server else await lease.redis.get(lease.key)
                installed = int(found.split()[0]) if found else 0
                if held is None:
                    expired = True  # nobody took it since it expired: take it again below, then look again
                elif held != lease.value:
                    lease.lost = f"the {lease.role} lease (token {lease.token}) is now {_describe(held)}"
                    raise LeaseLostError(lease.lost)
                elif installed > lease.token:
                    lease.lost = f"the {lease.role} lease (token {lease.token}) is fenced off: token {installed} " \
                                 f"was installed in {self.key} (a newer holder's; after a failover that rolled " \
                                 f"the run's slot back, `miles-stream reset-run` clears it)"  # fmt: skip
                    raise LeaseLostError(lease.lost)
                else:
                    install = found != lease.value
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if install:
                        pipe.set(self.key, lease.value)
                    queue(pipe)
                    try:
                        result: list[Any] = await pipe.execute()
                    except rexc.WatchError:
                        continue  # another holder installed its value meanwhile (or our renewal): look again
                    return result[1:] if install else result
            if expired and not await lease.renew():
                raise LeaseLostError(lease.lost or f"the {lease.role} lease (token {lease.token}) expired")
        raise LeaseLostError(f"the {lease.role} fence {self.key} kept changing under {_FENCE_ATTEMPTS} transactions")
