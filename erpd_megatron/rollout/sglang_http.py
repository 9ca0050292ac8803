"""HTTP client side of SGLang's native API: one call, one retry helper, request / response shapes.

Stdlib only (``http.client``). Pure functions; no engine state. Written against sglang 0.5.23's
``srt/entrypoints/http_server.py`` and ``srt/managers/io_struct.py``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from erpd_megatron.rollout.engine import SamplingParams


class SGLangError(RuntimeError):
    """A server answered, but with an error (HTTP >= 400 or ``success: false``)."""


class ServerUnreachable(SGLangError):
    """Connection refused / reset / timed out: the server may be dead or hung."""


class RetryableGeneration(SGLangError):
    """The server aborted a generation (paused in abort mode, restarting, overloaded)."""


class NotFound(SGLangError):
    """HTTP 404: the server has no such endpoint (an older sglang)."""


def http_json(url: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0,
              api_key: str | None = None):
    """One HTTP call; returns (status, parsed JSON or text). Network failures -> ``ServerUnreachable``.
    ``api_key``: sent as ``Authorization: Bearer <key>``, what sglang's ``--api-key`` middleware checks."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as e:  # refused, reset, socket timeout, bad status line
        raise ServerUnreachable(f"{method} {url}{path}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(errors="replace")
    except ValueError:
        data = raw.decode(errors="replace")
    return resp.status, data


def control(url: str, path: str, body: dict | None = None, *, method: str = "POST", timeout: float = 600.0,
            api_key: str | None = None):
    """A control call that must succeed: HTTP 200 and no ``success: false``. 404 -> ``NotFound``."""
    status, data = http_json(url, method, path, body, timeout=timeout, api_key=api_key)
    if status == 404:
        raise NotFound(f"{url}{path}: HTTP 404: {data}")
    if status != 200 or (isinstance(data, dict) and data.get("success") is False):
        raise SGLangError(f"{url}{path}: HTTP {status}: {data}")
    return data


def retry(fn: Callable[[], object], *, retry_on: tuple[type[BaseException], ...] = (ServerUnreachable,),
          attempts: int | None = None, timeout: float | None = None, delay: float = 0.05,
          max_delay: float = 2.0, what: str = "call"):
    """``fn()`` until it returns without raising one of ``retry_on``; exponential back-off from
    ``delay`` up to ``max_delay``. Gives up after ``attempts`` calls or ``timeout`` seconds (whichever
    comes first) by raising ``SGLangError`` chained to the last error. Other exceptions pass through."""
    if attempts is None and timeout is None:
        raise ValueError("retry needs attempts= or timeout=")
    deadline = None if timeout is None else time.monotonic() + timeout
    k = 0
    while True:
        try:
            return fn()
        except retry_on as e:
            k += 1
            wait = min(delay * 2 ** (k - 1), max_delay)
            if (attempts is not None and k >= attempts) or (deadline is not None and time.monotonic() + wait > deadline):
                raise SGLangError(f"{what}: gave up after {k} tries: {e}") from e
            time.sleep(wait)


def run_each(items: Sequence, fn: Callable[[object], object], *, meanwhile: Callable[[], object] | None = None) -> list:
    """``fn(item)`` for every item concurrently (one thread each); results in order; re-raises the
    first error after every thread finished. ``meanwhile()`` runs in the calling thread while the
    others run (collectives stay on the caller's thread, whose CUDA device is set)."""
    out: list = [None] * len(items)
    errs: list[BaseException] = []

    def run(k, item):
        try:
            out[k] = fn(item)
        except BaseException as e:  # re-raised in the caller
            errs.append(e)

    threads = [threading.Thread(target=run, args=(k, it), daemon=True) for k, it in enumerate(items)]
    for t in threads:
        t.start()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        for t in threads:
            t.join()
    if errs:
        raise errs[0]
    return out


# ---------------------------------------------------------------------- request / response shapes
def sglang_sampling_params(sampling: SamplingParams, seed: int | None) -> dict:
    """``sampling_params`` of one ``/generate`` request (field names of sglang's ``SamplingParams``).
    ``sampling_seed`` is sent when given; sglang only honours it with ``--enable-deterministic-inference``
    (otherwise sampling uses the server's own generator and the seed has no effect)."""
    p = {"n": 1, "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
         "max_new_tokens": int(sampling.max_new_tokens)}
    if sampling.top_k > 0:
        p["top_k"] = int(sampling.top_k)
    if sampling.stop:
        p["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        p["stop_token_ids"] = list(sampling.stop_token_ids)
    if seed is not None:
        p["sampling_seed"] = int(seed)
    return p


def parse_generate_response(data, where: str = "") -> tuple[list[int], list[float], str, dict]:
    """(response ids, behaviour log-probs, "stop" | "length", meta_info) of a non-streamed /generate
    answer. Raises ``RetryableGeneration`` for an aborted request, ``SGLangError`` for a malformed one."""
    if isinstance(data, list):  # a batch answer for a single request
        if len(data) != 1:
            raise SGLangError(f"{where}: expected one generation, got {len(data)}")
        data = data[0]
    if not isinstance(data, dict) or "meta_info" not in data:
        raise SGLangError(f"{where}: /generate answer without meta_info: {str(data)[:300]}")
    meta = data["meta_info"]
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind == "abort":
        raise RetryableGeneration(f"{where}: generation aborted: {fr}")
    if kind not in ("stop", "length"):
        raise SGLangError(f"{where}: unexpected finish_reason {fr!r}")
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise SGLangError(f"{where}: meta_info has no output_token_logprobs (was return_logprob sent?)")
    ids, lps = [], []
    for k, tr in enumerate(triples):
        lp, tok = tr[0], tr[1]
        if lp is None:
            raise SGLangError(f"{where}: output token {k} has no logprob")
        ids.append(int(tok))
        lps.append(float(lp))
    out_ids = data.get("output_ids")
    if out_ids is not None and list(out_ids) != ids:
        raise SGLangError(f"{where}: output_ids and output_token_logprobs disagree")
    return ids, lps, kind, meta
