"""Stored trajectory targets are the teacher's top-k on z_s at time s.

tools/precompute_trajectories.py is run in process on a tiny teacher; every stored record is read back
through the reader the distillation uses (:func:`open_trajectories`) and recomputed here from the
teacher file alone: z_s written out by hand from the regenerated thresholds (``u < alpha_s``, log-linear
alpha), the teacher rebuilt from its safetensors and run on (z_s, s), log-softmax at tau, top-k and tail.
A precompute that feeds the teacher z_t (or time t, or takes the top-k at the wrong positions or
temperature) stores other numbers and fails here; the other trajectory tests only compare the tool with
itself (1 vs 2 ranks, resume), so such a bug would pass them.

The teacher's weights are perturbed away from the init (adaLN starts at zero; small init makes the
logits nearly context-free), so the outputs depend strongly on the context and on the time: z_t vs z_s
changes the log-probs by O(1), far above the float16 storage error checked against.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mcd_scale.config import load_config, save_resolved
from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
from mcd_scale.data.manifest import write_manifest
from mcd_scale.data.shards import write_shards
from mcd_scale.rng import keyed_generator
from tests.mp import REPO

V, L, N, K = 61, 16, 10, 5
DT, TAU = 0.3, 0.7  # a wide jump: z_t and z_s differ at ~30% of the positions; tau != 1 is visible
TINY = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.ffn_hidden=64", f"model.vocab_size={V}",
        f"model.seq_len={L}", "model.pad_vocab_multiple=32", "model.time_conditioning=true", "model.cond_dim=16",
        f"distill.top_k={K}", f"distill.dt0={DT}", "distill.temperature.schedule=constant", f"distill.temperature.start={TAU}", "distill.temperature.floor=0.5", "train.seed=11"]


def _cfg(extra=()):
    return load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], TINY + list(extra))


def _make_teacher(directory: str) -> str:
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import full_state_dict, save_safetensors

    cfg = _cfg()
    model = build_model(cfg, None, init=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():  # away from the init: context- and time-sensitive outputs
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(full_state_dict(model), os.path.join(directory, "model.safetensors"))
    save_resolved(cfg, os.path.join(directory, "config.resolved.yaml"))
    return directory


def _make_tokens(directory: str) -> str:
    rows = torch.randint(0, V, (N, L), generator=keyed_generator("test-precompute-targets", N)).numpy()
    rows = rows.astype(np.uint16)
    splits = {}
    for name, data in (("train", rows), ("val", rows[:2])):
        shards = write_shards(os.path.join(directory, name), ((g, {"ids": r}) for g, r in enumerate(data)), 8)
        splits[name] = {"dir": name, "num_samples": len(data), "shards": shards}
    write_manifest(directory, {"format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION, "vocab_size": V,
                               "mask_id": V, "seq_len": L, "dtype": "uint16", "splits": splits,
                               "tokenizer": {"path": "tokenizer.model", "sha256": "tok"}})
    return directory


def _run_tool(teacher: str, data: str, out: str) -> int:
    from mcd_scale.training.precompute import main

    saved = dict(os.environ)  # init_distributed exports launcher variables: restore them
    try:
        return main(["--teacher", teacher, "--data", data, "--out", out, "--samples-per-shard", "4",
                     "--batch-size", "3", "--no-progress"])
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute_targets")
    teacher = _make_teacher(str(root / "teacher"))
    data = _make_tokens(str(root / "tokens"))
    out = str(root / "traj")
    assert _run_tool(teacher, data, out) == 0
    from mcd_scale.data.trajectories import open_trajectories

    cfg = _cfg([f"data.path={data}", f"data.trajectories={out}", f"distill.teacher={teacher}"])
    ds = open_trajectories(cfg)
    items = [ds[g] for g in range(len(ds))]
    manifest = ds.manifest
    ds.close()
    return {"teacher": teacher, "items": items, "manifest": manifest, "tokens": data}


def _teacher_from_file(teacher_dir: str):
    """The teacher rebuilt from its file (float64: the reference's own rounding is negligible)."""
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    model = build_model(_cfg(), None, init=False)
    load_full_state_dict(model, load_safetensors(os.path.join(teacher_dir, "model.safetensors")), None)
    return model.double().eval()


def test_stored_topk_is_the_teacher_on_z_s_at_time_s(stored):
    from mcd_scale.data.shards import ShardedDataset
    from mcd_scale.data.trajectories import sample_time, thresholds_for

    items, m = stored["items"], stored["manifest"]
    assert len(items) == N and m["dt"] == DT and m["temperature"] == TAU and m["top_k"] == K
    tokens = ShardedDataset(os.path.join(stored["tokens"], "train"))
    x = torch.stack([torch.as_tensor(it["ids"], dtype=torch.int64) for it in items])
    assert torch.equal(x, torch.as_tensor(np.stack([tokens[g]["ids"] for g in range(N)]).astype(np.int64)))
    t = torch.tensor([float(it["t"]) for it in items], dtype=torch.float64)
    s = torch.tensor([float(it["s"]) for it in items], dtype=torch.float64)
    # The times are each sample id's keyed draw, mapped affinely to s in [t_min, 1 - dt] (coupled_times,
    # written out here) and t = s + dt; 1e-12: float64 rounding of a few operations on numbers <= 1.
    tm = m["t_min"]
    for g in range(N):
        raw = sample_time(m["seed"], m["round"], g, tm)
        want_s = tm + (raw - tm) * (1.0 - tm - DT) / (1.0 - tm)
        assert abs(float(s[g]) - want_s) < 1e-12, f"sample {g}: s = {float(s[g])}, keyed draw gives {want_s}"
        assert abs(float(t[g] - s[g]) - DT) < 1e-12, f"sample {g}: stored (t, s) are not dt apart"

    u = thresholds_for(torch.arange(N), m)
    alpha = lambda time: 1.0 - (1.0 - m["eps"]) * time  # noqa: E731  (log-linear, written out)
    z_s = torch.where(u < alpha(s)[:, None], x, torch.full_like(x, V))
    z_t = torch.where(u < alpha(t)[:, None], x, torch.full_like(x, V))
    # The test has teeth only if z_t and z_s differ (the wrong input would change the context).
    assert int(((z_t == V) & (z_s != V)).sum()) >= N

    teacher = _teacher_from_file(stored["teacher"])
    with torch.no_grad():
        logp_ref = torch.log_softmax(teacher(z_s, s)[..., :V] / TAU, dim=-1)  # [N, L, V] float64

    checked = 0
    for g, it in enumerate(items):
        mask = torch.as_tensor(it["tk_mask"])
        assert torch.equal(mask, z_s[g] == V), f"sample {g}: stored positions are not those masked at s"
        for pos in torch.nonzero(mask).flatten().tolist():
            ref = logp_ref[g, pos]
            ids = torch.as_tensor(it["tk_ids"][pos], dtype=torch.int64)
            got = torch.as_tensor(it["tk_logp"][pos], dtype=torch.float64)
            ref_top, ref_ids = torch.topk(ref, K)
            # Stored log-probs are float16: relative rounding 2^-11 of |logp|, plus 1e-4 for the tool's
            # float32 forward against this float64 one (summation-order differences ~1e-6 of |logit|).
            tol = 2.0 ** -11 * ref_top.abs() + 1e-4
            assert torch.all((got - ref_top).abs() <= tol), (
                f"sample {g} pos {pos}: stored top-k log-probs {got.tolist()} != teacher on (z_s, s) "
                f"{ref_top.tolist()}")
            # Ids: equal, except that two ids within float32 noise of each other may swap order.
            same = ids == ref_ids
            assert bool(torch.all(same | ((ref[ids] - ref[ref_ids]).abs() <= 1e-5))), (
                f"sample {g} pos {pos}: stored ids {ids.tolist()} != teacher top-k {ref_ids.tolist()}")
            rest = ref.clone()
            rest[ref_ids] = float("-inf")
            tail_ref = torch.logsumexp(rest, dim=0)
            assert abs(float(it["tk_tail"][pos]) - float(tail_ref)) <= 1e-4 * max(1.0, abs(float(tail_ref))), (
                f"sample {g} pos {pos}: tail {float(it['tk_tail'][pos])} != {float(tail_ref)}")
            checked += 1
    assert checked >= N  # every sample's masked positions were compared, and there were some
