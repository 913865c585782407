"""evamim.atomic: every writer leaves the old file or the complete new one, and no temp file on failure."""

import json
import os
import stat

import pytest

from evamim import atomic


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_writers_replace_the_file_whole(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_text(path, "old\n")
    atomic.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    atomic.write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic.write_with(path, lambda tmp: tmp.write_text("via callback"))
    assert path.read_text() == "via callback"
    with atomic.open_for_write(path, "w") as handle:
        handle.write("streamed é")
    assert path.read_text(encoding="utf-8") == "streamed é"
    assert _names(tmp_path) == ["out.json"]


@pytest.mark.parametrize("how", ["callback", "handle", "json"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, how):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises((OSError, TypeError)):
        if how == "callback":
            atomic.write_with(path, fail)
        elif how == "handle":
            with atomic.open_for_write(path, "w") as handle:
                handle.write("half")
                raise OSError(28, "No space left on device")
        else:
            atomic.write_json(path, {"not json": object()})
    assert path.read_text() == "old" and _names(tmp_path) == ["f.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_get_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "f", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # not mkstemp's 0o600


def test_temp_names_are_hidden_next_to_the_file(tmp_path):
    tmp = atomic.temp_path_for(tmp_path / "step-000000002.pt")
    assert tmp.parent == tmp_path and tmp.name.startswith(".step-000000002.pt.") and tmp.name.endswith(".tmp")
    assert tmp != atomic.temp_path_for(tmp_path / "step-000000002.pt")


def test_open_for_write_refuses_append_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic.open_for_write(tmp_path / "f", "a"):
            pass


def test_replace_file_moves_a_finished_temp_file(tmp_path):
    (tmp_path / "f.partial").write_text("done")
    atomic.replace_file(tmp_path / "f.partial", tmp_path / "f")
    assert _names(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "done"


def test_replace_dir_over_an_existing_directory(tmp_path):
    old, new = tmp_path / "step", tmp_path / ".step.partial"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    assert atomic.replace_dir(new, old) == old
    assert _names(tmp_path) == ["step"] and _names(old) == ["b"]
    fresh = tmp_path / ".other.partial"
    fresh.mkdir()
    atomic.replace_dir(fresh, tmp_path / "other")
    assert _names(tmp_path) == ["other", "step"]
