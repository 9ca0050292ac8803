"""utils/io.py atomic writes: the umask's file mode (shared clusters), and a failed write (disk full) keeps
the old file, leaves no temp file and names the path."""

import errno
import os
import stat

import pytest

from erpd_megatron.utils import io


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_uses_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        for name in ("config.yaml", "report.md", "summary.json"):
            io.atomic_write_text(tmp_path / name, "x\n")
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
        io.atomic_write_json(tmp_path / "eval" / "step_000001.json", {"a": 1})  # creates the folder too
        assert stat.S_IMODE((tmp_path / "eval" / "step_000001.json").stat().st_mode) == mode
    finally:
        os.umask(old)


def test_disk_full_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    io.atomic_write_text(path, "old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OSError) as e:
        io.atomic_write_text(path, "new\n" * 1000)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_library_written_and_copied_files_follow_the_umask(tmp_path, monkeypatch, umask):
    """Issue 25 row 12: safetensors creates its files 0600 (the RNG state of every checkpoint, the toy base's
    weights) and shutil.copy2 carries the source's mode (a shared base cache filled under another umask): each
    such file gets 0666 & ~umask like every other file of a run dir."""
    from checkpoints_conv.hf_io import copy_side_files
    from erpd_megatron.megatron import checkpoint as C
    from erpd_megatron.toy.warmup import WarmupConfig, ensure_base_model

    want = 0o666 & ~umask
    teammate = 0o644 if umask == 0o077 else 0o600  # the cache as another user's umask left it
    monkeypatch.setenv("ERPD_CACHE", str(tmp_path / "cache"))
    cfg = WarmupConfig(steps=2, batch_size=8, eval_prompts=4, eval_samples=1)
    old = os.umask(umask)
    try:
        ensure_base_model(tmp_path / "a", cfg, log=lambda *_: None)  # warm-up, then fills the cache
        (cache,) = (tmp_path / "cache").iterdir()
        for d in (tmp_path / "a", cache):
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in d.iterdir()}
            assert "model.safetensors" in modes and set(modes.values()) == {want}, (d, modes)
        for f in cache.iterdir():
            f.chmod(teammate)
        ensure_base_model(tmp_path / "b", cfg, log=lambda *_: None)  # copied from the cache
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "b").iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {want}, modes
        (tmp_path / "side").mkdir()
        assert copy_side_files(cache, tmp_path / "side")  # the base import copies the tokenizer files
        assert {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "side").iterdir()} == {want}
        C._write_rng(str(tmp_path / "rank_00000.safetensors"))  # a checkpoint's RNG state
        assert stat.S_IMODE((tmp_path / "rank_00000.safetensors").stat().st_mode) == want
    finally:
        os.umask(old)
