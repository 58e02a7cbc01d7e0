"""`status --watch`'s operator view: 80 columns whatever the names, a rate from two snapshots, what each
process waits on, and the last eval."""

from __future__ import annotations

from miles_stream.bus.heartbeat import Member
from miles_stream.evaluation.record import EvalResult
from miles_stream.status.operator import WIDTH, operator_lines
from miles_stream.status.snapshot import GroupStatus, NamespaceStatus, StreamStatus


def snapshot(at: float, tokens: int, step: int, evals: tuple[EvalResult, ...] = ()) -> NamespaceStatus:
    members = (
        Member("evaluator", "evaluator-a-very-long-host-name-12345", at, {"eval_version": 40, "waiting": "weights",
               "rate_per_min": 3.0, "pass_at_1": 0.91}),
        Member("producer", "vm-1234", at, {"tokens": tokens, "in_flight": 16, "weight_version": 41,
               "waiting": "admission", "started_at": at - 10}),
        Member("trainer", "trainer-0", at, {"step": step, "version": 42, "held": 0, "waiting": "data"}),
    )  # fmt: skip
    streams = (StreamStatus("demo:trajectories", 40, (GroupStatus("trainer", 1, 16, 3, "0-0"),)),)
    return NamespaceStatus(namespace="demo", server_version="valkey 8.1.8", streams=streams, members=members,
                           latest_weight_version=42, dead_letters=0, evals=evals, taken_at=at)  # fmt: skip


RESULT = EvalResult(version=40, evaluator_id="e", dataset="d", prompts=100, n_samples=8, pass_at_1=0.91,
                    pass_at_k={1: 0.85, 8: 0.99}, reward_mean=0.93, greedy_reward_mean=0.91, response_tokens_mean=1.0,
                    truncated_rate=0.95, eval_s=0.1, skipped=0, created_at=997.0)  # fmt: skip


def test_the_operator_view_fits_80_columns_and_says_rates_waits_and_the_last_eval() -> None:
    first = snapshot(1000.0, tokens=10_000, step=100)
    later = snapshot(1002.0, tokens=12_468, step=104, evals=(RESULT,))
    lines = operator_lines(later, first)
    assert all(len(line) <= WIDTH for line in lines), [len(line) for line in lines]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert "1,234 tok/s" in rows["producer"] and "admission" in rows["producer"] and "v41" in rows["producer"]
    assert "2.00 step/s" in rows["trainer"] and "data" in rows["trainer"] and "v42" in rows["trainer"]
    assert "3.0 eval/min" in rows["evaluator"] and "weights" in rows["evaluator"] and "v40" in rows["evaluator"]
    assert lines[5] == "trajectories: 40 entries; trainer lag 3, pending 16"
    assert lines[6].startswith("last eval v40, 5s ago: pass@1 0.91  pass@8 0.99  reward 0.93")


def test_the_first_frame_rates_since_start_and_says_when_there_is_no_eval() -> None:
    lines = operator_lines(snapshot(1000.0, tokens=10_000, step=100))
    assert "1,000 tok/s" in next(line for line in lines if line.startswith("producer"))  # 10,000 tokens in 10 s
    assert lines[-1] == "last eval: none yet (miles-stream eval)"
    assert all(len(line) <= WIDTH for line in lines)
