from tests.mp import run_ranks


def _groups(tp, pp):
    from mcd_scale.distributed import init_distributed
    dims = init_distributed(tp=tp, pp=pp)
    return dims.coords(), dims.tp_ranks(), dims.dp_ranks()


def test_groups_tp2_dp2():
    res = run_ranks("tests.test_distributed_smoke:_groups", 4, {"tp": 2, "pp": 1})
    assert res[3] == ((0, 1, 1), [2, 3], [1, 3])
