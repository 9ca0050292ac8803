"""Rollout store: round trip, layout vs hand-built tensors, corruption and crash safety, add_columns."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from erpd_megatron.data import rollout_store as rs
from erpd_megatron.data.rollout_store import RolloutRecord, RolloutStore, RolloutStoreError

REPO = Path(__file__).resolve().parents[1]


def make_records(n=3, seed=0, version=7):
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(n):
        p = 2 + i % 3  # prompt lengths 2, 3, 4, ...
        r = (3 * i + seed) % 5  # response lengths 0..4 (0 = empty response)
        recs.append(
            RolloutRecord(
                prompt_ids=torch.randint(1, 500, (p,), generator=g).tolist(),
                response_ids=torch.randint(1, 500, (r,), generator=g).tolist(),
                behaviour_logprobs=(-torch.rand(r, generator=g) * 3).tolist(),
                reward=float(i % 2),
                group_id=i // 2,
                prompt_id=f"q{i // 2}",
                finish_reason="stop" if i % 2 else "length",
                sampling_params={"temperature": 1.0, "top_p": 0.9},
                policy_version=version,
            )
        )
    return recs


def hand_padded(recs, pad_id):
    """Build the expected [B, T] layout element by element (independent of the store's numpy code)."""
    T = max(len(r.prompt_ids) + len(r.response_ids) for r in recs)
    ids, att, resp, lp = [], [], [], []
    for r in recs:
        row_ids, row_att, row_resp, row_lp = [], [], [], []
        for t in range(T):
            if t < len(r.prompt_ids):
                row_ids.append(r.prompt_ids[t]), row_att.append(1), row_resp.append(0.0), row_lp.append(0.0)
            elif t < len(r.prompt_ids) + len(r.response_ids):
                j = t - len(r.prompt_ids)
                row_ids.append(r.response_ids[j]), row_att.append(1), row_resp.append(1.0)
                row_lp.append(r.behaviour_logprobs[j])
            else:
                row_ids.append(pad_id), row_att.append(0), row_resp.append(0.0), row_lp.append(0.0)
        ids.append(row_ids), att.append(row_att), resp.append(row_resp), lp.append(row_lp)
    return torch.tensor(ids), torch.tensor(att), torch.tensor(resp), torch.tensor(lp, dtype=torch.float32)


def test_round_trip_table(tmp_path):
    store = RolloutStore(tmp_path / "s")
    recs = make_records(5)
    path = store.write_batch(0, recs)
    assert path.name == "batch_0.parquet"
    assert store.batches() == [0]
    t = store.read_table(0)
    assert t.column("sample_id").to_pylist() == [f"b0-{i}" for i in range(5)]
    assert t.column("prompt_ids").to_pylist() == [list(r.prompt_ids) for r in recs]
    assert t.column("response_ids").to_pylist() == [list(r.response_ids) for r in recs]
    got_lp = t.column("behaviour_logprobs").to_pylist()
    for r, lp in zip(recs, got_lp):
        assert torch.allclose(torch.tensor(lp), torch.tensor(r.behaviour_logprobs, dtype=torch.float32))
    assert t.column("group_id").to_pylist() == [0, 0, 1, 1, 2]
    assert t.column("finish_reason").to_pylist()[:2] == ["length", "stop"]
    assert json.loads(t.column("sampling_params")[0].as_py()) == {"temperature": 1.0, "top_p": 0.9}
    assert t.column("policy_version").to_pylist() == [7] * 5
    assert t.schema.field("prompt_ids").type.value_type == pa.int32()
    assert t.schema.field("behaviour_logprobs").type.value_type == pa.float32()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    entry = manifest["files"]["batch_0.parquet"]
    assert entry["num_rows"] == 5 and entry["state"] == "committed" and len(entry["sha256"]) == 64
    # a second handle on the same directory sees the same data
    assert RolloutStore(tmp_path / "s", create=False).read_table(0).equals(t)


def test_padded_layout_matches_hand_built(tmp_path):
    store = RolloutStore(tmp_path)
    recs = make_records(6, seed=1)
    store.write_batch(3, recs)
    out = store.load_tensors(3, pad_id=-5)
    ids, att, resp, lp = hand_padded(recs, pad_id=-5)
    assert torch.equal(out["input_ids"], ids)
    assert torch.equal(out["attention_mask"], att)
    assert torch.equal(out["response_mask"], resp)
    assert torch.equal(out["behaviour_logprobs"], lp)
    assert (out["behaviour_logprobs"][:, 0] == 0).all()  # first token is always a prompt token
    assert out["input_ids"].dtype == torch.long and out["response_mask"].dtype == torch.float32
    assert torch.equal(out["rewards"], torch.tensor([r.reward for r in recs], dtype=torch.float32))
    assert torch.equal(out["group_ids"], torch.tensor([r.group_id for r in recs]))
    assert out["response_lengths"].tolist() == [len(r.response_ids) for r in recs]
    # pad_to_multiple_of pads T only
    out8 = store.load_tensors(3, pad_id=-5, pad_to_multiple_of=8)
    assert out8["input_ids"].shape[1] % 8 == 0
    assert torch.equal(out8["input_ids"][:, : ids.shape[1]], ids)
    assert (out8["input_ids"][:, ids.shape[1] :] == -5).all()


def test_packed_layout(tmp_path):
    store = RolloutStore(tmp_path)
    recs = make_records(4, seed=2)
    store.write_batch(0, recs)
    out = store.load_packed(0)
    seqs = [list(r.prompt_ids) + list(r.response_ids) for r in recs]
    assert out["input_ids"].tolist() == [t for s in seqs for t in s]
    lens = [len(s) for s in seqs]
    assert out["cu_seqlens"].tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert out["position_ids"].tolist() == [t for n in lens for t in range(n)]
    expected_mask = [m for r in recs for m in [0.0] * len(r.prompt_ids) + [1.0] * len(r.response_ids)]
    assert out["response_mask"].tolist() == expected_mask
    expected_lp = [v for r in recs for v in [0.0] * len(r.prompt_ids) + list(r.behaviour_logprobs)]
    assert torch.allclose(out["behaviour_logprobs"], torch.tensor(expected_lp, dtype=torch.float32))


def test_multiple_batches_concatenate(tmp_path):
    store = RolloutStore(tmp_path)
    a, b = make_records(3, seed=3, version=1), make_records(2, seed=4, version=2)
    store.write_batch(0, a)
    store.write_batch(1, b)
    assert store.batches() == [0, 1]
    out = store.load_tensors([0, 1])
    ids, *_ = hand_padded(a + b, pad_id=0)
    assert torch.equal(out["input_ids"], ids)
    assert out["policy_versions"].tolist() == [1, 1, 1, 2, 2]
    with pytest.raises(RolloutStoreError, match="batch 0 already exists"):
        store.write_batch(0, a)


def test_add_columns_round_trip_without_rewriting(tmp_path):
    store = RolloutStore(tmp_path)
    recs = make_records(5, seed=5)
    store.write_batch(2, recs)
    base_bytes = (tmp_path / "batch_2.parquet").read_bytes()
    teacher = [[-0.5 * (j + 1) for j in range(len(r.response_ids))] for r in recs]
    store.add_columns(2, {"teacher_logprobs": teacher})
    # padded [B, T] form, as forward_logprobs returns it: values at response positions are kept
    padded = store.load_tensors(2)
    ref = padded["behaviour_logprobs"] - 1.0
    store.add_columns(2, {"ref_logprobs": ref, "unlearned_logprobs": [[0.0] * len(r.response_ids) for r in recs]})
    assert (tmp_path / "batch_2.parquet").read_bytes() == base_bytes  # base file untouched
    assert sorted(p.name for p in tmp_path.glob("batch_2*")) == [
        "batch_2.extra1.parquet",
        "batch_2.extra2.parquet",
        "batch_2.parquet",
    ]
    assert store.per_token_columns(2) == [
        "behaviour_logprobs",
        "teacher_logprobs",
        "ref_logprobs",
        "unlearned_logprobs",
    ]
    out = store.load_tensors(2)
    _, _, resp, lp = hand_padded(recs, 0)
    exp_teacher = torch.zeros_like(lp)
    for b, r in enumerate(recs):
        P = len(r.prompt_ids)
        exp_teacher[b, P : P + len(r.response_ids)] = torch.tensor(teacher[b])
    assert torch.equal(out["teacher_logprobs"], exp_teacher)
    assert torch.equal(out["ref_logprobs"], (lp - 1.0) * resp)
    assert torch.equal(out["unlearned_logprobs"], torch.zeros_like(lp))
    # column subset: only the sidecar holding it is read
    sub = store.load_tensors(2, columns=["teacher_logprobs"])
    assert "ref_logprobs" not in sub and "behaviour_logprobs" not in sub
    assert torch.equal(sub["teacher_logprobs"], exp_teacher)
    with pytest.raises(RolloutStoreError, match="already exists"):
        store.add_columns(2, {"teacher_logprobs": teacher})
    bad = [list(t) for t in teacher]
    bad[1] = bad[1] + [0.0]
    with pytest.raises(RolloutStoreError, match=r"row 1 .*has \d+ values but the response has"):
        store.add_columns(2, {"x_logprobs": bad})


def test_validation_names_rows(tmp_path):
    store = RolloutStore(tmp_path)
    recs = make_records(4, seed=6)
    recs[2] = RolloutRecord([1, 2], [3, 4, 5], [-0.1, float("nan"), -0.2], 1.0, 0)
    with pytest.raises(RolloutStoreError, match=r"batch 0 row 2 .*NaN.*positions \[1\]"):
        store.write_batch(0, recs)
    with pytest.raises(RolloutStoreError, match=r"row 0 .*2 values but the response has 3 tokens"):
        store.write_batch(0, [RolloutRecord([1], [3, 4, 5], [-0.1, -0.2], 1.0, 0)])
    with pytest.raises(RolloutStoreError, match="prompt_ids is empty"):
        store.write_batch(0, [RolloutRecord([], [3], [-0.1], 1.0, 0)])
    with pytest.raises(RolloutStoreError, match="token ids outside"):
        store.write_batch(0, [RolloutRecord([1], [-3], [-0.1], 1.0, 0)])
    with pytest.raises(RolloutStoreError, match="reward is nan"):
        store.write_batch(0, [RolloutRecord([1], [3], [-0.1], float("nan"), 0)])
    with pytest.raises(RolloutStoreError, match="sample_id 'x' repeats row 0"):
        store.write_batch(0, [RolloutRecord([1], [3], [-0.1], 1.0, 0, sample_id="x")] * 2)
    store.write_batch(0, make_records(2))
    with pytest.raises(RolloutStoreError, match=r"row 1 .*NaN"):
        store.add_columns(0, {"teacher_logprobs": [[], [-1.0, float("nan"), -2.0]]})  # lengths 0, 3
    assert store.batches() == [0]  # nothing of the failed writes was committed


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _flip_byte(p, p.stat().st_size // 2), "is corrupt: sha256"),
        (lambda p: _flip_byte(p, 0), "is corrupt: sha256"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size - 10]), "is truncated"),
        (lambda p: p.write_bytes(b""), "is truncated"),
        (lambda p: p.unlink(), "listed in the manifest but missing"),
    ],
)
def test_corruption_detected(tmp_path, damage, message):
    store = RolloutStore(tmp_path)
    store.write_batch(0, make_records(3))
    store.write_batch(1, make_records(3, seed=1))
    store.add_columns(1, {"teacher_logprobs": store.load_tensors(1)["behaviour_logprobs"]})
    for victim in ["batch_1.parquet", "batch_1.extra1.parquet"]:
        sub = tmp_path / victim.replace(".", "_")
        sub.mkdir()
        for p in tmp_path.glob("*.*"):
            (sub / p.name).write_bytes(p.read_bytes())
        damage(sub / victim)
        s = RolloutStore(sub)
        with pytest.raises(RolloutStoreError, match=message) as e:
            s.load_tensors(1)
        assert victim in str(e.value)
        with pytest.raises(RolloutStoreError, match=message):
            s.verify()
        assert s.load_tensors(0)["input_ids"].shape[0] == 3  # the intact batch still reads


def test_extra_and_unlisted_files_detected(tmp_path):
    store = RolloutStore(tmp_path)
    store.write_batch(0, make_records(2))
    (tmp_path / "batch_0.extra9.parquet").write_bytes((tmp_path / "batch_0.parquet").read_bytes())
    with pytest.raises(RolloutStoreError, match=r"batch_0\.extra9\.parquet is not in"):
        store.read_table(0)
    with pytest.raises(RolloutStoreError, match="extra9"):
        store.verify()
    (tmp_path / "batch_0.extra9.parquet").unlink()
    (tmp_path / "batch_5.parquet").write_bytes(b"junk")
    store.read_table(0)  # another batch's stray does not block batch 0 ...
    with pytest.raises(RolloutStoreError, match="batch_5.parquet is not in"):
        store.verify()  # ... but the full check reports it
    with pytest.raises(RolloutStoreError, match="not in the manifest; not overwriting"):
        store.write_batch(5, make_records(2))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(RolloutStoreError, match="manifest.json is missing"):
        store.batches()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RolloutStoreError, match="not a valid rollout-store manifest"):
        store.read_table(0)


@pytest.mark.parametrize("stage", ["temp_written", "pending", "renamed"])
def test_exception_mid_write_keeps_previous_state(tmp_path, monkeypatch, stage):
    store = RolloutStore(tmp_path)
    first = make_records(3)
    store.write_batch(0, first)
    before = store.load_tensors(0)

    def boom(s):
        if s == stage:
            raise RuntimeError(f"simulated crash at {s}")

    monkeypatch.setattr(rs, "_crash_point", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.write_batch(1, make_records(2, seed=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.add_columns(0, {"teacher_logprobs": before["behaviour_logprobs"]})
    monkeypatch.setattr(rs, "_crash_point", lambda s: None)
    assert store.batches() == [0]
    assert store.per_token_columns(0) == ["behaviour_logprobs"]
    store.verify()
    after = store.load_tensors(0)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(tmp_path.glob(".tmp-*"))  # an in-process failure cleans its temp file
    # the store keeps working: the same writes succeed now
    store.write_batch(1, make_records(2, seed=1))
    store.add_columns(0, {"teacher_logprobs": before["behaviour_logprobs"]})
    store.verify()
    assert store.batches() == [0, 1] and "teacher_logprobs" in store.load_tensors(0)


def test_disk_full_keeps_previous_batch_and_names_the_file(tmp_path, monkeypatch):
    import errno

    store = RolloutStore(tmp_path)
    store.write_batch(0, make_records(3))
    before = store.load_tensors(0)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rs.os, "fsync", full)  # the first fsync is the temp file's: the data did not fit
    with pytest.raises(OSError, match="No space left on device") as e:
        store.write_batch(1, make_records(2, seed=1))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "batch_1.parquet")
    with pytest.raises(OSError, match="No space left on device") as e:
        store.add_columns(0, {"teacher_logprobs": before["behaviour_logprobs"]})
    assert e.value.filename.endswith("batch_0.extra1.parquet")
    monkeypatch.undo()
    assert store.batches() == [0] and store.per_token_columns(0) == ["behaviour_logprobs"]
    store.verify()
    assert all(torch.equal(before[k], store.load_tensors(0)[k]) for k in before)
    assert not list(tmp_path.glob(".tmp-*"))  # the failed temp files were removed (their space freed)


# The child imports only the store (pyarrow + numpy, no torch) and stops itself at `stage`.
CRASH_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from erpd_megatron.data import rollout_store as rs

    root, stage, what = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    def hang(s):
        if s == stage:
            (root / "READY").write_text(s)  # not a batch file: the store ignores it
            time.sleep(600)
    rs._crash_point = hang
    store = rs.RolloutStore(root)
    if what == "batch":
        store.write_batch(1, [rs.RolloutRecord([1, 2], [3, 4], [-0.5, -0.25], 1.0, 0)] * 1)
    else:
        lengths = store.read_table(0).column("response_ids").combine_chunks().value_lengths().to_pylist()
        store.add_columns(0, {{"teacher_logprobs": [[-1.0] * n for n in lengths]}})
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["batch", "columns"])
def test_sigkill_mid_write_keeps_previous_state(tmp_path, what):
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stage in ["temp_written", "pending", "renamed"]:
        root = tmp_path / f"store_{stage}"
        store = RolloutStore(root)
        store.write_batch(0, make_records(3))
        before = store.load_tensors(0)
        proc = subprocess.Popen([sys.executable, str(script), str(root), stage, what], env=env)
        try:
            deadline = time.monotonic() + 120
            while not (root / "READY").exists():
                assert proc.poll() is None, f"child exited early with {proc.returncode}"
                assert time.monotonic() < deadline, "child never reached the crash point"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # the store is exactly its previous state, and fully consistent
        store = RolloutStore(root)
        store.verify()
        assert store.batches() == [0]
        assert store.per_token_columns(0) == ["behaviour_logprobs"]
        after = store.load_tensors(0)
        assert all(torch.equal(before[k], after[k]) for k in before)
        if stage == "temp_written":
            assert list(root.glob(".tmp-*")), "expected the killed writer's temp file to be left behind"
        # and the interrupted write can be redone
        if what == "batch":
            store.write_batch(1, [RolloutRecord([1, 2], [3, 4], [-0.5, -0.25], 1.0, 0)])
            assert store.load_tensors(1)["input_ids"].tolist() == [[1, 2, 3, 4]]
        else:
            store.add_columns(0, {"teacher_logprobs": before["behaviour_logprobs"]})
            assert torch.equal(store.load_tensors(0)["teacher_logprobs"], before["behaviour_logprobs"])
        store.verify()
