"""`status --watch` for operators: one screen, 80 columns, what each process does and waits on.

    miles-stream  demo on valkey 8.1.8   weights v42   dead 0                  12:00:01
    ROLE       ID                   RATE          WAITS ON     VERSION MORE
    evaluator  evaluator-vm-77      3.0 eval/min  weights      v40     pass@1 0.91
    producer   vm-1234              1,234 tok/s   admission    v41     16 in flight
    trainer    trainer-0            2.00 step/s   data         v42     0 held
    trajectories: 40 entries; trainer lag 3, pending 16
    last eval v40 (evaluator-vm-77): pass@1 0.91  pass@8 0.99  reward 0.93  len 1.0  trunc 0.95

Rates are the difference of two snapshots' heartbeat counters (tokens, steps) over the time between them (the
first frame: since the process started); the evaluator reports its own. "Waits on" is what the process says
in its heartbeat: admission (the staleness budget), backpressure (the trainer's backlog), data (prompts, or
for the trainer a batch), weights (the evaluator: a new version); "-" when it is working.
"""

from __future__ import annotations

import time
from typing import Any

from miles_stream.bus.heartbeat import Member
from miles_stream.status.snapshot import NamespaceStatus

WIDTH = 80
_COUNTERS = {"producer": ("tokens", "tok/s", 1.0), "trainer": ("step", "step/s", 1.0)}


def operator_lines(status: NamespaceStatus, previous: NamespaceStatus | None = None) -> list[str]:
    """The screen, as lines of at most WIDTH characters."""
    version = "-" if status.latest_weight_version is None else f"v{status.latest_weight_version}"
    clock = time.strftime("%H:%M:%S", time.localtime(status.taken_at or time.time()))
    head = (
        f"miles-stream  {status.namespace} on {status.server_version}   weights {version}   dead {status.dead_letters}"
    )
    lines = [
        f"{head:<{WIDTH - 9}} {clock}",
        f"{'ROLE':<10} {'ID':<20} {'RATE':<13} {'WAITS ON':<12} {'VERSION':<7} MORE",
    ]
    before = {(m.role, m.id): m for m in previous.members} if previous is not None else {}
    for m in status.members:
        rate = _rate(m, before.get((m.role, m.id)), status.taken_at, previous.taken_at if previous else 0.0)
        waiting = str(m.info.get("waiting") or "-")
        lines.append(f"{m.role[:10]:<10} {_clip(m.id, 20):<20} {rate[:13]:<13} {waiting[:12]:<12} {_version(m):<7} "
                     f"{_more(m)}")  # fmt: skip
    if not status.members:
        lines.append("(no process alive)")
    for s in status.streams:
        if s.key.endswith(":trajectories"):
            groups = "; ".join(f"{g.name} lag {'?' if g.lag is None else g.lag}, pending {g.pending}" for g in s.groups)
            lines.append(f"{s.key.rpartition(':')[2]}: {s.length} entries" + (f"; {groups}" if groups else ""))
    r = status.last_eval
    if r is None:
        lines.append("last eval: none yet (miles-stream eval)")
    else:
        at_k = "  ".join(f"pass@{k} {v:.2f}" for k, v in sorted(r.pass_at_k.items()) if k > 1)
        age = max(0.0, (status.taken_at or time.time()) - r.created_at)
        lines.append(f"last eval v{r.version}, {age:.0f}s ago: pass@1 {r.pass_at_1:.2f}  {at_k}  "
                     f"reward {r.reward_mean:.2f}  len {r.response_tokens_mean:.1f}  "
                     f"trunc {r.truncated_rate:.2f}")  # fmt: skip
    return [_clip(line, WIDTH) for line in lines]


def _rate(m: Member, before: Member | None, now: float, then: float) -> str:
    if m.role == "evaluator":
        return f"{float(m.info.get('rate_per_min', 0.0)):.1f} eval/min"
    if m.role not in _COUNTERS:
        return "-"
    key, unit, _ = _COUNTERS[m.role]
    value = _number(m.info.get(key))
    if before is not None and now > then:
        per_s = max(0.0, value - _number(before.info.get(key))) / (now - then)
    else:  # the first frame: the average since the process started
        started = _number(m.info.get("started_at"))
        per_s = value / max(now - started, 1e-6) if started else 0.0
    return f"{per_s:,.0f} {unit}" if per_s >= 100 else f"{per_s:.2f} {unit}"


def _version(m: Member) -> str:
    for key in ("weight_version", "version", "eval_version"):
        if key in m.info and _number(m.info[key]) >= 0:
            return f"v{int(_number(m.info[key]))}"
    return "-"


def _more(m: Member) -> str:
    info = m.info
    if m.role == "producer":
        return f"{int(_number(info.get('in_flight')))} in flight"
    if m.role == "trainer":
        return f"{int(_number(info.get('held')))} held"
    if m.role == "evaluator" and info.get("pass_at_1") is not None:
        return f"pass@1 {_number(info['pass_at_1']):.2f}"
    return ""


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
