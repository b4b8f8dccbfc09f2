"""Checkpoints and run files survive a power loss: synced before the rename, the folder synced after."""

import os

import pytest
import torch

from fedbiscuit.federated import checkpoint
from fedbiscuit.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedbiscuit.runs import atomic_write_text


@pytest.fixture
def events(monkeypatch):
    """Every fsync (by the path it reached) and rename made while writing, in order."""
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        seen.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def _state():
    return ServerState(3, {"selector-0": {"w": torch.ones(2, 2)}}, {"c0": "selector-0"}, {"c0": {"step": 3}})


def _synced_then_renamed(events, target):
    (i, src) = next((i, e[1]) for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
    assert ("fsync", src) in events[:i]  # the data reached the disk before the name pointed at it
    assert ("fsync", str(target.parent)) in events[i + 1 :]  # and the rename itself was made durable


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fsync'ed paths from /proc")
def test_a_checkpoint_is_synced_before_and_after_its_rename(tmp_path, events):
    path = save_checkpoint(tmp_path, _state())
    _synced_then_renamed(events, path)
    _synced_then_renamed(events, path.with_suffix(".optim.pt"))
    assert load_checkpoint(path).optimizer_states == {"c0": {"step": 3}}
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    _synced_then_renamed(events, tmp_path / "config.yaml")


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def broken(obj, f):
        if hasattr(f, "write"):
            f.write(b"half a file")
        else:
            with open(f, "wb") as fh:
                fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state())
    assert list(tmp_path.iterdir()) == []
