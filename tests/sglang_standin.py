"""A stand-in for an SGLang server (and for SGLang's router), written for the tests from our API spec
(`../shared/reference/sglang_api.md`, SGLang 0.5.2x). It is not SGLang: no SGLang can run on these machines.
Generation is our native engine on a tiny model, so logprobs and MoE routing are real; the HTTP surface
follows the spec: the schema gate on sampling_params, ids and [logprob, id, null] triples, finish reasons,
abort returning partial output with HTTP 200, pause modes, the weight-update session, version spans.

    python tests/sglang_standin.py --model DIR --port N          a server
    python tests/sglang_standin.py --router --port N             a router (/workers, /generate proxied)

Faults for tests: POST /standin/faults {"fail_next_update": true, "hang_update_s": 5, "fail_generates": 2}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import threading
import time
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

SAMPLING_KEYS: dict[str, Any] = {  # the keys we may meet and their JSON types; any other key is refused
    "max_new_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
    "min_p": (int, float), "stop": (str, list), "stop_token_ids": list, "ignore_eos": bool,
    "skip_special_tokens": bool, "spaces_between_special_tokens": bool, "no_stop_trim": bool, "n": int,
    "sampling_seed": int,
}  # fmt: skip
SESSION_ERROR = "must run between begin_weight_update() and end_weight_update()"


class Reply(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class Server:
    def __init__(self, model: str) -> None:
        from miles_stream.engines.native.engine import NativeEngine

        self.model_path = model
        self.engine = NativeEngine(model, max_batch=16, seed=0)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.version = "default"
        self.spans: dict[str, list[tuple[int, str]]] = {}
        self.in_flight: set[str] = set()
        self.running = threading.Event()
        self.running.set()
        self.pause_mode = ""
        self.session = False
        self.pending: dict[str, torch.Tensor] = {}
        self.group: Any = None
        self.faults: dict[str, Any] = {}
        self.stats: dict[str, Any] = {"generate": 0, "updates": 0, "calls": []}
        self.lock = threading.Lock()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def handle(self, method: str, path: str, body: Any) -> Any:
        with self.lock:
            self.stats["calls"].append(path)
        if method == "GET" and path in ("/health", "/health_generate"):
            if self.faults.get("unhealthy"):
                raise Reply(503, None)
            return None
        if path == "/model_info":
            return {"model_path": self.model_path, "weight_version": self.version, "architectures": ["standin"]}
        if path == "/server_info":
            return {"tp_size": 1, "dp_size": 1, "version": "standin"}
        if path == "/standin/faults":
            self.faults.update(body)
            return {"ok": True}
        if path == "/standin/stats":
            return {**self.stats, "paused": not self.running.is_set(), "session": self.session,
                    "version": self.version, "in_flight": len(self.in_flight),
                    "tokens_in_flight": sum(len(r.tokens) for r in self.engine._rows)}  # fmt: skip  # tests only
        handler = getattr(self, "do_" + path.strip("/"), None)
        if handler is None:
            raise Reply(404, {"error": {"message": f"no route {path}"}})
        return handler(body or {})

    # ---- generation --------------------------------------------------------------------------------------
    def do_generate(self, body: dict[str, Any]) -> Any:
        from miles_stream.engines.base import GenerationRequest, SamplingParams

        ids, sp, rid = body.get("input_ids"), body.get("sampling_params", {}), str(body.get("rid", ""))
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise Reply(400, {"error": "input_ids must be a list of ints"})
        for key, value in sp.items():
            if key not in SAMPLING_KEYS:
                raise Reply(400, {"error": f"unknown sampling_params key {key!r}"})
            if not isinstance(value, SAMPLING_KEYS[key]) or (SAMPLING_KEYS[key] is int and isinstance(value, bool)):
                raise Reply(400, {"error": f"sampling_params.{key} has the wrong type"})
        if self.faults.get("fail_generates", 0) > 0:
            self.faults["fail_generates"] -= 1
            raise Reply(503, {"error": {"message": "injected failure"}})
        with self.lock:
            if rid in self.in_flight:
                raise Reply(400, {"error": {"message": f"duplicate rid {rid}"}})
            self.in_flight.add(rid)
            self.stats["generate"] += 1
        try:
            self.running.wait()  # while paused, new requests block until continue_generation
            top_k = sp.get("top_k", -1)
            params = SamplingParams(temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                                    top_k=top_k if top_k > 0 else 0, max_new_tokens=sp.get("max_new_tokens", 128),
                                    stop_token_ids=tuple(sp.get("stop_token_ids", [])),
                                    ignore_eos=sp.get("ignore_eos", False))  # fmt: skip
            future = self.engine.submit(GenerationRequest(request_id=rid, prompt_ids=ids, params=params))
            result = future.result()
        finally:
            with self.lock:
                self.in_flight.discard(rid)
        tokens, logprobs = result.response_ids.tolist(), result.logprobs.tolist()
        spans = [(int(a), int(b)) for a, b in result.version_spans.tolist()]
        ends = [s for s, _ in spans[1:]] + [len(tokens)]
        finishes = {"stop": {"type": "stop", "matched": tokens[-1] if tokens else 0},
                    "length": {"type": "length", "length": len(tokens)},
                    "abort": {"type": "abort", "message": "aborted", "status_code": None}}  # fmt: skip
        finish = finishes[result.finish_reason]
        meta: dict[str, Any] = {
            "id": rid, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": len(tokens),
            "weight_version": _wire(spans[-1][1]) if spans else self.version,
            "weight_versions": [{"version": _wire(v), "start": a, "end": b}
                                for (a, v), b in zip(spans, ends, strict=True)],
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)],
            "output_token_logprobs_length": len(tokens), "input_token_logprobs": [],
        }  # fmt: skip
        if body.get("return_routed_experts") and result.routing is not None:
            meta["routed_experts"] = base64.b64encode(result.routing.astype("<i4").tobytes()).decode()
        return {"text": "", "output_ids": tokens, "meta_info": meta}

    def do_abort_request(self, body: dict[str, Any]) -> None:
        rids = list(self.in_flight) if body.get("abort_all") else [str(body.get("rid"))]
        self.run(self.engine.abort(rids))

    def do_pause_generation(self, body: dict[str, Any]) -> Any:
        self.pause_mode = body.get("mode", "abort")
        self.running.clear()
        if self.pause_mode == "abort":
            self.run(self.engine.abort(list(self.in_flight)))
        else:  # retract / in_place: requests stay and go on after continue
            self.run(self.engine.pause())
        return {"message": "paused", "status": "ok"}

    def do_continue_generation(self, body: dict[str, Any]) -> Any:
        self.run(self.engine.resume())
        self.running.set()
        return {"message": "continued", "status": "ok"}

    def do_flush_cache(self, body: dict[str, Any]) -> Any:
        if (self.running.is_set() and self.in_flight) or self.pause_mode == "in_place":
            raise Reply(400, "Cache not flushed: requests are running or waiting")
        return "Cache flushed."

    # ---- weights -----------------------------------------------------------------------------------------
    def _fault(self) -> None:
        if self.faults.get("hang_update_s"):
            time.sleep(self.faults["hang_update_s"])
        if self.faults.pop("fail_next_update", False):
            raise Reply(400, {"success": False, "message": "injected failure"})

    def do_update_weights_from_disk(self, body: dict[str, Any]) -> Any:
        from safetensors.torch import load_file

        self._fault()
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
            state.update(load_file(str(f)))
        self.run(self.engine.update_weights(_ours(body["weight_version"]), state))
        self.version = body["weight_version"]
        self.stats["updates"] += 1
        return {"success": True, "message": "ok", "num_paused_requests": 0}

    def do_begin_weight_update(self, body: dict[str, Any]) -> Any:
        self.session = True
        return {"success": True, "message": "ok"}

    def do_end_weight_update(self, body: dict[str, Any]) -> Any:
        if not self.session:
            return {"success": False, "message": SESSION_ERROR}
        self.session = False
        return {"success": True, "message": "ok"}

    def do_init_weights_update_group(self, body: dict[str, Any]) -> Any:
        from torch.distributed import rendezvous  # type: ignore[attr-defined]
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper

        timeout = timedelta(seconds=60)
        url = f"tcp://{body['master_address']}:{body['master_port']}"
        store, _, _ = next(rendezvous(url, body["rank_offset"], body["world_size"], timeout=timeout))
        group = _new_process_group_helper(body["world_size"], body["rank_offset"], [], Backend(body["backend"]),
                                          PrefixStore(body["group_name"], store), group_name=body["group_name"],
                                          timeout=timeout)  # fmt: skip
        self.group = group[0] if isinstance(group, tuple) else group
        return {"success": True, "message": "ok"}

    def do_destroy_weights_update_group(self, body: dict[str, Any]) -> Any:
        self.group = None
        return {"success": True, "message": "ok"}

    def do_update_weights_from_distributed(self, body: dict[str, Any]) -> Any:
        import torch.distributed as dist

        if not self.session:
            return {"success": False, "message": SESSION_ERROR}
        options = dist.BroadcastOptions()
        options.rootRank = 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            self.group.broadcast([tensor], options).wait()  # one broadcast per name, in list order
            self.pending[name] = tensor
        self._fault()
        return {"success": True, "message": "ok"}

    def do_update_weights_from_tensor(self, body: dict[str, Any]) -> Any:
        from multiprocessing.reduction import ForkingPickler

        if not self.session:
            return {"success": False, "message": SESSION_ERROR}
        (entry,) = body["serialized_named_tensors"]  # TP 1
        for name, tensor in ForkingPickler.loads(base64.b64decode(entry)):
            self.pending[name] = tensor.clone()
        self._fault()
        return {"success": True, "message": "ok"}

    def do_update_weight_version(self, body: dict[str, Any]) -> Any:
        if self.pending:
            self.run(self.engine.update_weights(_ours(body["new_version"]), dict(self.pending)))
            self.pending.clear()
            self.stats["updates"] += 1
        self.version = body["new_version"]
        return {"success": True, "message": "ok", "new_version": self.version}


class Router:
    def __init__(self) -> None:
        self.workers: dict[str, str] = {}
        self.ids = itertools.count()
        self.turn = itertools.count()

    def handle(self, method: str, path: str, body: Any) -> Any:
        if path == "/health":
            return None
        if path == "/workers" and method == "POST":
            worker_id = f"w{next(self.ids)}"
            self.workers[worker_id] = body["url"]
            return {"status": "accepted", "worker_id": worker_id}
        if path == "/workers":
            return {"workers": [{"id": i, "url": u} for i, u in self.workers.items()]}
        if path.startswith("/workers/") and method == "DELETE":
            if self.workers.pop(path.removeprefix("/workers/"), None) is None:
                raise Reply(404, {"error": {"message": "no such worker"}})
            return {"status": "removed"}
        if path == "/generate":
            if not self.workers:
                raise Reply(503, {"error": {"message": "no workers"}})
            urls = list(self.workers.values())
            url = urls[next(self.turn) % len(urls)]
            request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=600) as reply:
                return json.loads(reply.read())
        raise Reply(404, {"error": {"message": f"the router does not serve {path}"}})


def serve(app: Server | Router, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def _do(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            try:
                status, out = 200, app.handle(method, self.path.split("?")[0], body)
            except Reply as r:
                status, out = r.status, r.body
            except Exception as exc:  # a stand-in bug: visible to the test as a 500
                status, out = 500, {"error": {"message": repr(exc)}}
            data = b"" if out is None else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._do("GET")

        def do_POST(self) -> None:
            self._do("POST")

        def do_DELETE(self) -> None:
            self._do("DELETE")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"ready {port}", flush=True)
    server.serve_forever()


def _wire(version: int) -> str:
    return "default" if version == 0 else str(version)


def _ours(version: str) -> int:
    return 0 if version == "default" else int(version)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--router", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    serve(Router() if args.router else Server(args.model), args.port)
