"""mcd_scale.distill.objective: offline (top-k shards) vs online (frozen teacher) MCD labels, the tk_mask /
dt consistency checks, the SDTT objective, the frozen-teacher guard. Single process, tiny model."""
from __future__ import annotations

import pytest
import torch

from mcd_scale.config import load_config
from mcd_scale.distill.objective import McdObjective, SdttObjective, build_distill_objective
from mcd_scale.distill.targets import topk_from_logits
from mcd_scale.parallel.distributed import ParallelDims
from mcd_scale.model.build import build_model
from mcd_scale.model.weights import full_state_dict
from mcd_scale.rng import keyed_generator

V, L, B = 256, 16, 4
DIMS = ParallelDims(world_size=1, tp=1, pp=1)


def _cfg(*extra: str):
    return load_config([], [f"model.vocab_size={V}", f"model.seq_len={L}", "model.hidden=32", "model.layers=2",
                            "model.heads=2", "model.ffn_hidden=64", "model.pad_vocab_multiple=128",
                            "parallel.micro_batch=4", "parallel.global_batch=4", "train.objective=mcd",
                            "distill.teacher_mode=online", "distill.dt0=0.125", "distill.round=1", *extra])


@pytest.fixture(scope="module")
def teacher_state() -> dict:
    """A peaked (not near-uniform) teacher: random init with the output head scaled up."""
    model = build_model(_cfg(), None, init=True)
    state = full_state_dict(model)
    head = [k for k in state if "head" in k and k.endswith("weight")]
    assert head, sorted(state)
    for k in head:
        state[k] = state[k] * 60.0
    return state


def _micro(seed: int = 0) -> dict:
    g = keyed_generator("test-objective", seed)
    return {"ids": torch.randint(0, V, (B, L), generator=g), "sample_id": torch.tensor([3, 17, 42, 99]),
            "position": torch.arange(B)}


def _offline_micro(online: McdObjective, micro: dict, step: int, k: int, logp_dtype=torch.float32) -> dict:
    """What a trajectory shard would hold for this batch: the teacher's top-k at the tokens masked at s."""
    t, s = online.times(micro["position"], step)
    from mcd_scale.diffusion.duality import coupled_pair

    u = online.thresholds(micro["sample_id"], L)
    _, z_s = coupled_pair(micro["ids"], t, s, u, online.schedule, online.mask_id)
    logits = online.teacher_log_probs_fn()(z_s, s)
    tk = topk_from_logits(logits, z_s, V, k, online.temperature, logp_dtype=logp_dtype)
    ids = torch.zeros(B, L, k, dtype=torch.int64)
    logp = torch.zeros(B, L, k, dtype=torch.float32)
    tail = torch.zeros(B, L, dtype=torch.float32)
    ids[tk.positions], logp[tk.positions], tail[tk.positions] = tk.ids.long(), tk.logp.float(), tk.tail_logp.float()
    return dict(micro, t=t, s=s, tk_mask=tk.positions.clone(), tk_ids=ids, tk_logp=logp, tk_tail=tail)


def _student_logits(seed: int = 1) -> torch.Tensor:
    g = keyed_generator("test-student", seed)
    return (3.0 * torch.randn(B, L, 384, generator=g)).requires_grad_(True)


def test_offline_k_equals_v_matches_online_and_topk_gap(teacher_state, capsys):
    cfg = _cfg()
    online = build_distill_objective(cfg, DIMS, teacher_state)
    assert isinstance(online, McdObjective) and online.temperature == pytest.approx(0.93)
    micro, step = _micro(), 5
    inputs, labels = online.prepare(micro, step)
    assert all(torch.is_tensor(v) for v in labels) and inputs[1].dtype == torch.float32
    assert torch.equal(inputs[1], torch.zeros(B))  # time-agnostic model
    x, z_t, z_s, _ = labels
    assert int((z_s == V).sum()) > 0 and int(((z_t == V) & (z_s != V)).sum()) > 0  # both loss terms present

    offline = build_distill_objective(_cfg("distill.teacher_mode=offline"), DIMS, None)
    assert offline.teacher is None
    logits = _student_logits()
    exact, stats = online.loss_and_stats(logits, labels)
    (g_exact,) = torch.autograd.grad(exact, logits)

    off_inputs, off_labels = offline.prepare(_offline_micro(online, micro, step, V), step)
    assert torch.equal(off_inputs[0], inputs[0])
    full_k = offline.loss(logits, off_labels)
    (g_full,) = torch.autograd.grad(full_k, logits)
    # tolerance: k = V offline vs online in float32 over B*L*V = 16k terms: each within ~(log2(n) + few) * 6e-8 ~ 1e-6;
    # rtol 2e-6 bounds the difference of the two on any CPU's summation order
    torch.testing.assert_close(full_k, exact, rtol=2e-6, atol=0)
    # tolerance: per-entry float32 gradients ~p/(B*L): relative ~1e-6; atol 1e-9 for entries near 0 (|g| <= ~1e-2)
    torch.testing.assert_close(g_full, g_exact, rtol=1e-5, atol=1e-9)
    # float16 storage of the top-k log-probs (what shards hold): relative error below 1e-3
    half = offline.loss(logits, offline.prepare(_offline_micro(online, micro, step, V, torch.float16), step)[1])
    # tolerance: float16 storage rounds each log-prob by <= 2^-11 relative (~5e-4 of |logp|), renormalised after
    assert abs(float(half) / float(exact) - 1) < 1e-3

    # the default k = 64 (bucket tail): a lower bound on the exact loss; gap reported
    k64 = offline.loss(logits, offline.prepare(_offline_micro(online, micro, step, 64, torch.float16), step)[1])
    gap = float(k64) / float(exact) - 1
    assert float(k64) <= float(exact) * (1 + 1e-4) and gap > -0.5
    with capsys.disabled():
        print(f"\n[mcd objective] V={V} exact={float(exact):.4f} (kl/token {float(stats['kl_per_token']):.3f}) "
              f"k=V fp16 rel {float(half) / float(exact) - 1:+.2e}  k=64 gap {100 * gap:+.2f}%")


def test_offline_rejects_wrong_seed_mask_and_dt(teacher_state):
    cfg = _cfg()
    online = build_distill_objective(cfg, DIMS, teacher_state)
    micro = _offline_micro(online, _micro(), 2, 8)
    offline = build_distill_objective(_cfg("distill.teacher_mode=offline"), DIMS, None)
    offline.prepare(micro, 2)  # consistent: accepted

    flipped = dict(micro, tk_mask=micro["tk_mask"].clone())
    flipped["tk_mask"][2, 3] = ~flipped["tk_mask"][2, 3]
    with pytest.raises(ValueError, match=r"differs from the trajectory shard's tk_mask for 1 sample.*\[42\]"):
        offline.prepare(flipped, 2)
    other_seed = build_distill_objective(_cfg("distill.teacher_mode=offline", "train.seed=7"), DIMS, None)
    with pytest.raises(ValueError, match="another seed, threshold form or dt"):
        other_seed.prepare(micro, 2)
    other_round = build_distill_objective(_cfg("distill.teacher_mode=offline", "distill.round=0"), DIMS, None)
    with pytest.raises(ValueError, match="written for another round"):
        other_round.prepare(micro, 2)
    with pytest.raises(KeyError, match="tk_logp"):
        offline.prepare({k: v for k, v in micro.items() if k != "tk_logp"}, 2)


def test_online_needs_teacher_and_teacher_stays_outside_student(teacher_state):
    with pytest.raises(ValueError, match="distill.teacher"):
        build_distill_objective(_cfg(), DIMS, None)
    obj = build_distill_objective(_cfg(), DIMS, teacher_state)
    assert not obj.teacher.module.training and not any(p.requires_grad for p in obj.teacher.module.parameters())

    class FakeEngine:
        module = torch.nn.ModuleList([build_model(_cfg(), None, init=False)])

    obj.attach(FakeEngine())  # a separate student: fine
    FakeEngine.module.append(obj.teacher.module)
    with pytest.raises(RuntimeError, match="registered inside the student"):
        obj.attach(FakeEngine())


def test_sdtt_objective_runs_deterministically(teacher_state):
    cfg = _cfg("train.objective=sdtt", "distill.sdtt_teacher_steps=2")
    obj = build_distill_objective(cfg, DIMS, teacher_state)
    assert isinstance(obj, SdttObjective) and obj.name == "sdtt"
    micro = _micro(3)
    inputs, labels = obj.prepare(micro, 4)
    again = obj.prepare(micro, 4)[1]
    assert torch.equal(labels[1], again[1])  # keyed generators: same (seed, sample, step) -> same targets
    assert not torch.equal(labels[1], obj.prepare(micro, 5)[1][1])
    z_t, target = labels
    assert target.shape == (B, L, V) and torch.isfinite(target[z_t == V]).all()
    logits = _student_logits(2)
    loss = obj.loss(logits, labels)
    assert torch.isfinite(loss) and float(loss) > 0
    (g,) = torch.autograd.grad(loss, logits)
    assert float(g[z_t == V].abs().sum()) > 0 and float(g[z_t != V].abs().sum()) == 0.0
