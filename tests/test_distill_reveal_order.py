"""distill.reveal_order: coupled trajectories whose reveals follow the strided sampler's order.

The band map (mcd_scale/distill/reveal_order.py) is checked on its defining property: on the ``stride``-step grid
one step reveals exactly one residue class j mod stride, each class once (i.i.d. thresholds, the control, do not);
the precompute job, the shard reader and the MCD objective regenerate the same banded thresholds, and a shard set
written in another order is refused naming the field."""
from __future__ import annotations

import os

import pytest
import torch

from mcd_scale.config import ConfigError, load_config
from mcd_scale.data.loader import collate_samples
from mcd_scale.data.manifest import ManifestError, load_manifest
from mcd_scale.data.trajectories import open_trajectories, thresholds_for
from mcd_scale.diffusion.duality import reveal_thresholds
from mcd_scale.diffusion.sampling import sampling_times
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.distill.objective import build_distill_objective
from mcd_scale.distill.reveal_order import ordered_thresholds
from mcd_scale.parallel.distributed import ParallelDims
from tests.test_trajectories import L, REPO, TINY, V, make_teacher, make_tokens, run_inprocess, tool_args

SCHEDULE = get_schedule("loglinear", 1e-3)
STRIDE = 4


def _revealed_per_grid_step(u: torch.Tensor, stride: int) -> list[torch.Tensor]:
    """For each step k of the stride-step grid: bool [B, L], the tokens revealed in (t_{k+1}, t_k]."""
    alpha = SCHEDULE.alpha(sampling_times(stride).double())
    return [(u >= alpha[k]) & (u < alpha[k + 1]) for k in range(stride)]


def test_a_grid_step_reveals_exactly_one_residue_class():
    ids = torch.arange(8)
    u = reveal_thresholds(ids, 32, seed=3, form="uniform")
    banded = ordered_thresholds(u, ids, 3, 0, "strided", STRIDE, SCHEDULE)
    classes = torch.arange(32) % STRIDE
    for b in range(len(ids)):
        seen = []
        for step in _revealed_per_grid_step(banded, STRIDE):
            cls = classes[step[b]].unique().tolist()
            assert len(cls) == 1 and int(step[b].sum()) == 32 // STRIDE, (b, cls)  # one whole class, nothing else
            seen += cls
        assert sorted(seen) == list(range(STRIDE))  # every class once, in a keyed order
    # the control: i.i.d. thresholds reveal neighbours in one step
    assert any(len(classes[step[b]].unique()) > 1 for step in _revealed_per_grid_step(u, STRIDE) for b in range(8))
    assert ordered_thresholds(u, ids, 3, 0, "random", 0, SCHEDULE) is u


def test_bands_are_keyed_by_sample_and_round_not_by_batch():
    ids = torch.tensor([3, 9, 27])
    u = reveal_thresholds(ids, 16, seed=1, form="uniform")
    full = ordered_thresholds(u, ids, 1, 2, "strided", STRIDE, SCHEDULE)
    alone = ordered_thresholds(u[1:2], ids[1:2], 1, 2, "strided", STRIDE, SCHEDULE)
    assert torch.equal(full[1:2], alone)
    other_round = ordered_thresholds(u, ids, 1, 3, "strided", STRIDE, SCHEDULE)
    assert not torch.equal(full, other_round)
    # nesting is kept: one threshold per token, so z_s is revealed wherever z_t is (u' < alpha_t <= alpha_s)
    assert bool(((full >= 0) & (full < 1)).all())
    with pytest.raises(ValueError, match="stride >= 2"):
        ordered_thresholds(u, ids, 1, 0, "strided", 1, SCHEDULE)
    with pytest.raises(ValueError, match="reveal order"):
        ordered_thresholds(u, ids, 1, 0, "halton", 4, SCHEDULE)


def _cfg(*extra):
    return load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], TINY + ["train.seed=7", *extra])


@pytest.mark.parametrize("sets, needle", [
    (["distill.reveal_order=strided"], "distill.reveal_stride"),
    (["distill.reveal_order=strided", "distill.reveal_stride=4", "diffusion.duality_form=gaussian"],
     "diffusion.duality_form"),
    (["distill.reveal_order=strided", "distill.reveal_stride=4", "train.objective=sdtt"], "train.objective: sdtt"),
    (["distill.reveal_order=zigzag"], "distill.reveal_order")])
def test_config_refuses_an_unusable_order(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg("train.objective=mcd", *[s for s in sets if not s.startswith("train.objective")],
             *[s for s in sets if s.startswith("train.objective")])


STRIDED = ["distill.reveal_order=strided", f"distill.reveal_stride={STRIDE}"]


@pytest.fixture(scope="module")
def strided_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("traj_strided")
    teacher = make_teacher(str(root / "teacher"))
    data = make_tokens(str(root / "tokens"))
    out = str(root / "strided")
    rc, _ = run_inprocess(tool_args(teacher, data, out, *[a for s in STRIDED for a in ("--set", s)]))
    assert rc == 0
    return teacher, data, out


def test_precompute_reader_and_objective_share_the_strided_order(strided_shards):
    teacher, data, out = strided_shards
    m = load_manifest(out)
    assert m["thresholds"]["order"] == "strided" and m["thresholds"]["stride"] == STRIDE
    cfg = _cfg("train.objective=mcd", f"data.path={data}", f"data.trajectories={out}", f"distill.teacher={teacher}",
               *STRIDED)
    ds = open_trajectories(cfg)
    batch = collate_samples([(g, g, ds[g]) for g in range(8)])
    ds.verify_batch(batch)  # the stored masked sets are the banded thresholds' z_s
    objective = build_distill_objective(cfg, ParallelDims(world_size=1, tp=1, pp=1))
    u = objective.thresholds(batch["sample_id"], L)
    assert torch.equal(u, thresholds_for(batch["sample_id"], m))
    assert not torch.equal(u, reveal_thresholds(batch["sample_id"], L, 7, "uniform", K=V + 1, round_idx=0))
    objective.prepare(batch, 1)  # the offline path's own z_s vs tk_mask check accepts them
    with pytest.raises(ManifestError, match="reveal_order"):  # the same shards read as the random order
        open_trajectories(_cfg("train.objective=mcd", f"data.path={data}", f"data.trajectories={out}",
                               f"distill.teacher={teacher}"))
    with pytest.raises(ManifestError, match="reveal_order"):  # another stride
        open_trajectories(_cfg("train.objective=mcd", f"data.path={data}", f"data.trajectories={out}",
                               f"distill.teacher={teacher}", "distill.reveal_order=strided",
                               "distill.reveal_stride=8"))


# ------------------------------------------------------------------ distill.times: grid (the sampler's own steps)
def test_grid_times_are_the_samplers_steps_and_stay_stratified():
    """Every pair is a consecutive pair (t_k, t_{k+1}) of sampling_times(n); a stratified set of raw t's hits
    each of the n steps equally often; a larger raw t never picks a later step; dt must be 1/n."""
    from mcd_scale.distill.rounds import grid_times, pair_span, round_times

    n, t_min = 4, 1e-3
    raw = t_min + (1 - t_min) * (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    t, s = grid_times(raw, 1.0 / n, t_min)
    grid = sampling_times(n)
    pairs = {(float(a), float(b)) for a, b in zip(t, s)}
    assert pairs == {(float(grid[k]), float(grid[k + 1])) for k in range(n)}
    assert all(sum(1 for a in t.tolist() if a == float(grid[k])) == 64 // n for k in range(n))
    assert bool((t[1:] >= t[:-1]).all())  # monotone in the raw time
    assert torch.allclose(t - s, torch.full_like(t, pair_span(1.0 / n, "grid")), rtol=0, atol=1e-12)
    # the uniform control: pairs off the grid
    tu, su = round_times(raw, 1.0 / n, t_min, "uniform")
    assert torch.allclose(tu - su, torch.full_like(tu, 1.0 / n)) and len({float(a) for a in tu}) == 64
    with pytest.raises(ValueError, match="1/n"):
        grid_times(raw, 0.3, t_min)
    with pytest.raises(ValueError, match="distill.times"):
        round_times(raw, 0.25, t_min, "halton")


def test_grid_times_with_the_strided_order_show_whole_classes_only():
    """The point of the pair: z_t and z_s of a grid pair with banded thresholds reveal whole residue classes
    (what the 4-step strided sampler shows the student); uniform pairs show partial classes."""
    from mcd_scale.diffusion.duality import coupled_pair
    from mcd_scale.distill.rounds import round_times

    ids = torch.arange(16)
    x = torch.randint(0, V, (16, 32), generator=torch.Generator().manual_seed(0))
    u = ordered_thresholds(reveal_thresholds(ids, 32, seed=5, form="uniform"), ids, 5, 0, "strided", STRIDE, SCHEDULE)
    raw = 1e-3 + (1 - 1e-3) * (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    classes = torch.arange(32) % STRIDE

    def partial(mode):
        t, s = round_times(raw, 1.0 / STRIDE, 1e-3, mode)
        z_t, z_s = coupled_pair(x, t, s, u, SCHEDULE, V)
        out = 0
        for z in (z_t, z_s):
            for b in range(16):
                for c in range(STRIDE):
                    revealed = (z[b, classes == c] != V)
                    out += int(revealed.any() and not revealed.all())
        return out

    assert partial("grid") == 0
    assert partial("uniform") > 0


@pytest.mark.parametrize("sets, needle", [
    (["distill.times=grid", "distill.dt0=0.3", "distill.rounds=1"], "1/n"),
    (["distill.times=grid", "distill.dt0=0.125", "distill.rounds=2", "train.objective=sdtt"], "distill.times"),
    (["distill.times=both"], "distill.times")])
def test_config_refuses_unusable_grid_times(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(*([] if any(s.startswith("train.objective") for s in sets) else ["train.objective=mcd"]), *sets)


GRID = ["distill.times=grid", "distill.dt0=0.125", "distill.rounds=2"]


def test_precompute_reader_and_objective_share_grid_times(tmp_path):
    teacher = make_teacher(str(tmp_path / "teacher"))
    data = make_tokens(str(tmp_path / "tokens"))
    out = str(tmp_path / "grid")
    rc, _ = run_inprocess(tool_args(teacher, data, out, *[a for s in GRID + STRIDED for a in ("--set", s)]))
    assert rc == 0
    m = load_manifest(out)
    assert m["times"]["mode"] == "grid"
    cfg = _cfg("train.objective=mcd", f"data.path={data}", f"data.trajectories={out}", f"distill.teacher={teacher}",
               *GRID, *STRIDED)
    ds = open_trajectories(cfg)
    batch = collate_samples([(g, g, ds[g]) for g in range(8)])
    grid = sampling_times(8)  # round 0: dt = 1/8
    steps = {(float(grid[k]), float(grid[k + 1])) for k in range(8)}
    assert {(float(a), float(b)) for a, b in zip(batch["t"], batch["s"])} <= steps
    ds.verify_batch(batch)
    objective = build_distill_objective(cfg, ParallelDims(world_size=1, tp=1, pp=1))
    objective.prepare(batch, 1)  # the offline path's span and z_s checks accept them
    t, s = objective.times(torch.arange(8), 3)  # the online path draws the same kind of pairs
    assert {(float(a), float(b)) for a, b in zip(t, s)} <= steps
    with pytest.raises(ManifestError, match="distill.times"):  # the same shards read with uniform times
        open_trajectories(_cfg("train.objective=mcd", f"data.path={data}", f"data.trajectories={out}",
                               f"distill.teacher={teacher}", "distill.dt0=0.125", "distill.rounds=2", *STRIDED))
