"""A stand-in for an SGLang 0.5.23 server (and for SGLang's router), for the tests. It is not SGLang: SGLang
cannot run on these machines. Generation is our native engine on a tiny model, so logprobs and MoE routing are
real; every HTTP behaviour played here was read in SGLang 0.5.23's source (the wheel, `sglang/...` below) and
cites the file and line. The router is not in that wheel (it is the separate sglang-router package): its
part is written from the API summary and is not checked against source.

    python tests/sglang_standin.py --model DIR --port N [--api-key K] [--admin-api-key A] [--tp-size 2] ...
    python tests/sglang_standin.py --router --port N             a router (/workers, /generate proxied)

Faults for tests: POST /standin/faults {"fail_update_call": 2, "hang_update_s": 5, "fail_generates": 2}
(`fail_update_call`: the n-th weight-loading call from now fails after it has received its tensors, as a
load error in SGLang would; `fail_next_update` = `fail_update_call: 1`).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from sglang_standin_weights import Reply, Weights

# sglang/api/v1/api_types.py:177-208: SamplingParams is a JSON object whose unknown keys are rejected; the
# decoder (api_types.py:1259-1330) checks each key's JSON type. The keys and types we may meet:
SAMPLING_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "max_new_tokens": ((int,), "i64"), "temperature": ((int, float), "f64"), "top_p": ((int, float), "f64"),
    "top_k": ((int,), "i64"), "min_p": ((int, float), "f64"), "stop": ((str, list), "a string or a sequence"),
    "stop_token_ids": ((list,), "a sequence"), "ignore_eos": ((bool,), "a boolean"),
    "skip_special_tokens": ((bool,), "a boolean"), "spaces_between_special_tokens": ((bool,), "a boolean"),
    "no_stop_trim": ((bool,), "a boolean"), "n": ((int,), "i64"), "sampling_seed": ((int,), "i64"),
    "min_new_tokens": ((int,), "i64"), "frequency_penalty": ((int, float), "f64"),
    "presence_penalty": ((int, float), "f64"), "repetition_penalty": ((int, float), "f64"),
}  # fmt: skip
TOP_K_ALL = 1 << 30  # sglang/srt/sampling/sampling_params.py:43
# sglang/srt/entrypoints/http_server.py: the routes marked @auth_level(AuthLevel.ADMIN_OPTIONAL) that we call
# (flush_cache 1026, update_weights_from_disk 1301, init/destroy_weights_update_group 1405/1421,
# update_weights_from_tensor 1437, begin/end_weight_update 1459/1474, update_weights_from_distributed 1489,
# update_weight_version 1528, abort_request 1722, pause/continue_generation 1832/1845); the others are NORMAL.
ADMIN_ROUTES = frozenset({"/flush_cache", "/update_weights_from_disk", "/init_weights_update_group",
                          "/destroy_weights_update_group", "/update_weights_from_tensor", "/begin_weight_update",
                          "/end_weight_update", "/update_weights_from_distributed", "/update_weight_version",
                          "/abort_request", "/pause_generation", "/continue_generation"})  # fmt: skip


def _bearer(header: str | None, key: str) -> bool:  # sglang/srt/utils/auth.py:108-117
    parts = (header or "").split(" ", 1)
    return len(parts) == 2 and parts[0].lower() == "bearer" and parts[1] == key


def authorize(path: str, header: str | None, api_key: str, admin_api_key: str) -> None:
    """sglang/srt/utils/auth.py:98-151 (decide_request_auth), answered as auth.py:192-202 does."""
    if path.startswith(("/health", "/ready", "/metrics", "/standin")):  # auth.py:101-106 (/standin: ours)
        return
    # ADMIN_OPTIONAL (auth.py:133-143): the admin key if set, else the api key; NORMAL (auth.py:148-151): the
    key = (admin_api_key or api_key) if path in ADMIN_ROUTES else api_key  # api key if set, the admin key refused
    if key and not _bearer(header, key):
        raise Reply(401, {"error": "Unauthorized"})


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        from miles_stream.engines.native.engine import NativeEngine

        self.args = args
        self.engine = NativeEngine(args.model, max_batch=16, seed=0)
        self.context_len = args.context_length or int(self.engine.model.config.max_position_embeddings)
        self.weights = Weights(self, args)
        self.in_flight: set[str] = set()
        self.running = threading.Event()  # cleared while paused (tokenizer_manager.py:2267-2286)
        self.running.set()
        self.pause_mode = ""
        self.faults: dict[str, Any] = {}
        self.stats: dict[str, Any] = {"generate": 0, "calls": []}
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, body: Any, headers: Any) -> Any:
        with self.lock:
            self.stats["calls"].append(path)
        authorize(path, headers.get("Authorization"), self.args.api_key, self.args.admin_api_key)
        if method == "GET" and path in ("/health", "/health_generate"):
            return self.health_generate()
        if path == "/model_info":  # http_server.py:812-829: weight_version is the manager's config value
            return {"model_path": self.args.model, "weight_version": self.weights.version,
                    "is_generation": True, "architectures": ["standin"]}  # fmt: skip
        if path == "/server_info":  # http_server.py:863-893 + utils/common.py:3584-3593: the resolved server
            return {"tp_size": self.args.tp_size, "dp_size": self.args.dp_size, "pp_size": self.args.pp_size,
                    "enable_return_routed_experts": self.args.enable_return_routed_experts,
                    "context_length": self.args.context_length or None, "weight_version": "default",
                    "version": "0.5.23-standin", "internal_states": [{}]}  # fmt: skip  # args (fields/*.py)
        if path == "/standin/faults":
            self.faults.update(body)
            return {"ok": True}
        if path == "/standin/stats":  # tests only
            return {**self.stats, **self.weights.stats(), "paused": not self.running.is_set(),
                    "in_flight": len(self.in_flight),
                    "tokens_in_flight": sum(len(r.tokens) for r in self.engine._rows)}  # fmt: skip
        name = path.strip("/")
        handler = getattr(self, "do_" + name, None) or getattr(self.weights, "do_" + name, None)
        if handler is None:
            raise Reply(404, {"detail": "Not Found"})
        return handler(body or {})

    def health_generate(self) -> None:
        """http_server.py:721-799: a one-token request through generate_request, which waits on the pause lock
        first (tokenizer_manager.py:938-939); no reply within HEALTH_CHECK_TIMEOUT (SGLANG_HEALTH_CHECK_TIMEOUT,
        20 s by default, http_server.py:218) is a 503."""
        if self.faults.get("unhealthy"):
            raise Reply(503, None)
        if not self.running.wait(float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", 20))):
            raise Reply(503, None)

    # ---- generation --------------------------------------------------------------------------------------
    def do_generate(self, body: dict[str, Any]) -> Any:
        ids, sp, rid = body.get("input_ids"), body.get("sampling_params") or {}, str(body.get("rid", ""))
        contract_gate(sp)  # http_server.py:933-940: the schema check before anything, 400 {"error": text}
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise Reply(400, {"error": "invalid type: expected a sequence of i64"})
        if self.faults.get("fail_generates", 0) > 0:
            self.faults["fail_generates"] -= 1
            raise Reply(503, {"error": {"message": "injected failure"}})
        with self.lock:
            self.in_flight.add(rid)
            self.stats["generate"] += 1
        try:
            self.running.wait()  # tokenizer_manager.py:938-939: a request waits while the server is paused
            params = self.validate(ids, sp)  # tokenizer_manager.py:1271 then 1567, after the pause wait
            return self._generate(ids, params, rid, body)
        except ValueError as exc:  # http_server.py:986-990 + 2246-2250: a ValueError is a 400
            raise Reply(400, {"error": {"message": str(exc)}}) from exc
        finally:
            with self.lock:
                self.in_flight.discard(rid)

    def validate(self, ids: list[int], sp: dict[str, Any]) -> Any:
        from miles_stream.engines.base import SamplingParams

        if len(ids) >= self.context_len:  # tokenizer_manager.py:1337-1351 (allow_auto_truncate off)
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length "
                             f"({self.context_len} tokens).")  # fmt: skip
        max_new = sp.get("max_new_tokens", 128)  # sampling_params.py:149: 128 by default
        if max_new is not None and max_new + len(ids) > self.context_len:  # tokenizer_manager.py:1353-1376
            raise ValueError(f"Requested token count exceeds the model's maximum context length of "
                             f"{self.context_len} tokens. You requested a total of {max_new + len(ids)} tokens: "
                             f"{len(ids)} tokens from the input messages and {max_new} tokens for the completion."
                             " Please reduce the number of tokens in the input messages or the completion to fit"
                             " within the limit.")  # fmt: skip
        temperature, top_p, top_k = sp.get("temperature", 1.0), sp.get("top_p", 1.0), sp.get("top_k", -1)
        if 0 <= temperature < 1e-6:  # sampling_params.py:245-250: greedy is top_k 1; -1 is the whole vocab
            temperature, top_k = 1.0, 1
        top_k = TOP_K_ALL if top_k == -1 else top_k
        if temperature < 0:  # sampling_params.py:252-266 (verify)
            raise ValueError(f"temperature must be a non-negative finite number, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if top_k < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        if max_new is not None and max_new < 0:  # sampling_params.py:285-289
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new}.")
        greedy = sp.get("temperature", 1.0) < 1e-6
        return SamplingParams(temperature=0.0 if greedy else float(temperature), top_p=float(top_p),
                              top_k=0 if top_k == TOP_K_ALL else top_k, max_new_tokens=max_new,
                              stop_token_ids=tuple(sp.get("stop_token_ids") or []),
                              ignore_eos=bool(sp.get("ignore_eos", False)))  # fmt: skip

    def _generate(self, ids: list[int], params: Any, rid: str, body: dict[str, Any]) -> Any:
        from miles_stream.engines.base import GenerationRequest

        result = self.engine.submit(GenerationRequest(request_id=rid, prompt_ids=ids, params=params)).result()
        tokens, logprobs = result.response_ids.tolist(), result.logprobs.tolist()
        spans = [(int(a), int(b)) for a, b in result.version_spans.tolist()]
        ends = [s for s, _ in spans[1:]] + [len(tokens)]
        finishes = {"stop": {"type": "stop", "matched": tokens[-1] if tokens else 0},
                    "length": {"type": "length", "length": len(tokens)},
                    "abort": {"type": "abort", "message": "aborted", "status_code": None}}  # fmt: skip
        meta: dict[str, Any] = {
            "id": rid, "finish_reason": finishes[result.finish_reason], "prompt_tokens": len(ids),
            "completion_tokens": len(tokens),
            "weight_version": _wire(spans[-1][1]) if spans else self.weights.version,
            "weight_versions": [{"version": _wire(v), "start": a, "end": b}
                                for (a, v), b in zip(spans, ends, strict=True)],
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)],
            "output_token_logprobs_length": len(tokens), "input_token_logprobs": [],
        }  # fmt: skip
        # batch_result_processor.py:149-152: no routed experts unless the request asks and the server was
        # started with --enable-return-routed-experts (else the capturer is None: routed_experts.py:50-51)
        if body.get("return_routed_experts") and self.args.enable_return_routed_experts and result.routing is not None:
            meta["routed_experts"] = base64.b64encode(result.routing.astype("<i4").tobytes()).decode()
        return {"text": "", "output_ids": tokens, "meta_info": meta}

    def do_abort_request(self, body: dict[str, Any]) -> None:  # http_server.py:1721-1731
        rids = list(self.in_flight) if body.get("abort_all") else [str(body.get("rid"))]
        self.run(self.engine.abort(rids))

    def do_pause_generation(self, body: dict[str, Any]) -> Any:  # tokenizer_manager.py:2267-2279
        self.pause_mode = body.get("mode", "abort")  # io_struct.py:1947: abort by default
        self.running.clear()
        if self.pause_mode == "abort":
            self.run(self.engine.abort(list(self.in_flight)))
        else:  # retract / in_place: requests stay and go on after continue
            self.run(self.engine.pause())
        return {"message": "Generation paused successfully.", "status": "ok"}  # http_server.py:1839-1842

    def do_continue_generation(self, body: dict[str, Any]) -> Any:  # tokenizer_manager.py:2281-2286
        self.run(self.engine.resume())
        self.running.set()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def do_flush_cache(self, body: dict[str, Any]) -> Any:
        """http_server.py:1025-1040: 400 while requests run (in_place keeps them in the running batch,
        io_struct.py:1933-1937)."""
        if not self.flushable():
            raise Reply(400, "Flush cache failed.\n")
        return "Cache flushed.\n"

    def flushable(self) -> bool:
        return not ((self.running.is_set() and self.in_flight) or self.pause_mode == "in_place")

    def run(self, coro: Any) -> Any:
        return self.weights.run(coro)


def contract_gate(sp: Any) -> None:
    """api_types.py:1259-1330 (decode_SamplingParams): unknown keys and wrong JSON types, in serde's words
    (api_types.py:30-58, 97-108)."""
    if not isinstance(sp, dict):
        raise Reply(400, {"error": "invalid type: expected struct SamplingParams"})
    for key, value in sp.items():
        if key not in SAMPLING_TYPES:
            raise Reply(400, {"error": f"unknown field `{key}`, expected one of "
                                       + ", ".join(f"`{k}`" for k in SAMPLING_TYPES)})  # fmt: skip
        types, expected = SAMPLING_TYPES[key]
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            shown = f"floating point `{value}`" if isinstance(value, float) else json.dumps(value)
            raise Reply(400, {"error": f"invalid type: {shown}, expected {expected}"})


class Router:
    """Not from source (sglang-router is not in the sglang wheel): the /workers API as the summary has it."""

    def __init__(self) -> None:
        self.workers: dict[str, str] = {}
        self.ids = itertools.count()
        self.turn = itertools.count()

    def handle(self, method: str, path: str, body: Any, headers: Any) -> Any:
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
                                             headers={"Content-Type": "application/json",
                                                      **({"Authorization": headers["Authorization"]}
                                                         if headers.get("Authorization") else {})})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=600) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as exc:  # the worker's refusal, passed on
                raise Reply(exc.code, json.loads(exc.read() or b"null")) from exc
        raise Reply(404, {"error": {"message": f"the router does not serve {path}"}})


def serve(app: Server | Router, port: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def _do(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length)) if length else None
                status, out = 200, app.handle(method, self.path.split("?")[0], body, self.headers)
            except Reply as r:
                status, out = r.status, r.body
            except Exception as exc:  # an assertion in SGLang, or a stand-in bug: a 500 either way
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--router", action="store_true")
    parser.add_argument("--api-key", default="")  # fields/serving.py:160-167
    parser.add_argument("--admin-api-key", default="")
    parser.add_argument("--context-length", type=int, default=0)  # fields/model.py:110; 0: the model's
    parser.add_argument("--tp-size", type=int, default=1)  # fields/parallel.py:45-80 (reported only)
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--enable-return-routed-experts", action="store_true")  # fields/exec_.py:158-160
    parser.add_argument("--rendezvous-timeout-s", type=float, default=1800.0)  # utils/common.py:2894-2895
    args = parser.parse_args()
    torch.set_num_threads(1)
    serve(Router() if args.router else Server(args), args.port)
