"""One rank order everywhere: ParallelDims == DeepSpeed's PipeModelDataParallelTopology == the groups
megatron-core builds. Order: tensor fastest, then data, then pipe
(``rank = pp_rank * dp * tp + dp_rank * tp + tp_rank``).

Pure part: every (tp, pp) factorisation of 1, 2, 4 and 8 ranks, no processes.
Process part: 4 gloo ranks build (tp=2, pp=2), (tp=2, dp=2), (pp=2, dp=2) in turn inside the same
processes (``ParallelDims.build`` destroys and rebuilds megatron-core's state), checking the
groups' members, megatron's own rank getters, the DeepSpeed mpu adapter, and that each group
really communicates (an all-reduce over it).
"""
from __future__ import annotations

import itertools

import pytest

from mcd_scale.parallel.distributed import ParallelDims
from tests.mp import run_ranks


def _layouts(world_sizes=(1, 2, 4, 8)):
    for world in world_sizes:
        for tp in (d for d in range(1, world + 1) if world % d == 0):
            for pp in (d for d in range(1, world // tp + 1) if (world // tp) % d == 0):
                yield world, tp, pp


LAYOUTS = list(_layouts())


def _reference(world: int, tp: int, pp: int) -> dict[int, tuple[int, int, int]]:
    """rank -> (pp, dp, tp) by enumeration, independent of ParallelDims' arithmetic."""
    dp = world // (tp * pp)
    order = itertools.product(range(pp), range(dp), range(tp))  # last axis varies fastest
    return {rank: coord for rank, coord in enumerate(order)}


def test_layout_enumeration_is_complete():
    assert len(LAYOUTS) == 1 + 3 + 6 + 10  # number of ordered (tp, pp, dp) factorisations
    assert (8, 2, 2) in LAYOUTS and (8, 8, 1) in LAYOUTS and (8, 1, 8) in LAYOUTS


@pytest.mark.parametrize("world, tp, pp", LAYOUTS, ids=[f"w{w}-tp{t}-pp{p}" for w, t, p in LAYOUTS])
def test_matches_deepspeed_topology(world, tp, pp):
    dims = ParallelDims(world_size=world, tp=tp, pp=pp)
    topo = dims.deepspeed_topology()
    assert topo.world_size() == world and dims.dp == world // (tp * pp)
    assert topo.get_dim("pipe") == pp and topo.get_dim("data") == dims.dp and topo.get_dim("model") == tp
    ref = _reference(world, tp, pp)
    for rank in range(world):
        c = topo.get_coord(rank)
        assert (c.pipe, c.data, c.model) == dims.coords(rank) == ref[rank]
        p, d, t = ref[rank]
        assert topo.get_rank(pipe=p, data=d, model=t) == dims.rank_of(p, d, t) == rank
    # the communication groups: DeepSpeed's axis lists == ParallelDims' per-rank member lists
    for axis, members in (("model", dims.tp_ranks), ("data", dims.dp_ranks), ("pipe", dims.pp_ranks)):
        ours = sorted({tuple(members(r)) for r in range(world)})
        theirs = sorted(tuple(g) for g in topo.get_axis_comm_lists(axis))
        assert ours == theirs, (axis, ours, theirs)
    # stage / first / last as the pipeline engine sees them
    for rank in range(world):
        d = ParallelDims(world_size=world, tp=tp, pp=pp, rank=rank)
        assert d.is_first_stage == (topo.get_coord(rank).pipe == 0)
        assert d.is_last_stage == (topo.get_coord(rank).pipe == pp - 1)


def test_indivisible_world_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims(world_size=6, tp=4, pp=1)


# --------------------------------------------------------------------------------------------
# Real megatron-core groups on 4 gloo ranks
# --------------------------------------------------------------------------------------------
MP_LAYOUTS = [(2, 2), (2, 1), (1, 2)]  # (tp, pp): tp2-pp2-dp1, tp2-dp2, pp2-dp2


def _build_layouts(layouts):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mcd_scale.parallel.distributed import init_distributed, shutdown

    out = []
    try:
        for i, (tp, pp) in enumerate(layouts):
            dims = init_distributed(tp=tp, pp=pp) if i == 0 else ParallelDims.build(tp=tp, pp=pp)
            mpu = dims.mpu()
            rec = {
                "coords": dims.coords(),
                "groups": {n: sorted(dist.get_process_group_ranks(g)) for n, g in (
                    ("tp", ps.get_tensor_model_parallel_group()), ("dp", ps.get_data_parallel_group()),
                    ("pp", ps.get_pipeline_model_parallel_group()))},
                "megatron_ranks": (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
                                   ps.get_tensor_model_parallel_rank()),
                "megatron_sizes": (ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                                   ps.get_tensor_model_parallel_world_size()),
                "mpu_ranks": (mpu.get_pipeline_model_parallel_rank(), mpu.get_data_parallel_rank(),
                              mpu.get_model_parallel_rank()),
                "mpu_groups_are_megatron": (mpu.get_model_parallel_group() is ps.get_tensor_model_parallel_group()
                                            and mpu.get_data_parallel_group() is ps.get_data_parallel_group()
                                            and mpu.get_pipeline_model_parallel_group()
                                            is ps.get_pipeline_model_parallel_group()),
                "first_last": (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()),
                "sums": {},
            }
            for name in ("tp", "dp", "pp"):
                t = torch.tensor([float(dist.get_rank())])
                dist.all_reduce(t, group=dims.groups[name])
                rec["sums"][name] = t.item()
            out.append(rec)
    finally:
        shutdown()
    return out


def test_megatron_groups_on_4_ranks():
    results = run_ranks("tests.test_rank_mapping:_build_layouts", 4, {"layouts": MP_LAYOUTS}, timeout=300)
    for li, (tp, pp) in enumerate(MP_LAYOUTS):
        dp = 4 // (tp * pp)
        ref = _reference(4, tp, pp)
        for rank in range(4):
            rec = results[rank][li]
            p, d, t = ref[rank]
            tp_group = [r for r in range(4) if ref[r][0] == p and ref[r][1] == d]
            dp_group = [r for r in range(4) if ref[r][0] == p and ref[r][2] == t]
            pp_group = [r for r in range(4) if ref[r][1] == d and ref[r][2] == t]
            where = f"layout tp={tp} pp={pp} rank {rank}"
            assert rec["coords"] == (p, d, t), where
            assert rec["groups"] == {"tp": tp_group, "dp": dp_group, "pp": pp_group}, where
            assert rec["megatron_ranks"] == (p, d, t) == rec["mpu_ranks"], where
            assert rec["megatron_sizes"] == (pp, dp, tp), where
            assert rec["mpu_groups_are_megatron"], where
            assert rec["first_last"] == (p == 0, p == pp - 1), where
            assert rec["sums"] == {"tp": float(sum(tp_group)), "dp": float(sum(dp_group)),
                                   "pp": float(sum(pp_group))}, where
    # spot-check the spec by hand for tp=2, pp=2: TP pairs are neighbours, PP pairs are 2 apart
    assert results[3][0]["groups"] == {"tp": [2, 3], "dp": [3], "pp": [1, 3]}
    assert results[1][1]["groups"] == {"tp": [0, 1], "dp": [1, 3], "pp": [1]}
    assert results[2][2]["groups"] == {"tp": [2], "dp": [2, 3], "pp": [0, 2]}
