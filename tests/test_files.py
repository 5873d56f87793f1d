"""emoq.files: what a later run reads back appears whole or not at all, with ordinary permissions."""

import os
import stat

import pytest

from emoq.files import atomic_folder, atomic_open, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_written_file_replaces_the_old_one_with_the_usual_permissions(tmp_path, umask_022):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]  # no temp file left


def test_an_interrupted_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "manifest.jsonl"
    atomic_write_text(target, "complete\n")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half a li")
        raise RuntimeError("killed")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.jsonl"]


def test_a_folder_is_swapped_in_whole_and_a_failed_one_is_discarded(tmp_path, umask_022):
    target = tmp_path / "export"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"] and _mode(target) == 0o755
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "c").write_text("3")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # neither temp nor old folders left


def test_keep_existing_leaves_a_folder_another_builder_finished(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target) as tmp:
        (tmp / "first").write_text("1")
    with atomic_folder(target, keep_existing=True) as tmp:
        (tmp / "second").write_text("2")
    assert [p.name for p in target.iterdir()] == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
