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
