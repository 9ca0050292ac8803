"""A stand-in for ``python -m sglang.launch_server`` that speaks SGLang 0.5.23's HTTP wire format.

``--protocol 0.5.23`` (default) or ``--protocol legacy`` (0.5.x before the update session):
- 0.5.23: ``/server_info`` (``/get_server_info`` kept as the deprecated alias), ``/begin_weight_update``
  and ``/end_weight_update``; ``update_weights_from_tensor`` / ``_from_distributed`` outside an open
  session fail (400, success false, with 0.5.23's message "... must run between begin_weight_update()
  and end_weight_update()"), so do a second begin and an end without begin (0.5.23's messages too,
  from ``managers/scheduler_components/weight_updater.py``); ``update_weights_from_disk`` needs none.
- legacy: only ``/get_server_info``; no session endpoints (404); updates accepted any time.
``--api-key K``: every path but ``/health*`` needs ``Authorization: Bearer K`` (else 401
``{"error": "Unauthorized"}``), as sglang's ``add_api_key_middleware``. ``--dp-size`` is reported.
Memory tags released with ``/release_memory_occupation`` are tracked: a weight update while
"weights" is released, a flush while "kv_cache" is released, or a generation while anything is
released, fails (400) instead of touching freed memory (conservative: what a real server does in
those cases was not verified).

Used by tests/test_sglang_engine.py (not a test module itself). Stdlib HTTP server; torch is
imported only by the weight endpoints. What it checks and does:
- ``/generate``: request fields must be sglang's (unknown top-level or sampling field -> 400, like
  pydantic / msgspec validation there); answers with ``output_ids`` and ``meta_info`` holding
  ``id``, ``finish_reason`` ({"type": "stop", "matched": id} / {"type": "length", "length": n}),
  ``prompt_tokens``, ``completion_tokens``, ``weight_version`` and ``output_token_logprobs``
  ([logprob, token_id, null] triples). The "model" is a formula of (prompt, seed, position), see
  ``fake_token``; ``--die-after K`` exits the process abruptly on the K-th /generate of the first
  incarnation (a marker file remembers that it already died once).
- ``/generate`` with ``sampling_params.max_new_tokens == 0`` (prefill-only scoring, the weights-arrived guard):
  needs ``--hf-config DIR`` (an HF config.json), whose transformers model (fp32, random init) holds every tensor
  received so far; answers ``meta_info.input_token_logprobs`` for the input tokens from ``logprob_start_len`` on as
  ``[logprob, token_id, null]`` with the first logprob null, as sglang 0.5.23 does (``[None] + logprobs[:-1]`` in
  managers/scheduler_components/logprob_result_processor.py), from untempered logits.
- ``/update_weights_from_tensor``: decodes every TP rank's base64 payload -- with sglang's own
  ``MultiprocessingSerializer`` + ``FlattenedTensorBucket`` when ``--use-sglang`` (and importable),
  else with an allowlisted unpickler -- and checks that all ranks agree.
- ``/init_weights_update_group`` + ``/update_weights_from_distributed``: joins the custom group
  (gloo here) as ``rank_offset + tp_rank`` and receives one broadcast per tensor, in order. A second group
  under a name that still exists is refused (torch's "group name has already been created", which the real
  server returns as success false); ``/destroy_weights_update_group`` removes one (0.5.23's messages).

Learned from real sglang 0.5.23 on CPU (tests/test_sglang_real.py) and mirrored here:
- ``seed`` is not a sampling field (HTTP 400); the per-request seed is ``sampling_seed``.
- ``/get_weights_by_name`` exists for Llama only: ``--model-type qwen3`` (default) answers it with an error,
  ``--model-type llama`` with the tensor's first values.
- A CPU tensor payload pickled under torch's default "file_descriptor" sharing strategy makes the scheduler
  fetch the fd from the sender's resource sharer, which rejects it ("AuthenticationError: digest sent was
  rejected") and the real server dies: so does this one (exit 21).
- ``/update_weights_from_disk``: reads ``*.safetensors`` of ``model_path``.
- Control endpoints are logged; ``GET /_events`` returns the log, ``GET /_env`` the process environment,
  ``POST /_dump_weights`` saves the received tensors with ``torch.save``. ``--start-delay S`` listens only
  after S seconds (a slow model load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GENERATE_FIELDS = {"rid", "input_ids", "text", "sampling_params", "return_logprob", "logprob_start_len",
                   "top_logprobs_num", "stream", "return_text_in_logprobs", "lora_path", "session_params"}
SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop",
                   "stop_token_ids", "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed",
                   "frequency_penalty", "presence_penalty", "repetition_penalty"}
TENSOR_FIELDS = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
                 "selector", "torch_empty_cache"}
DIST_INIT_FIELDS = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
DIST_UPDATE_FIELDS = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
                      "weight_version", "selector", "load_format", "torch_empty_cache"}
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def fake_token(prompt: list[int], seed: int, k: int, vocab: int) -> tuple[int, float]:
    """The k-th response token of the fake model and its log-prob."""
    tok = (sum(prompt) * 31 + len(prompt) * 7 + seed % 1009 * 13 + k * 11) % vocab
    return tok, -0.01 * (tok + 1) - 0.001 * k


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.n_generate = 0
        self.events: list = []
        self.weights: dict = {}
        self.weight_version = "default"
        self.groups: dict = {}
        self.paused = False
        self.session = False
        self.released: set = set()
        self._model = None
        self.version_count = 0  # bumped by every weight update
        self._loaded = 0  # how many of `weights` were last copied into the model

    def model(self):
        """The scoring model (``--hf-config``) with every tensor received so far (call under the lock)."""
        import torch

        if self._model is None:
            if not self.args.hf_config:
                raise ValueError("scoring (max_new_tokens=0) needs --hf-config")
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            self._model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.args.hf_config),
                                                           dtype=torch.float32).eval()
            self._loaded = -1
        if self._loaded != self.version_count:
            params = self._model.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, t in self.weights.items():
                    params[name].data.copy_(t.to(params[name].dtype))
            self._loaded = self.version_count
        return self._model


def _claim(marker: str) -> bool:
    """True for exactly one process: several servers share one marker and may reach their K-th /generate at the
    same instant (an exists-then-create check let both die, and the engine counted two restarts)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def make_handler(state: State):
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _body(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if raw and self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                raise ValueError("content-type must be application/json")
            return json.loads(raw) if raw else None

        def _send(self, status, obj):
            raw = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(obj, str) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _authorized(self) -> bool:
            if not args.api_key or self.path.startswith("/health"):
                return True
            if self.headers.get("Authorization") == "Bearer " + args.api_key:
                return True
            self._body_discard()
            self._send(401, {"error": "Unauthorized"})
            return False

        def _body_discard(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)

        def do_GET(self):
            if not self._authorized():
                return None
            if self.path == "/health":
                return self._send(200, "")
            info_paths = ("/server_info", "/get_server_info") if args.protocol == "0.5.23" else ("/get_server_info",)
            if self.path in info_paths:
                self.log_event("server_info", path=self.path)
                return self._send(200, {"tp_size": args.tp, "dp_size": args.dp_size, "version": args.protocol,
                                        "pid": os.getpid()})
            if self.path == "/_env":  # what the server process inherited (tests of the launch environment)
                return self._send(200, dict(os.environ))
            if self.path == "/_events":
                with state.lock:
                    return self._send(200, {"events": state.events, "weight_version": state.weight_version,
                                            "pid": os.getpid(), "n_generate": state.n_generate})
            return self._send(404, {"error": self.path})

        def do_POST(self):
            if not self._authorized():
                return None
            try:
                body = self._body()
                fn = getattr(self, "h_" + self.path.strip("/").replace("/", "_"), None)
                if fn is None or (args.protocol == "legacy" and self.path in SESSION_PATHS):
                    return self._send(404, {"detail": "Not Found"})
                status, obj = fn(body)
            except Exception as e:  # report, like the real server's 400 for invalid input
                status, obj = 400, {"success": False, "message": f"{type(e).__name__}: {e}"}
            return self._send(status, obj)

        def log_event(self, name, **kw):
            with state.lock:
                state.events.append({"event": name, **kw})

        # ----------------------------------------------------------- generation
        def h_generate(self, body):
            if state.released:
                return 400, {"error": f"memory {sorted(state.released)} is released"}
            unknown = set(body) - GENERATE_FIELDS
            if unknown:
                return 400, {"error": f"unknown GenerateReqInput fields {sorted(unknown)}"}
            sp = body["sampling_params"]
            unknown = set(sp) - SAMPLING_FIELDS
            if unknown:  # 0.5.23's msgspec wording
                return 400, {"error": f"unknown field `{sorted(unknown)[0]}`, expected one of {sorted(SAMPLING_FIELDS)}"}
            if sp.get("n", 1) != 1 or body.get("return_logprob") is not True:
                return 400, {"error": "this fake serves n=1 with return_logprob only"}
            prompt = [int(t) for t in body["input_ids"]]
            if int(sp.get("max_new_tokens", 1)) == 0:
                return self._score(body, prompt)
            with state.lock:
                state.n_generate += 1
                count = state.n_generate
                state.events.append({"event": "generate", "rid": body["rid"]})
            if args.die_after and count == args.die_after and _claim(args.die_marker):
                time.sleep(args.gen_delay / 2)  # let the other in-flight requests arrive first
                os._exit(17)
            time.sleep(args.gen_delay)
            seed = int(sp.get("sampling_seed") or 0)
            stops = set(sp.get("stop_token_ids") or [])
            ids, triples, reason = [], [], None
            for k in range(int(sp["max_new_tokens"])):
                tok, lp = fake_token(prompt, seed, k, args.vocab)
                ids.append(tok)
                triples.append([lp, tok, None])
                if tok in stops:
                    reason = {"type": "stop", "matched": tok}
                    break
            if reason is None:
                reason = {"type": "length", "length": len(ids)}
            with state.lock:
                state.events.append({"event": "generated", "rid": body["rid"]})
                version = state.weight_version
            meta = {"id": body["rid"], "finish_reason": reason, "prompt_tokens": len(prompt),
                    "weight_version": version, "completion_tokens": len(ids), "cached_tokens": 0,
                    "output_token_logprobs": triples}
            return 200, {"text": " ".join(map(str, ids)), "output_ids": ids, "meta_info": meta}

        def _score(self, body, prompt):
            import torch

            start = int(body.get("logprob_start_len", -1))
            if not 0 <= start < len(prompt):
                return 400, {"error": f"this fake scores with 0 <= logprob_start_len < {len(prompt)}, got {start}"}
            with state.lock:
                model = state.model()
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
                version = state.weight_version
                state.events.append({"event": "score", "rid": body.get("rid")})
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
            vals = [None] + lp[start:].tolist()  # the token at logprob_start_len gets none, as in sglang
            meta = {"id": body.get("rid"), "finish_reason": {"type": "length", "length": 0}, "weight_version": version,
                    "prompt_tokens": len(prompt), "completion_tokens": 0, "cached_tokens": 0,
                    "input_token_logprobs": [[v, t, None] for v, t in zip(vals, prompt[start:])],
                    "output_token_logprobs": []}
            return 200, {"text": "", "output_ids": [], "meta_info": meta}

        def h_abort_request(self, body):
            self.log_event("abort_request", rid=body.get("rid"))
            return 200, ""

        # ----------------------------------------------------------- control
        def h_pause_generation(self, body):
            self.log_event("pause_generation", mode=(body or {}).get("mode"))
            state.paused = True
            return 200, {"message": "Generation paused successfully.", "status": "ok"}

        def h_continue_generation(self, body):
            self.log_event("continue_generation")
            state.paused = False
            return 200, {"message": "Generation continued successfully.", "status": "ok"}

        def h_flush_cache(self, body):
            if "kv_cache" in state.released:
                return 400, {"success": False, "message": "kv_cache memory is released"}
            self.log_event("flush_cache")
            return 200, "Cache flushed.\n"

        def h_release_memory_occupation(self, body):
            tags = (body or {}).get("tags")
            self.log_event("release_memory_occupation", tags=tags)
            state.released |= set(tags or MEMORY_TAGS)
            return 200, ""

        def h_resume_memory_occupation(self, body):
            tags = (body or {}).get("tags")
            self.log_event("resume_memory_occupation", tags=tags)
            state.released -= set(tags or MEMORY_TAGS)
            return 200, ""

        # ----------------------------------------------------------- update session (0.5.23)
        def h_begin_weight_update(self, body):
            if state.session:
                return 400, {"success": False, "message": "a weight-update session is already open; "
                                                          "call end_weight_update() first"}
            state.session = True
            self.log_event("begin_weight_update")
            return 200, {"success": True, "message": "Success"}

        def h_end_weight_update(self, body):
            if not state.session:
                return 400, {"success": False,
                             "message": "no weight-update session is open; call begin_weight_update() first"}
            state.session = False
            self.log_event("end_weight_update")
            return 200, {"success": True, "message": "Success"}

        def _refuse_update(self, what):
            if args.protocol == "0.5.23" and not state.session:
                return 400, {"success": False,
                             "message": f"{what} must run between begin_weight_update() and end_weight_update()"}
            if "weights" in state.released:
                return 400, {"success": False, "message": "weights memory is released"}
            return None

        # ----------------------------------------------------------- weights
        def _store(self, named, version):
            with state.lock:
                for name, t in named:
                    state.weights[name] = t.clone()
                state.version_count += 1
                if version is not None:
                    state.weight_version = version

        def h_update_weights_from_tensor(self, body):
            import torch

            refused = self._refuse_update("update_weights_from_tensor")
            if refused:
                return refused
            unknown = set(body) - TENSOR_FIELDS
            if unknown or body.get("load_format") != "flattened_bucket":
                return 400, {"success": False, "message": f"bad request fields {sorted(unknown)} / load_format"}
            payloads = body["serialized_named_tensors"]
            if len(payloads) != args.tp or not all(isinstance(p, str) for p in payloads):
                return 400, {"success": False, "message": f"need {args.tp} base64 strings, one per TP rank"}
            try:
                per_rank = [decode_bucket(p, args.use_sglang) for p in payloads]
            except Exception as e:  # the real scheduler dies on this one (see the module docstring)
                if "digest" in str(e) or type(e).__name__ == "AuthenticationError":
                    print(f"scheduler died decoding a payload: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    os._exit(21)
                raise
            for other in per_rank[1:]:
                assert [n for n, _ in other] == [n for n, _ in per_rank[0]]
                assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other, per_rank[0]))
            self._store(per_rank[0], body.get("weight_version"))
            import hashlib

            self.log_event("update_weights_from_tensor", names=[n for n, _ in per_rank[0]],
                           decoder="sglang" if args.use_sglang else "erpd",
                           digests=[hashlib.sha1(p.encode()).hexdigest()[:12] for p in payloads])
            return 200, {"success": True, "message": "Success"}

        def h_init_weights_update_group(self, body):
            from erpd_megatron.rollout.sglang_wire import init_custom_process_group

            if set(body) != DIST_INIT_FIELDS:
                return 400, {"success": False, "message": f"fields {sorted(body)}"}
            assert args.tp == 1, "one TP rank per fake server"
            if body["group_name"] in state.groups:
                return 200, {"success": False, "message": "Failed to initialize custom process group: The specified "
                                                          "group name has already been created, please use a "
                                                          "different group name."}
            pg = init_custom_process_group(
                backend=body["backend"], init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                world_size=body["world_size"], rank=body["rank_offset"], group_name=body["group_name"])
            state.groups[body["group_name"]] = pg
            self.log_event("init_weights_update_group", rank=body["rank_offset"], world_size=body["world_size"])
            return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

        def h_destroy_weights_update_group(self, body):
            import torch.distributed as dist

            pg = state.groups.pop(body.get("group_name", "weight_update_group"), None)
            if pg is None:
                return 200, {"success": False, "message": "The group to be destroyed does not exist."}
            dist.destroy_process_group(pg)
            self.log_event("destroy_weights_update_group", group_name=body.get("group_name"))
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

        def h_get_weights_by_name(self, body):
            if args.model_type != "llama":
                return 400, {"error": {"message": "Get parameter by name failed"}}  # 0.5.23, Qwen3

            with state.lock:
                t = state.weights.get(body["name"])
            if t is None:
                return 200, None
            return 200, t.flatten()[: int(body.get("truncate_size", 100))].tolist()

        def h_update_weights_from_distributed(self, body):
            import torch
            import torch.distributed as dist

            unknown = set(body) - DIST_UPDATE_FIELDS
            if unknown:
                return 400, {"success": False, "message": f"unknown fields {sorted(unknown)}"}
            refused = self._refuse_update("update_weights_from_distributed")
            if refused:  # (a real server would still sit in the broadcast; the test then fails on the error)
                return refused
            pg = state.groups[body["group_name"]]
            named = []
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, src=0, group=pg)
                named.append((name, t))
            self._store(named, body.get("weight_version"))
            self.log_event("update_weights_from_distributed", names=body["names"])
            return 200, {"success": True, "message": "Succeeded to update parameter online."}

        def h_update_weights_from_disk(self, body):
            from pathlib import Path

            from safetensors.torch import load_file

            named = []
            for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
                named.extend(load_file(str(f)).items())
            self._store(named, body.get("weight_version"))
            self.log_event("update_weights_from_disk", model_path=body["model_path"])
            return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

        def h__dump_weights(self, body):
            import torch

            with state.lock:
                torch.save(dict(state.weights), body["path"])
            return 200, {"success": True}

    return Handler


SESSION_PATHS = ("/begin_weight_update", "/end_weight_update")


def decode_bucket(payload: str, use_sglang: bool):
    from erpd_megatron.rollout import sglang_wire

    obj = sglang_wire.deserialize(payload, use_sglang=use_sglang)
    if use_sglang:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        return FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"],
                                     metadata=obj["metadata"]).reconstruct_tensors()
    return sglang_wire.reconstruct_bucket(obj)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=50)
    ap.add_argument("--gen-delay", type=float, default=0.0)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--die-marker", default="")
    ap.add_argument("--use-sglang", action="store_true")
    ap.add_argument("--protocol", choices=["0.5.23", "legacy"], default="0.5.23")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--hf-config", default="", help="HF model directory (config.json) of the scoring model")
    ap.add_argument("--model-type", choices=["qwen3", "llama"], default="qwen3")
    ap.add_argument("--start-delay", type=float, default=0.0, help="seconds before listening (a slow model load)")
    args = ap.parse_args(argv)
    if args.use_sglang:
        from erpd_megatron.rollout.sglang_wire import _sglang_classes

        if _sglang_classes() is None:
            print("sglang not importable", file=sys.stderr)
            sys.exit(3)
    time.sleep(args.start_delay)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(State(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
