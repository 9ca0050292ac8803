"""SGLangEngine against tests/fake_sglang_server.py, a subprocess speaking SGLang 0.5.x's wire format.

The fast half: the real server runs in tests/test_sglang_real.py (minutes per start on a loaded machine),
and what it taught is mirrored by the in-test server. What is real here: the HTTP requests and their
field names, the base64 ForkingPickler payloads with flattened-bucket metadata (decoded by sglang's own
MultiprocessingSerializer / FlattenedTensorBucket from the CPU SGLang environment --
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
    RolloutError,
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


def launch(tmp_path, *extra, tp=1, num_servers=1, env=None, python=sys.executable, **kw) -> SGLangEngine:
    spec = LaunchSpec(model_path="unused", tp=tp, num_servers=num_servers, base_port=free_base_port(num_servers),
                      command=(python, FAKE, "--port", "{port}", "--tp", str(tp), "--vocab", str(VOCAB), *extra),
                      env={"PYTHONPATH": REPO, **(env or {})}, log_dir=str(tmp_path), startup_timeout=60)
    return SGLangEngine(launch=spec, request_timeout=60, control_timeout=60, health_timeout=5, **kw)


def events(url: str, api_key: str | None = None) -> dict:
    status, data = http_json(url, "GET", "/_events", api_key=api_key)
    assert status == 200
    data["events"] = [e for e in data["events"] if e["event"] != "server_info"]
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
    # each request takes 0.2 s, so one server's 2 workers cannot drain the queue before the other's start
    with launch(tmp_path, "--gen-delay", "0.2", num_servers=2, concurrency_per_server=2) as eng:
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
    """Start each test under torch's default "file_descriptor" strategy: ``sglang_wire.serialize`` must switch
    to "file_system" by itself for CPU tensors (under the default one the server cannot open the handles:
    ``test_cpu_payloads_are_shared_by_name``)."""
    import torch.multiprocessing as tmp

    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_descriptor")
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


@pytest.mark.parametrize("layout,protocol", [("typed", "0.5.23"), ("bytes", "0.5.23"), ("typed", "legacy")])
def test_update_weights_from_tensor_flattened_bucket(tmp_path, layout, protocol, shm_by_filename):
    """0.5.23: the buckets go inside /begin_weight_update ... /end_weight_update (the fake refuses them
    outside, as the server does); a legacy server (404 on begin) gets the same update without a session."""
    with launch(tmp_path, "--protocol", protocol, tp=2, bucket_layout=layout) as eng:
        eng.update_weights(iter(_buckets()), version=7)
        eng.update_weights(iter(_buckets()), version=8)  # a second session opens after the first closed
        _assert_received(_dumped(eng, tmp_path), _buckets())
        data = events(eng.servers[0].url)
        assert data["weight_version"] == "8"
        names = [e["event"] for e in data["events"]]
        first = names[:names.index("continue_generation") + 1]
        n_updates = first.count("update_weights_from_tensor")
        assert n_updates == (4 if layout == "typed" else 2)  # typed: one payload per dtype of each bucket (2 + 2)
        session = ["begin_weight_update"] if protocol == "0.5.23" else []
        assert first == (["pause_generation", "flush_cache"] + session + ["update_weights_from_tensor"] * n_updates
                         + [e.replace("begin", "end") for e in session] + ["flush_cache", "continue_generation"])
        assert data["events"][0]["mode"] == "retract"
        assert eng.servers[0].session is (protocol == "0.5.23")
        sampling = SamplingParams(n=1, max_new_tokens=3, seed=0)
        assert {s.weight_version for s in eng.generate(PROMPTS[:2], sampling)} == {8}


def test_payloads_decode_with_real_sglang(tmp_path, shm_by_filename):
    """The in-test server run by the CPU SGLang environment's interpreter (`make sglang-env`), decoding with
    sglang 0.5.23's own MultiprocessingSerializer + FlattenedTensorBucket (its torch is 2.14.1, ours the
    trainer's)."""
    from sglang_env import require_sglang

    python = require_sglang()
    for layout in ("typed", "bytes"):
        with launch(tmp_path, "--use-sglang", tp=2, python=python, bucket_layout=layout) as eng:
            # Serialize with our pure-Python pickler (the path used when the trainer lacks sglang).
            eng.update_weights(iter(_buckets()), version="v1")
            _assert_received(_dumped(eng, tmp_path), _buckets())
            assert {e.get("decoder") for e in events(eng.servers[0].url)["events"]} >= {"sglang"}


@pytest.mark.parametrize("protocol", ["0.5.23", "legacy"])
def test_update_weights_from_distributed_two_servers(tmp_path, protocol):
    with launch(tmp_path, "--protocol", protocol, num_servers=2, weight_transport="distributed", dist_backend="gloo",
                dist_master_port=free_port()) as eng:
        eng.update_weights(iter(_buckets()), version=3)
        eng.update_weights(iter(_buckets()[:1]), version=4)  # the group is reused
        for k, s in enumerate(eng.servers):
            _assert_received(_dumped(eng, tmp_path, k), _buckets())
            data = events(s.url)
            inits = [e for e in data["events"] if e["event"] == "init_weights_update_group"]
            assert [(e["rank"], e["world_size"]) for e in inits] == [(1 + k, 3)]
            assert data["weight_version"] == "4"
            names = [e["event"] for e in data["events"]]
            assert names.count("begin_weight_update") == names.count("end_weight_update") == \
                (2 if protocol == "0.5.23" else 0)


def test_fake_server_enforces_the_update_session(tmp_path, shm_by_filename):
    """What makes the session tests meaningful: a 0.5.23 server refuses a tensor update outside a
    session; the low-level path works once begin_update / end_update wrap it."""
    payload = sglang_wire.serialize(sglang_wire.flatten_bucket(_buckets()[0])[0])
    with launch(tmp_path) as eng:
        with pytest.raises(SGLangError, match=r"must run between begin_weight_update\(\) and end_weight_update\(\)"):
            eng.update_weights_from_serialized([payload], version=1)
        eng.begin_update()
        eng.update_weights_from_serialized([payload], version=1)
        eng.end_update(version=1)
        with pytest.raises(SGLangError, match="no weight-update session is open"):
            eng._control(eng.servers[0], "/end_weight_update", {})
        assert eng.weight_version == 1


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


def test_colocated_offload_releases_after_generate_and_resumes_before_use(tmp_path, shm_by_filename):
    """offload_tags: memory goes back to the trainer after each generate; weights are resumed before a
    push, the rest before the next generate (the fake refuses generation / updates into released memory)."""
    sampling = SamplingParams(n=1, max_new_tokens=3, seed=0)
    with launch(tmp_path, offload_tags=("weights", "kv_cache", "cuda_graph")) as eng:
        eng.generate(PROMPTS[:1], sampling)
        with pytest.raises(RolloutError, match="released"):  # released weights hold garbage until a push
            eng.generate(PROMPTS[:1], sampling)
        eng.update_weights(iter(_buckets()), version=1)
        check_samples(eng.generate(PROMPTS, sampling), sampling)
        ev = [(e["event"], e.get("tags")) for e in events(eng.servers[0].url)["events"]
              if "memory" in e["event"] or e["event"] in ("begin_weight_update", "generated")]
        rel = ("release_memory_occupation", ["weights", "kv_cache", "cuda_graph"])
        assert ev[:2] == [("generated", None), rel]
        assert ev[2:5] == [("resume_memory_occupation", ["weights"]), ("begin_weight_update", None),
                           ("resume_memory_occupation", ["kv_cache", "cuda_graph"])]
        assert ev[-1] == rel and ev.count(rel) == 2


def test_api_key_is_sent_and_required(tmp_path, shm_by_filename):
    key = "s3cret-key"
    spec = LaunchSpec(model_path="unused", base_port=free_port(), api_key=key,
                      command=(sys.executable, FAKE, "--port", "{port}", "--vocab", str(VOCAB), "--api-key", key),
                      env={"PYTHONPATH": REPO}, log_dir=str(tmp_path), startup_timeout=60)
    with SGLangEngine(launch=spec, control_timeout=60, health_timeout=5) as eng:
        url = eng.servers[0].url
        assert http_json(url, "GET", "/server_info")[0] == 401  # without the key
        assert http_json(url, "GET", "/server_info", api_key="wrong")[0] == 401
        sampling = SamplingParams(n=1, max_new_tokens=3, seed=0)
        check_samples(eng.generate(PROMPTS, sampling), sampling)
        eng.update_weights(iter(_buckets()), version=2)
        assert events(url, api_key=key)["weight_version"] == "2"
        log = (tmp_path / "sglang_server0.log").read_text()  # in the given (run) directory, key redacted
        assert "--api-key ***" in log and key not in log
    # a server that wants a key refuses a client without one (control calls fail, not silently succeed)
    with pytest.raises(SGLangError, match="401"):
        SGLangEngine(launch=LaunchSpec(**{**spec.__dict__, "api_key": None, "base_port": free_port()}),
                     control_timeout=60, health_timeout=5)


def test_launch_needs_a_log_dir():
    with pytest.raises(ValueError, match="log_dir"):  # no fixed /tmp path any more
        SGLangEngine(launch=LaunchSpec(model_path="/m"))


def test_refuses_servers_with_dp_above_one(tmp_path):
    with pytest.raises(SGLangError, match="dp_size=2"):
        launch(tmp_path, "--dp-size", "2")


def test_launch_command_line_and_host_rules(tmp_path):
    spec = LaunchSpec(model_path="/m", tp=4, num_servers=2, base_port=31000, base_gpu_id=0, mem_fraction_static=0.6,
                      enable_memory_saver=True, deterministic_inference=True, python="/opt/sgl/bin/python",
                      extra_args=("--context-length", "4096"), log_dir=str(tmp_path), device="cuda")
    assert spec.argv(1) == ["/opt/sgl/bin/python", "-m", "sglang.launch_server", "--model-path", "/m",
                            "--tp-size", "4", "--host", "127.0.0.1", "--port", "31001", "--base-gpu-id", "4",
                            "--mem-fraction-static", "0.6", "--enable-memory-saver",
                            "--enable-deterministic-inference", "--context-length", "4096"]
    with pytest.raises(ValueError, match="api_key"):
        LaunchSpec(model_path="/m", host="0.0.0.0")
    remote = LaunchSpec(model_path="/m", host="0.0.0.0", api_key="k", device="cuda")
    assert remote.argv(0)[-2:] == ["--api-key", "k"] and remote.url(0) == "http://127.0.0.1:30000"
    from erpd_megatron.rollout.sglang_launch import redact

    assert "k" not in redact(remote.argv(0), "k").split()


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


def test_cuda_tensors_travel_by_device_uuid(monkeypatch):
    """Without sglang: a CUDA tensor's reduction carries the device UUID and names sglang's UUID-aware
    rebuild function (as monkey_patch_torch_reductions makes torch do), never the raw device index.
    torch's reducer is stubbed to what it returns for a CUDA tensor (no GPU here)."""
    import pickletools

    from torch.multiprocessing import reductions

    def fake_reduce(t):  # rebuild_cuda_tensor's 15 arguments, storage_device (index 6) = 3
        return reductions.rebuild_cuda_tensor, (type(t), t.shape, t.stride(), 0, None, t.dtype, 3, b"h", 8, 0,
                                                False, b"r", 0, b"e", True)

    monkeypatch.setattr(reductions, "reduce_tensor", fake_reduce)
    monkeypatch.setattr(sglang_wire, "_device_uuid", lambda i: f"GPU-uuid-of-{i}")
    raw = __import__("base64").b64decode(sglang_wire.serialize({"t": torch.zeros(2)}, use_sglang=False))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    strings = [a for name, a in ops if "UNICODE" in name]
    assert "GPU-uuid-of-3" in strings
    i = strings.index("_rebuild_cuda_tensor_modified")
    assert strings[i - 1] == "sglang.srt.utils.patch_torch"
    assert "rebuild_cuda_tensor" not in strings  # torch's index-based rebuild is not referenced


def test_sglang_serializer_is_patched_first(monkeypatch):
    """With sglang importable, serialize / deserialize call monkey_patch_torch_reductions() before
    sglang's MultiprocessingSerializer (which does not patch by itself). sglang is stubbed here."""
    import types

    calls = []
    mods = {name: types.ModuleType(name) for name in
            ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.utils.patch_torch", "sglang.srt.weight_sync",
             "sglang.srt.weight_sync.tensor_bucket")}
    mods["sglang.srt.utils.patch_torch"].monkey_patch_torch_reductions = lambda: calls.append("patch")
    mods["sglang.srt.utils"].MultiprocessingSerializer = types.SimpleNamespace(
        serialize=lambda obj, output_str: calls.append("serialize") or "x",
        deserialize=lambda data: calls.append("deserialize") or {})
    mods["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorMetadata = sglang_wire.FlattenedTensorMetadata
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    sglang_wire.serialize({"flattened_tensor": torch.zeros(1), "metadata": []})
    sglang_wire.deserialize("x")
    assert calls == ["patch", "serialize", "patch", "deserialize"]


def test_rollout_config_reaches_the_launch_command(tmp_path, monkeypatch):
    from erpd_megatron.config import RolloutConfig
    from erpd_megatron.rollout.sglang_engine import launch_spec

    monkeypatch.delenv("ERPD_SGLANG_API_KEY", raising=False)
    cfg = RolloutConfig(engine="sglang", sglang_tp=2, sglang_num_servers=2, sglang_base_gpu_id=4, sglang_port=31000,
                        sglang_mem_fraction_static=0.45, sglang_offload=True, sglang_deterministic=True,
                        sglang_python="/envs/sglang/bin/python", sglang_extra_args=["--chunked-prefill-size", "4096"],
                        sglang_device="cuda", sglang_startup_timeout=7200)
    spec = launch_spec(cfg, "/models/m", log_dir=str(tmp_path / "logs"))
    assert spec.argv(1) == ["/envs/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "/models/m",
                            "--tp-size", "2", "--host", "127.0.0.1", "--port", "31001", "--base-gpu-id", "6",
                            "--mem-fraction-static", "0.45", "--enable-memory-saver",
                            "--enable-deterministic-inference", "--chunked-prefill-size", "4096"]
    assert spec.log_dir == str(tmp_path / "logs") and spec.startup_timeout == 7200
    default = launch_spec(RolloutConfig(sglang_device="cuda"), "/m", log_dir=str(tmp_path))
    assert "--mem-fraction-static" not in default.argv(0) and "--api-key" not in default.argv(0)
    with pytest.raises(ValueError, match="api_key"):  # cross-node serving needs a key
        launch_spec(RolloutConfig(sglang_host="0.0.0.0"), "/m", log_dir=str(tmp_path))
    monkeypatch.setenv("ERPD_SGLANG_API_KEY", "k1")
    assert launch_spec(RolloutConfig(sglang_host="0.0.0.0"), "/m", log_dir=str(tmp_path)).argv(0)[-2:] == \
        ["--api-key", "k1"]
    # no CUDA here: "auto" picks sglang's CPU path (what tests/test_sglang_real.py runs)
    auto = launch_spec(RolloutConfig(sglang_offload=True, sglang_deterministic=True), "/m", log_dir=str(tmp_path))
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_distributed_master_address_is_our_route_to_the_servers():
    from erpd_megatron.rollout.sglang_engine import route_address

    assert route_address("http://127.0.0.1:30000") == "127.0.0.1"
    import socket

    me = socket.gethostbyname(socket.gethostname())
    if not me.startswith("127."):  # a host with a non-loopback address: the route to it is itself
        assert route_address(f"http://{me}:30000") == me


_UUID_PROBE = """
import base64, io, torch
from torch.multiprocessing import reductions
from erpd_megatron.rollout import sglang_wire
from sglang.srt.utils.common import SafeUnpickler
reductions.reduce_tensor = lambda t: (reductions.rebuild_cuda_tensor, (type(t), t.shape, t.stride(), 0, None,
                                      t.dtype, 3, b"h", 8, 0, False, b"r", 0, b"e", True))
sglang_wire._device_uuid = lambda i: f"GPU-{i}"
raw = base64.b64decode(sglang_wire.serialize(sglang_wire.flatten_bucket([("w", torch.zeros(2))])[0],
                                             use_sglang=False))
class Probe(SafeUnpickler):
    def find_class(self, m, n):
        obj = super().find_class(m, n)  # raises for a global sglang does not admit
        return (lambda *a: ("rebuilt", a[6])) if n == "_rebuild_cuda_tensor_modified" else obj
assert Probe(io.BytesIO(raw)).load()["flattened_tensor"] == ("rebuilt", "GPU-3")
"""


def test_uuid_payload_passes_real_sglang_safe_unpickler():
    """sglang 0.5.23's own SafeUnpickler admits every global of a CUDA-by-UUID payload from our pure
    pickler and hands the UUID to its rebuild function (the CUDA rebuild itself is stubbed: no GPU)."""
    from sglang_env import require_sglang

    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.run([require_sglang(), "-c", _UUID_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


# ---------------------------------------------------------------------- what the real server taught
def test_cpu_payloads_are_shared_by_name(tmp_path, shm_by_filename):
    """A CPU payload pickled under torch's default "file_descriptor" strategy kills a real 0.5.23 scheduler
    ("digest sent was rejected"; the in-test server dies the same way). ``serialize`` switches to
    "file_system" itself, and the torch_shm_manager that strategy starts does not hold our stdout / stderr
    (a piped CI command would wait for it after we exit)."""
    import base64
    import io

    import torch.multiprocessing as tmp

    payload = sglang_wire.flatten_bucket(_buckets()[0])[0]
    assert tmp.get_sharing_strategy() == "file_descriptor"
    buf = io.BytesIO()
    sglang_wire._SGLangCompatPickler(buf).dump(payload)  # the bytes a sender without the switch produces
    by_fd = base64.b64encode(buf.getvalue()).decode()
    with launch(tmp_path, max_restarts=0) as eng:
        eng.begin_update()
        with pytest.raises(SGLangError):
            eng.update_weights_from_serialized([by_fd], version=1)
        assert eng.servers[0].proc.wait(timeout=30) == 21  # died like the real scheduler
    with launch(tmp_path) as eng:  # the product's path: switched by serialize
        eng.update_weights(iter(_buckets()), version=2)
        assert tmp.get_sharing_strategy() == "file_system"
        _assert_received(_dumped(eng, tmp_path), _buckets())
    code = ("import os, subprocess, torch\n"
            "from erpd_megatron.rollout import sglang_wire\n"
            "sglang_wire.serialize({'flattened_tensor': torch.zeros(3), 'metadata': []}, use_sglang=False)\n"
            "pids = subprocess.run(['pgrep', '-P', str(os.getpid())], capture_output=True, text=True).stdout.split()\n"
            "fds = [os.readlink(f'/proc/{p}/fd/{k}') for p in pids for k in (0, 2)]\n"
            "assert pids and all(f == '/dev/null' for f in fds), fds\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_fake_server_mirrors_seed_and_weights_by_name(tmp_path):
    with launch(tmp_path) as eng:
        url = eng.servers[0].url
        status, data = http_json(url, "POST", "/generate", {"input_ids": [1, 2], "return_logprob": True,
                                                             "sampling_params": {"max_new_tokens": 2, "seed": 1}})
        assert status == 400 and "seed" in str(data)
        assert http_json(url, "POST", "/get_weights_by_name", {"name": "lm_head.weight"})[0] != 200  # Qwen3


# ---------------------------------------------------------------------- GPU-path review (issue 21), CPU halves
def test_distributed_transport_survives_a_server_restart(tmp_path):
    """A server restarted mid-generate left the update group: the next update destroys the old group on the
    survivor (/destroy_weights_update_group) and here, then builds a new one under the same name (torch
    refuses a name that still exists, on both sides)."""
    marker = tmp_path / "died"
    with launch(tmp_path, "--gen-delay", "0.2", "--die-after", "2", "--die-marker", str(marker), num_servers=2,
                weight_transport="distributed", dist_backend="gloo", dist_master_port=free_port(),
                concurrency_per_server=2) as eng:
        eng.update_weights(iter(_buckets()), version=1)
        sampling = SamplingParams(n=2, max_new_tokens=3, seed=0)
        check_samples(eng.generate(PROMPTS, sampling), sampling)
        assert marker.exists() and sum(s.restarts for s in eng.servers) == 1
        eng.update_weights(iter(_buckets()[1:]), version=2)
        for k, s in enumerate(eng.servers):
            _assert_received(_dumped(eng, tmp_path, k), _buckets()[1:] if s.restarts else _buckets())
            names = [e["event"] for e in events(s.url)["events"]]
            groups = [n for n in names if "weights_update_group" in n]
            assert groups == (["init_weights_update_group"] if s.restarts else
                              ["init_weights_update_group", "destroy_weights_update_group",
                               "init_weights_update_group"]), (k, groups)
            assert events(s.url)["weight_version"] == "2"


def test_attached_servers_get_a_long_readiness_wait(tmp_path):
    """A server attached by URL that is still loading (a batch script started it moments ago) is waited for
    up to ``attach_timeout``, not one health timeout."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, FAKE, "--port", str(port), "--start-delay", "6"],
                            env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True)
    try:
        with pytest.raises(SGLangError, match="not healthy after 2s"):
            SGLangEngine(urls=[f"http://127.0.0.1:{port}"], health_timeout=1, attach_timeout=2)
        eng = SGLangEngine(urls=[f"http://127.0.0.1:{port}"], health_timeout=1, attach_timeout=120)
        assert eng.health() and eng.servers[0].tp == 1
    finally:
        proc.kill()
        proc.wait()
    from erpd_megatron.config import RolloutConfig

    assert RolloutConfig().sglang_startup_timeout >= 1800


def test_server_environment_drops_trainer_variables(tmp_path, monkeypatch):
    """torchrun's rank / rendezvous variables and Megatron's CUDA_DEVICE_MAX_CONNECTIONS stay with the trainer."""
    from erpd_megatron.rollout.sglang_launch import TRAINER_ONLY_VARS

    for k, v in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                 "CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCHELASTIC_RUN_ID": "x", "ERPD_KEEP_ME": "yes"}.items():
        monkeypatch.setenv(k, v)
    with launch(tmp_path, env={"EXTRA": "1"}) as eng:
        status, env = http_json(eng.servers[0].url, "GET", "/_env")
        assert status == 200
    assert not set(TRAINER_ONLY_VARS) & set(env), sorted(set(TRAINER_ONLY_VARS) & set(env))
    assert env["ERPD_KEEP_ME"] == "yes" and env["EXTRA"] == "1"


def test_cpu_launch_flags():
    """No CUDA: sglang's CPU path (what the real-server tests run); the memory saver (libcuda) and deterministic
    inference (refused with torch_native attention) are left out there."""
    from erpd_megatron.rollout.sglang_launch import CPU_FLAGS

    spec = LaunchSpec(model_path="/m", device="cpu", enable_memory_saver=True, deterministic_inference=True,
                      cpu_max_total_tokens=2048)
    argv = spec.argv(0)
    assert " ".join(CPU_FLAGS) in " ".join(argv) and argv[argv.index("--max-total-tokens") + 1] == "2048"
    assert "--mem-fraction-static" in argv and argv[argv.index("--dtype") + 1] == "float32"
    assert "--enable-memory-saver" not in argv and "--enable-deterministic-inference" not in argv
    assert spec.child_env({"PATH": "/bin"}) == {"PATH": "/bin", "SGLANG_USE_CPU_ENGINE": "1"}
    assert "SGLANG_USE_CPU_ENGINE" not in LaunchSpec(model_path="/m", device="cuda").child_env({})
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the guard's tolerance follows the dtype the engine fixed
        eng = SGLangEngine.__new__(SGLangEngine)
        eng.launch = LaunchSpec(model_path="/m", device="cpu", log_dir=d)
        assert eng.dtype == torch.float32
        eng.launch = LaunchSpec(model_path="/m", device="cpu", log_dir=d, extra_args=("--dtype", "bfloat16"))
        assert eng.dtype == torch.bfloat16
        eng.launch = LaunchSpec(model_path="/m", device="cuda", log_dir=d)
        assert eng.dtype is None
    with pytest.raises(ValueError, match="device"):
        LaunchSpec(model_path="/m", device="tpu")


def test_nccl_version_check():
    from erpd_megatron.rollout.sglang_weights import check_nccl_versions

    check_nccl_versions("2.27.5", {"http://a:1": "2.27.5", "http://b:1": None})  # equal / unknown: fine
    with pytest.raises(SGLangError, match=r"trainer 2\.27\.5.*2\.30\.7.*sglang_allow_nccl_mismatch"):
        check_nccl_versions("2.27.5", {"http://a:1": "2.30.7"})
    check_nccl_versions("2.27.5", {"http://a:1": "2.30.7"}, allow=True)  # overridden: a warning only
    assert sglang_wire.nccl_version() is None or sglang_wire.nccl_version().count(".") == 2


def test_leftover_server_of_a_killed_trainer_is_stopped(tmp_path):
    """A SIGKILLed trainer leaves its server running (own session); the next start from the same run
    directory kills it by the pid file (only if the command line is the one recorded)."""
    from erpd_megatron.rollout.sglang_launch import start_server, stop_leftover

    port = free_port()
    argv = [sys.executable, FAKE, "--port", str(port)]
    log = str(tmp_path / "sglang_server0.log")
    env = {**os.environ, "PYTHONPATH": REPO}
    orphan = start_server(argv, log, env, "start")
    import time

    for _ in range(600):  # listening: the child has exec'd (before, /proc/<pid>/cmdline is still the parent's)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    assert stop_leftover(log) and orphan.wait(timeout=30) == -signal.SIGKILL
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (tmp_path / "sglang_server0.log.pid").write_text(f"{other.pid} 0123\n")  # pid reused by someone else
        assert not stop_leftover(log) and other.poll() is None
    finally:
        other.kill()
        other.wait()
