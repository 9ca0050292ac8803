"""SGLangEngine against tests/fake_sglang_server.py, a subprocess speaking SGLang 0.5.x's wire format.

No real SGLang server runs here (no GPU / sglang kernels on CI). What is real: the HTTP requests and
their field names, the base64 ForkingPickler payloads with flattened-bucket metadata (decoded by
sglang's own MultiprocessingSerializer / FlattenedTensorBucket when sglang is importable -- see
``test_payloads_decode_with_real_sglang``), the gloo broadcast group built like sglang's, process
restarts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erpd_megatron.rollout import sglang_wire
from erpd_megatron.rollout.engine import SamplingParams, derive_seed
from erpd_megatron.rollout.sglang_engine import (
    LaunchSpec,
    RetryableGeneration,
    SGLangEngine,
    SGLangError,
    http_json,
    parse_generate_response,
)

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang_server import fake_token  # noqa: E402

FAKE = str(Path(__file__).with_name("fake_sglang_server.py"))
REPO = str(Path(__file__).resolve().parents[1])
VOCAB = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base_port(n: int) -> int:
    """n consecutive free ports (best effort)."""
    for _ in range(50):
        base = free_port()
        try:
            socks = []
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no consecutive free ports")


def launch(tmp_path, *extra, tp=1, num_servers=1, env=None, **kw) -> SGLangEngine:
    spec = LaunchSpec(model_path="unused", tp=tp, num_servers=num_servers, base_port=free_base_port(num_servers),
                      command=(sys.executable, FAKE, "--port", "{port}", "--tp", str(tp), "--vocab", str(VOCAB),
                               *extra),
                      env={"PYTHONPATH": REPO, **(env or {})}, log_dir=str(tmp_path), startup_timeout=60)
    return SGLangEngine(launch=spec, request_timeout=60, control_timeout=60, health_timeout=5, **kw)


def events(url: str) -> dict:
    status, data = http_json(url, "GET", "/_events")
    assert status == 200
    return data


def expected(prompt, seed, max_new, stop_ids):
    ids, lps = [], []
    for k in range(max_new):
        t, lp = fake_token(prompt, seed, k, VOCAB)
        ids.append(t)
        lps.append(lp)
        if t in stop_ids:
            return ids, lps, "stop"
    return ids, lps, "length"


PROMPTS = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6], [9, 9]]


def check_samples(samples, sampling, prompts=PROMPTS):
    keys = [(s.prompt_index, s.sample_index) for s in samples]
    assert keys == [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]  # complete, no duplicate
    reasons = set()
    for s in samples:
        ids, lps, reason = expected(prompts[s.prompt_index], derive_seed(sampling.seed, s.prompt_index, s.sample_index),
                                    sampling.max_new_tokens, set(sampling.stop_token_ids))
        assert s.response_ids == ids
        assert s.logprobs == pytest.approx(lps, abs=0)
        assert s.finish_reason == reason
        reasons.add(reason)
    return reasons


def test_generate_parses_sglang_answers_and_spreads_over_servers(tmp_path):
    sampling = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, seed=5,
                              stop_token_ids=(11, 23, 37))
    with launch(tmp_path, num_servers=2, concurrency_per_server=2) as eng:
        samples = eng.generate(PROMPTS, sampling)
        assert check_samples(samples, sampling) == {"stop", "length"}  # both finish kinds occurred
        assert all(s.weight_version is None for s in samples)
        served = [sum(e["event"] == "generated" for e in events(s.url)["events"]) for s in eng.servers]
        assert sum(served) == len(samples) and min(served) > 0, served
        assert eng.health()


def test_server_killed_mid_generate_is_restarted_and_retried(tmp_path):
    marker = tmp_path / "died"
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=1)
    with launch(tmp_path, "--gen-delay", "0.3", "--die-after", "3", "--die-marker", str(marker),
                concurrency_per_server=4) as eng:
        pid0 = eng.servers[0].proc.pid
        samples = eng.generate(PROMPTS, sampling)
        assert marker.exists()  # it really died
        assert eng.servers[0].restarts == 1 and eng.servers[0].proc.pid != pid0
        check_samples(samples, sampling)  # all 8 samples, once each, right content
        ev = events(eng.servers[0].url)["events"]
        generated = [e["rid"] for e in ev if e["event"] == "generated"]
        # The restarted incarnation served the requests lost with the first one (and nothing twice).
        assert len(generated) == len(set(generated))
        assert len(generated) >= 3


def test_attached_server_dropped_when_dead(tmp_path):
    base = free_base_port(2)
    procs = [subprocess.Popen([sys.executable, FAKE, "--port", str(base + k), "--vocab", str(VOCAB),
                               "--gen-delay", "0.05"], env={**os.environ, "PYTHONPATH": REPO},
                              start_new_session=True) for k in range(2)]
    try:
        eng = SGLangEngine(urls=[f"http://127.0.0.1:{base + k}" for k in range(2)], tp=1, health_timeout=30,
                           request_timeout=30, concurrency_per_server=2)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        sampling = SamplingParams(n=2, max_new_tokens=5, seed=3)
        check_samples(eng.generate(PROMPTS, sampling), sampling)
        assert [s.alive for s in eng.servers] == [True, False]
        assert not eng.health()
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def shm_by_filename():
    """CPU tensors travel as shared-memory handles. The default "file_descriptor" strategy hands fds over
    multiprocessing's resource sharer, which authenticates with the sender's process-family key that an
    independently launched server does not share; "file_system" passes shm names (on GPU, sglang gets
    CUDA IPC handles instead and neither applies)."""
    import torch.multiprocessing as tmp

    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    yield
    tmp.set_sharing_strategy(old)


def _buckets():
    g = torch.Generator().manual_seed(0)
    return [
        [("model.embed_tokens.weight", torch.randn(10, 4, generator=g)),
         ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 4, generator=g).bfloat16())],
        [("model.norm.weight", torch.rand(4, generator=g) + 0.5),
         ("model.layers.0.mlp.up_proj.weight", torch.randn(6, 4, generator=g).to(torch.float16)),
         ("lm_head.weight", torch.randn(10, 4, generator=g))],
    ]


def _dumped(eng, tmp_path, k=0):
    path = tmp_path / f"dump{k}.pt"
    status, _ = http_json(eng.servers[k].url, "POST", "/_dump_weights", {"path": str(path)})
    assert status == 200
    return torch.load(path)


def _assert_received(got: dict, buckets):
    sent = {n: t for b in buckets for n, t in b}
    assert set(got) == set(sent)
    for n, t in sent.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n


@pytest.mark.parametrize("layout", ["typed", "bytes"])
def test_update_weights_from_tensor_flattened_bucket(tmp_path, layout, shm_by_filename):
    with launch(tmp_path, tp=2, bucket_layout=layout) as eng:
        eng.update_weights(iter(_buckets()), version=7)
        _assert_received(_dumped(eng, tmp_path), _buckets())
        data = events(eng.servers[0].url)
        assert data["weight_version"] == "7"
        names = [e["event"] for e in data["events"]]
        n_updates = names.count("update_weights_from_tensor")
        assert n_updates == (4 if layout == "typed" else 2)  # typed: one payload per dtype of each bucket (2 + 2)
        assert names[0] == "pause_generation" and names[-1] == "continue_generation"
        assert names[1] == "flush_cache" and names[-2] == "flush_cache"
        assert data["events"][0]["mode"] == "retract"
        sampling = SamplingParams(n=1, max_new_tokens=3, seed=0)
        assert {s.weight_version for s in eng.generate(PROMPTS[:2], sampling)} == {7}


def test_payloads_decode_with_real_sglang(tmp_path, shm_by_filename):
    """Decode with sglang's own MultiprocessingSerializer + FlattenedTensorBucket, when importable.

    sglang is not a CI dependency; to run this, make it importable in the server process, e.g.
    ``pip install --no-deps --target /tmp/sgl sglang==0.5.23`` plus its import-time deps
    (``pip install --target /tmp/sgl_deps orjson pybase64 requests starlette pillow msgspec zmq ipython``)
    and ``ERPD_SGLANG_PYTHONPATH=/tmp/sgl:/tmp/sgl_deps``.
    """
    extra = os.environ.get("ERPD_SGLANG_PYTHONPATH", "")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO, extra) if p)}
    cheap = subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                            "sys.exit(0 if importlib.util.find_spec('sglang') else 3)"], env={**os.environ, **env})
    if cheap.returncode != 0:
        pytest.skip("sglang is not installed (set ERPD_SGLANG_PYTHONPATH to a --no-deps sglang install)")
    probe = subprocess.run([sys.executable, "-c", "from erpd_megatron.rollout.sglang_wire import _sglang_classes;"
                            "import sys; sys.exit(0 if _sglang_classes() else 3)"],
                           env={**os.environ, **env})
    if probe.returncode != 0:
        pytest.skip("sglang is installed but not importable (its import-time deps are missing)")
    for layout in ("typed", "bytes"):
        with launch(tmp_path, "--use-sglang", tp=2, env=env, bucket_layout=layout) as eng:
            # Serialize with our pure-Python pickler (the path used when the trainer lacks sglang).
            eng.update_weights(iter(_buckets()), version="v1")
            _assert_received(_dumped(eng, tmp_path), _buckets())
            assert {e.get("decoder") for e in events(eng.servers[0].url)["events"]} >= {"sglang"}


def test_update_weights_from_distributed_two_servers(tmp_path):
    with launch(tmp_path, num_servers=2, weight_transport="distributed", dist_backend="gloo",
                dist_master_port=free_port()) as eng:
        eng.update_weights(iter(_buckets()), version=3)
        eng.update_weights(iter(_buckets()[:1]), version=4)  # the group is reused
        for k, s in enumerate(eng.servers):
            _assert_received(_dumped(eng, tmp_path, k), _buckets())
            data = events(s.url)
            inits = [e for e in data["events"] if e["event"] == "init_weights_update_group"]
            assert [(e["rank"], e["world_size"]) for e in inits] == [(1 + k, 3)]
            assert data["weight_version"] == "4"


def test_update_weights_from_disk(tmp_path):
    template = tmp_path / "hf"
    template.mkdir()
    (template / "config.json").write_text('{"model_type": "qwen3"}')
    with launch(tmp_path, weight_transport="disk", disk_dir=str(tmp_path / "ckpts"),
                disk_template_dir=str(template)) as eng:
        eng.update_weights(iter(_buckets()), version=2)
        _assert_received(_dumped(eng, tmp_path), _buckets())
        assert (tmp_path / "ckpts" / "v2" / "config.json").exists()
        assert events(eng.servers[0].url)["weight_version"] == "2"


def test_memory_release_resume_requests(tmp_path):
    with launch(tmp_path) as eng:
        eng.release_memory()
        eng.resume_memory(tags=["weights"])
        ev = [e for e in events(eng.servers[0].url)["events"]]
        assert ev == [{"event": "release_memory_occupation", "tags": None},
                      {"event": "resume_memory_occupation", "tags": ["weights"]}]


def test_parse_generate_response_edge_cases():
    ok = {"output_ids": [5, 6], "meta_info": {"finish_reason": {"type": "stop", "matched": 6},
                                              "output_token_logprobs": [[-0.5, 5, None], [-1.25, 6, "x"]]}}
    ids, lps, reason, _ = parse_generate_response(ok)
    assert (ids, lps, reason) == ([5, 6], [-0.5, -1.25], "stop")
    with pytest.raises(RetryableGeneration):
        parse_generate_response({"meta_info": {"finish_reason": {"type": "abort", "message": "x"},
                                               "output_token_logprobs": []}})
    with pytest.raises(SGLangError, match="disagree"):
        parse_generate_response({**ok, "output_ids": [5, 7]})
    with pytest.raises(SGLangError, match="output_token_logprobs"):
        parse_generate_response({"meta_info": {"finish_reason": {"type": "length", "length": 2}}})


def test_wire_payload_roundtrip_and_allowlist():
    bucket = _buckets()[0] + _buckets()[1]
    for layout in ("typed", "bytes"):
        got = {}
        for p in sglang_wire.flatten_bucket(bucket, layout):
            text = sglang_wire.serialize(p, use_sglang=False)
            assert b"sglang.srt.weight_sync.tensor_bucket" in __import__("base64").b64decode(text)
            got.update(sglang_wire.reconstruct_bucket(sglang_wire.deserialize(text, use_sglang=False)))
        _assert_received(got, [bucket])
    import base64
    import pickle

    evil = base64.b64encode(pickle.dumps(os.system)).decode()
    with pytest.raises(pickle.UnpicklingError):
        sglang_wire.deserialize(evil, use_sglang=False)
