"""The `miles-stream` command. Each subcommand parses its options, loads the run config, and runs."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

import redis.exceptions as rexc
import structlog

from miles_stream import __version__, aio
from miles_stream.bus import redact
from miles_stream.errors import ConfigError, MilesStreamError
from miles_stream.logs import configure
from miles_stream.redis_server import EmbeddedRedis
from miles_stream.run_config import RunConfig, load_run_config

log = structlog.get_logger("miles_stream.cli")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    overrides = [w for w in words if OVERRIDE.match(w)]  # anywhere on the line, before or after flags
    args = parser.parse_args([w for w in words if not OVERRIDE.match(w)])
    args.overrides = [*args.overrides, *overrides]  # a stray word is left in and named by the config loader
    configure(json=args.log_json, level=args.log_level)
    config: RunConfig | None = None
    try:
        config = load_run_config(args.config, args.overrides)
        if args.redis_url:
            config = _with_url(config, args.redis_url)
        result: int = args.run(args, config)
        return result
    except MilesStreamError as exc:
        print(f"miles-stream {args.command}: {exc}", file=sys.stderr)
        return 2
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:  # a server lost where no retry was in place
        where = redact(config.redis.resolved_url()) if config is not None else "?"
        print(f"miles-stream {args.command}: Redis at {where} is unavailable: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="miles-stream", description="Asynchronous RL post-training over Redis Streams."
    )
    parser.add_argument("--version", action="version", version=f"miles-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML run config (configs/*.yaml)")
        p.add_argument("--redis-url", help="Redis server to use (default: redis.url, then $MILES_REDIS_URL)")
        p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. bus.block_ms=500 (anywhere on the line)")  # fmt: skip
        return p

    p = command("redis", "Run a local Redis server (or check the one given) and print its URL.")
    p.add_argument("--port", type=int, help="port (default: a free one); same as redis_server.port=N")
    p.add_argument("--data-dir", help="data directory (default: a temporary one, removed on exit)")
    p.add_argument("--persistence", choices=["aof", "rdb", "none"], help="default: redis_server.persistence (aof)")
    p.add_argument("--cluster", type=int, metavar="N", help="run a Redis Cluster of N primaries on loopback instead, "
                   "for trying cluster mode (no persistence; docs/redis.md)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=0, help="with --cluster: replicas of each primary")
    p.set_defaults(run=_cmd_redis)

    p = command("feed", "Publish a prompt dataset (JSONL or Parquet) to {ns}:prompts; resumes where it stopped.")
    p.set_defaults(run=_cmd_feed)

    p = command("produce", "Run a rollout producer: claim prompts, sample, score, publish trajectory groups.")
    p.set_defaults(run=_cmd_produce)

    p = command("demo", "Run the demo: embedded Redis, feeder, producer and trainer on a tiny model, on CPU.")
    p.add_argument("--work-dir", default="demo-run", help="where the model, logs, metrics and plot go")
    p.add_argument("--steps", type=int, help="trainer steps (default: trainer.max_steps of the demo config)")
    p.add_argument("--minutes", type=float, default=5.0, help="time limit: then the trainer stops where it is")
    p.add_argument("--target-accuracy", type=float, default=0.9, help="stop once greedy accuracy reaches this")
    p.add_argument("--no-live", action="store_true", help="print a line every 10 steps instead of a live table")
    p.set_defaults(run=_cmd_demo)

    p = command("train", "Run a trainer: batches from the trajectory stream, optimizer steps, weights published.")
    p.add_argument("--resume", action="store_true", help="continue from trainer.checkpoint_dir")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="train on recorded files (or directories) instead "
                   "of the stream: no Redis, no producer, no weights published")  # fmt: skip
    p.add_argument("--sft", metavar="DATA", help="supervised fine-tuning on a .jsonl/.parquet file of prompt and "
                   "response records instead (sft.* keys): no Redis; same checkpoints, export, metrics")  # fmt: skip
    p.set_defaults(run=_cmd_train)

    p = command(
        "eval",
        "Run an evaluator: score each new weight version (or every k-th, or the latest when behind) "
        "on a held-out set (eval.*), announce results on {ns}:eval.",
    )
    p.set_defaults(run=_cmd_eval)

    p = command("record", "Record every trajectory entry to rotating zstd files (its own consumer group).")
    p.add_argument("--out", required=True, help="directory for the recording files")
    p.add_argument("--max-file-mb", type=int, default=256, help="start a new file past this many MiB (raw)")
    p.add_argument("--name", default="", help="consumer name (default recorder-HOST); reuse it to resume")
    p.set_defaults(run=_cmd_record)

    p = command("replay", "Publish recorded files back into a namespace's trajectory stream.")
    p.add_argument("files", nargs="+", metavar="FILE", help="recording files or directories")
    p.add_argument("--rate", type=float, default=0.0, help="groups per second at most (default: no limit)")
    p.set_defaults(run=_cmd_replay)

    p = command("status", "Describe a namespace: streams, groups, lag, pending, dead letters, members, weights.")
    p.add_argument("--namespace", help="namespace (default: bus.namespace)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (exit 130) or SIGTERM (exit 0): a live "
                   "table on a terminal; into a file or pipe, or with --json, one snapshot after another (--json: "
                   "one JSON object a line)")  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    p.set_defaults(run=_cmd_status)

    p = command(
        "reset-run",
        "After Redis lost a run's data: delete what is left of its bookkeeping in the "
        "namespace and start it again, on purpose (running processes of the old run stop on their own).",
    )
    p.add_argument("--yes", action="store_true", help="do it (without: say what would be deleted)")
    p.set_defaults(run=_cmd_reset_run)

    p = command(
        "sglang", "List the SGLang servers of a running producer (rollout.engine=sglang), or attach / detach one."
    )
    change = p.add_mutually_exclusive_group()
    change.add_argument("--attach", metavar="URL", default="", help="add this server (health, weight sync, router)")
    change.add_argument("--detach", metavar="URL", default="", help="drain and remove this server")
    p.add_argument("--producer", default="", help="producer id (default: the only live sglang producer)")
    p.set_defaults(run=_cmd_sglang)
    return parser


def _with_url(config: RunConfig, url: str) -> RunConfig:
    return replace(config, redis=replace(config.redis, url=url))


def _cmd_redis(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream import admin

    url = config.redis.resolved_url()
    if url:
        aio.run(admin.ping(config, url))
        print(f"Redis is up at {redact(url)} (nothing started).")
        return 0
    server_config = config.redis_server
    changes = {
        k: v for k, v in (("port", args.port), ("data_dir", args.data_dir), ("persistence", args.persistence)) if v
    }
    server_config = replace(server_config, **changes)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.cluster:
        return _run_cluster(args, server_config.binary, stop)
    with EmbeddedRedis(server_config) as server:
        mode = server_config.persistence
        where = f"persistence: {mode}, data: {server.data_dir}"
        print(f"Server {server.version} ({server.binary}) running at {server.url} ({where})")
        print(f"export MILES_REDIS_URL={server.url}", flush=True)
        stop.wait()
    print("Redis stopped.")
    return 0


def _run_cluster(args: argparse.Namespace, binary: str, stop: threading.Event) -> int:
    from miles_stream.redis_cluster import LocalCluster

    with LocalCluster(binary, primaries=args.cluster, replicas=args.replicas) as cluster:
        replicas = len(cluster.nodes) - args.cluster
        print(f"Cluster of {args.cluster} primaries and {replicas} replicas ({cluster.version}) on loopback")
        print(f"export MILES_REDIS_URL='{cluster.url_with_every_node}'")
        print("and a hash-tag namespace, e.g. bus.namespace={run1}", flush=True)
        stop.wait()
    print("Redis cluster stopped.")
    return 0


def _cmd_feed(args: argparse.Namespace, config: RunConfig) -> int:
    from producers.feeder import main as feed_main  # the process entry point; imports transformers lazily

    return feed_main(config)


def _cmd_produce(args: argparse.Namespace, config: RunConfig) -> int:
    from producers.rollout import main as produce_main  # imports torch and transformers

    return produce_main(config)


def _cmd_demo(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream.demo import DemoOptions, run_demo  # imports torch and transformers

    options = DemoOptions(
        work_dir=Path(args.work_dir),
        steps=args.steps,
        minutes=args.minutes,
        target_accuracy=args.target_accuracy,
        live=not args.no_live,
        overrides=args.overrides,
    )
    return run_demo(replace(options, config=Path(args.config)) if args.config else options)


def _cmd_train(args: argparse.Namespace, config: RunConfig) -> int:
    if args.sft:
        if args.replay:
            raise ConfigError("--sft and --replay: choose one")
        from miles_stream.trainer.sft import main as sft_main  # imports torch and transformers

        return sft_main(replace(config.sft, path=args.sft), config.trainer, config.algo, resume=args.resume)
    from consumers.trainer import main as train_main  # imports torch and transformers

    return train_main(config, resume=args.resume, replay=args.replay or ())


def _cmd_eval(args: argparse.Namespace, config: RunConfig) -> int:
    from consumers.evaluator import main as eval_main  # imports torch and transformers

    return eval_main(config)


def _cmd_record(args: argparse.Namespace, config: RunConfig) -> int:
    from consumers.recorder import main as record_main

    return record_main(config, out=args.out, max_file_mb=args.max_file_mb, name=args.name)


def _cmd_replay(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream import admin  # the status snapshot imports torch (weights)

    print(aio.run(admin.replay_files(config, args.files, args.rate)))
    return 0


def _cmd_status(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream import admin  # the status snapshot imports torch (weights)

    aio.run(admin.show_status(config, args.namespace, as_json=args.json, follow=args.watch, interval_s=args.interval))
    return 0


def _cmd_reset_run(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream import admin  # the status snapshot imports torch (weights)

    code, said = aio.run(admin.reset_namespace(config, yes=args.yes))
    print(said)
    return code


def _cmd_sglang(args: argparse.Namespace, config: RunConfig) -> int:
    from miles_stream import admin  # the status snapshot imports torch (weights)

    for line in aio.run(admin.sglang_servers(config, attach=args.attach, detach=args.detach, producer=args.producer)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
