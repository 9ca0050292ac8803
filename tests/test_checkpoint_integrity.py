"""Checkpoint integrity (megatron/checkpoint.py, utils/digest.py): content checksums verified before loading,
resume falls back to the newest intact checkpoint, RNG state without pickle, umask file modes, a full disk
during a save, keep_last pruning. One spawned world of 1 with a tiny model (a few seconds of compute)."""

import errno
import json
import logging
import os
import shutil

import pytest
import torch
from dist_utils import response_loss as _loss
from dist_utils import run_distributed
from dist_utils import toy_batch as _batch

CFG = dict(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           ffn_hidden_size=64, tie_embeddings=True, rope_theta=10000.0)


def _alter_in_place(path, n=64):
    """Overwrite n bytes in the middle of a file with their complement (same size, same mtime granularity)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(n)
        f.seek(size // 2)
        f.write(bytes(255 - b for b in data))
    assert os.path.getsize(path) == size


def _largest_distcp(d):
    return max((f for f in os.listdir(d) if f.endswith(".distcp")), key=lambda f: os.path.getsize(os.path.join(d, f)))


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _world(rank, tmp):
    from erpd_megatron.megatron import checkpoint as C
    from erpd_megatron.megatron.engine import OptimConfig, PolicyEngine
    from erpd_megatron.megatron.model import ModelConfig
    from erpd_megatron.megatron.parallel import ParallelConfig, init_parallel

    os.umask(0o022)
    out = {}
    par = ParallelConfig()
    init_parallel(par, seed=0)

    def engine():
        return PolicyEngine(ModelConfig(**CFG), par, OptimConfig(lr=1e-3, micro_batch_size=4))

    cap = _Capture()
    logging.getLogger(C.__name__).addHandler(cap)
    batch = _batch()
    eng = engine()
    root = os.path.join(tmp, "ck")
    for _ in range(2):
        eng.train_step(batch, _loss)
        eng.save(root)  # iter_1, iter_2
    it2 = os.path.join(root, C.iter_dirname(2))
    meta = json.load(open(os.path.join(it2, C.MARKER)))
    out["records"] = meta["files"]
    out["format"] = meta["format_version"]
    out["rng_files"] = sorted(os.listdir(os.path.join(it2, "rng")))
    out["modes"] = {n: os.stat(os.path.join(root, n)).st_mode & 0o777 for n in (C.LATEST,)}
    out["modes"][C.MARKER] = os.stat(os.path.join(it2, C.MARKER)).st_mode & 0o777

    # RNG restored from safetensors on a same-layout resume
    saved_rng = torch.get_rng_state().clone()
    torch.manual_seed(1234)
    e2 = engine()
    e2.load(root)
    out["rng_restored"] = torch.equal(torch.get_rng_state(), saved_rng)

    # a .distcp altered in place (same size): refused before loading, naming the file
    bad = os.path.join(tmp, "bad")
    shutil.copytree(it2, bad)
    victim = _largest_distcp(bad)
    _alter_in_place(os.path.join(bad, victim))
    out["victim"] = victim
    errors = []
    for load in (lambda: C.load_checkpoint(engine(), bad), lambda: C.load_model_weights(engine().modules, bad)):
        try:
            load()
            errors.append("loaded")
        except C.CheckpointError as e:
            errors.append(str(e))
    out["tamper_errors"] = errors

    # resume: the newest checkpoint damaged in place -> the previous intact one, said in the log
    _alter_in_place(os.path.join(it2, victim))
    cap.lines.clear()
    e3 = engine()
    m = C.load_latest_intact(e3, root)
    out["fallback_step"], out["fallback_engine_step"] = m["step"], e3.step
    out["fallback_log"] = [x for x in cap.lines if "damaged" in x]

    # disk full while writing a checkpoint: previous one intact and still `latest`, no .tmp left, path named
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    disk = os.path.join(tmp, "disk")
    e4 = engine()
    e4.train_step(batch, _loss)
    e4.save(disk)  # iter_1
    real = fa._write_item

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fa._write_item = full
    e4.train_step(batch, _loss)
    try:
        e4.save(disk)
        out["enospc"] = "saved"
    except C.CheckpointError as e:
        out["enospc"] = str(e)
    finally:
        fa._write_item = real
    out["after_enospc"] = sorted(os.listdir(disk))
    out["after_enospc_latest"] = os.path.basename(C.resolve_checkpoint_dir(disk))
    C.load_checkpoint(engine(), disk)  # intact (content verified)

    # the RNG file itself fails (ENOSPC from safetensors): same guarantees, the file is named
    import safetensors.torch as st

    real_save = st.save_file

    def full_rng(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    st.save_file = full_rng
    try:
        e4.save(disk)
        out["enospc_rng"] = "saved"
    except C.CheckpointError as e:
        out["enospc_rng"] = str(e)
    finally:
        st.save_file = real_save
    out["after_enospc_rng"] = sorted(os.listdir(disk))

    # keep_last: newest 2 + protected step 1 survive
    prune = os.path.join(tmp, "prune")
    e5 = engine()
    for _ in range(5):
        e5.train_step(batch, _loss)
        e5.save(prune)
    C.prune_checkpoints(prune, keep_last=2, keep_steps=(1,))
    out["pruned"] = sorted(os.listdir(prune))
    return out


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return run_distributed(_world, 1, args=(str(tmp_path_factory.mktemp("ckint")),), timeout=400)[0]


def test_every_file_has_a_checksum_and_rng_is_safetensors(res):
    assert res["format"] == 2
    recs = res["records"]
    assert any(k.endswith(".distcp") for k in recs) and "rng/rank_00000.safetensors" in recs
    assert all(set(r) == {"size", "sha256"} and len(r["sha256"]) == 64 for r in recs.values())
    assert res["rng_files"] == ["rank_00000.safetensors"]  # no pickle
    assert res["rng_restored"]


def test_files_follow_the_umask(res):
    assert res["modes"] == {"latest": 0o644, "erpd_checkpoint.json": 0o644}  # umask 022, not mkstemp's 0600


def test_altered_distcp_is_refused_naming_the_file(res):
    for err in res["tamper_errors"]:
        assert err != "loaded"
        assert res["victim"] in err and "does not match its checksum" in err, err


def test_resume_falls_back_to_the_previous_intact_checkpoint(res):
    assert res["fallback_step"] == res["fallback_engine_step"] == 1
    (line,) = res["fallback_log"]
    assert "iter_0000002 is damaged, resuming from iter_0000001" in line and res["victim"] in line


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(res):
    err = res["enospc"]  # megatron's writer drops the OSError's text: the path, the type and the free space remain
    assert "OSError" in err and "iter_0000002.tmp" in err and "MiB free" in err and "(iter_0000001) is intact" in err
    assert res["after_enospc"] == ["iter_0000001", "latest"] and res["after_enospc_latest"] == "iter_0000001"
    err = res["enospc_rng"]
    assert "No space left on device" in err and "rank_00000.safetensors" in err, err
    assert res["after_enospc_rng"] == ["iter_0000001", "latest"]


def test_keep_last_keeps_protected_steps(res):
    assert res["pruned"] == ["iter_0000001", "iter_0000004", "iter_0000005", "latest"]


def test_digest_check_files(tmp_path):
    from erpd_megatron.utils.digest import check_files, digest_files, list_files

    (tmp_path / "a").write_bytes(b"abc" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x")
    recs = digest_files(tmp_path, list_files(tmp_path))
    assert sorted(recs) == ["a", "sub/b"] and check_files(tmp_path, recs) == []
    halves = [digest_files(tmp_path, list_files(tmp_path), shard=(r, 2)) for r in (0, 1)]
    assert {**halves[0], **halves[1]} == recs and all(len(h) == 1 for h in halves)
    _alter_in_place(tmp_path / "a", n=8)
    (problem,) = check_files(tmp_path, recs)
    assert problem.startswith("a content does not match its checksum")
    assert check_files(tmp_path, recs, content=False) == []  # same size: only the content check sees it
    assert check_files(tmp_path, {"a": 300}) == []  # a format-1 record (size only)


def _fake_checkpoint(root, step):
    """An iter_N directory with one file and a valid marker (enough for verification; no tensors)."""
    from erpd_megatron.megatron import checkpoint as C
    from erpd_megatron.utils.digest import digest_files, list_files

    d = root / C.iter_dirname(step)
    d.mkdir(parents=True)
    (d / "shard.distcp").write_bytes(bytes(range(256)) * 4)
    (d / C.MARKER).write_text(json.dumps({"format_version": 2, "step": step, "files": digest_files(d, list_files(d))}))
    (root / C.LATEST).write_text(C.iter_dirname(step) + "\n")
    return d


@pytest.mark.parametrize("damage", ["invalid_utf8", "invalid_json", "wrong_shape"])
def test_damaged_marker_falls_back_like_a_damaged_shard(tmp_path, monkeypatch, caplog, damage):
    """Issue 25 row 2: one flipped byte in erpd_checkpoint.json (here an invalid UTF-8 byte) is a CheckpointError
    naming the marker, and the resume falls back to the previous checkpoint (no UnicodeDecodeError traceback)."""
    from erpd_megatron.megatron import checkpoint as C

    _fake_checkpoint(tmp_path, 1)
    newest = _fake_checkpoint(tmp_path, 2)
    marker = newest / C.MARKER
    data = bytearray(marker.read_bytes())
    if damage == "invalid_utf8":
        data[len(data) // 2] = 0xFF
    elif damage == "invalid_json":
        data[0] = ord("x")
    else:
        data = bytearray(b'{"files": [1, 2]}')
    marker.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match=rf"iter_0000002: {C.MARKER} is corrupt"):
        C.verify_checkpoint_dir(str(newest))
    with pytest.raises(C.CheckpointError, match=C.MARKER):
        C.read_checkpoint_meta(str(tmp_path))  # follows `latest` to the damaged one
    monkeypatch.setattr(C, "load_checkpoint", lambda engine, path, model_only=False: {"path": path})
    with caplog.at_level(logging.WARNING):
        got = C.load_latest_intact(None, str(tmp_path))
    assert got["path"].endswith("iter_0000001")
    assert f"iter_0000002 is damaged, resuming from iter_0000001 instead: checkpoint {newest}: {C.MARKER}" \
        in caplog.text
