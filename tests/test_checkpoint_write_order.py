"""save_checkpoint's write order: a save that dies at any rename/replace leaves ``latest`` naming the
previous complete checkpoint, and no partial checkpoint is loadable.

Every file the save publishes goes through ``os.replace`` (the staged directory's rename, and each
atomic write: train_state.json, config, COMPLETE, latest). The test fails the k-th of those calls, for
every k, after one complete checkpoint exists. Tested through the public functions only
(save_checkpoint, read_latest, resolve_load_tag, list_tags): independent of the completion record's
contents.
"""
from __future__ import annotations

import os

import pytest

from mcd_scale.checkpoint import store as ckpt


class FakeEngine:
    """Stands in for DeepSpeed: writes one state file into ``<save_dir>/<tag>/`` like it does."""

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
            fh.write(b"engine state " + tag.encode())


class InjectedFault(RuntimeError):
    pass


def _save(run_dir, step):
    return ckpt.save_checkpoint(FakeEngine(), str(run_dir), ckpt.TrainState(step=step), "model: {}\n", rank=0,
                                world_size=1, keep_last=0, barrier=lambda: None)


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


def _replace_calls(monkeypatch, tmp_path):
    """The destinations of every os.replace of one complete save (after a first one), in order."""
    run = tmp_path / "probe"
    _save(run, 100)
    calls = []
    real = os.replace

    def recording(src, dst, *a, **kw):
        calls.append(os.path.relpath(str(dst), ckpt.checkpoint_root(str(run))))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", recording)
    _save(run, 200)
    monkeypatch.setattr(os, "replace", real)
    return calls, _tree(os.path.join(ckpt.checkpoint_root(str(run)), "step_000200"))


def test_a_save_failing_at_any_replace_leaves_latest_on_the_previous_complete_tag(monkeypatch, tmp_path):
    calls, complete_files = _replace_calls(monkeypatch, tmp_path)
    assert "step_000200" in calls and "latest" in calls, calls  # the rename and the pointer are both replaces
    real = os.replace
    for k, target in enumerate(calls):
        run = tmp_path / f"fail_at_{k}"
        _save(run, 100)
        root = ckpt.checkpoint_root(str(run))
        seen = []

        def failing(src, dst, *a, **kw):
            seen.append(dst)
            if len(seen) == k + 1:
                raise InjectedFault(f"replace #{k} -> {dst}")
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(InjectedFault):
            _save(run, 200)
        monkeypatch.setattr(os, "replace", real)

        where = f"save failed at replace #{k} ({target})"
        assert ckpt.read_latest(root) == "step_000100", where
        assert ckpt.resolve_load_tag(root, "latest") == "step_000100", where
        final = os.path.join(root, "step_000200")
        if "step_000200" in ckpt.list_tags(root):
            # Only the pointer update may fail after the rename: then the new tag is whole, never partial.
            assert _tree(final) == complete_files, where
            assert ckpt.resolve_load_tag(root, "200") == "step_000200"
        else:
            with pytest.raises(Exception, match="step_000200"):
                ckpt.resolve_load_tag(root, "200")
        # The next save after the crash completes and moves the pointer.
        _save(run, 300)
        assert ckpt.read_latest(root) == "step_000300", where
