"""Atomic outputs: nothing looks complete before it is, and leftovers of killed writers are cleared."""

import os
import subprocess
import sys

import pytest

from ckpt_stability.atomic import atomic_directory, atomic_file


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("new, half")
            raise RuntimeError("killed")
    assert (target / "a").read_text() == "old"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    target = tmp_path / "model"
    # a writer that dies (SIGKILL) inside the block, leaving its temporary directory
    code = ("import os, signal; from ckpt_stability.atomic import atomic_directory\n"
            f"with atomic_directory({str(target)!r}) as tmp:\n"
            "    (tmp / 'weights').write_text('partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and not target.exists()
    # a live writer's temporary name is left alone
    alive = tmp_path / f".model.{os.getpid()}.x.tmp"
    alive.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", alive.name])
