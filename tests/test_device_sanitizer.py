"""The CPU device-mixing sanitizer (mcd_scale/testing/device_sanitizer.py): what it catches, and one step of every
objective (MDLM, MCD online and offline, SDTT), the trajectory precompute and both samplers run under it, on
both parallel menus at world size 2 with tiny models (online MCD and SDTT need pp = 1: the TP + ZeRO-3 menu
only; offline MCD is the 3D menu's distillation; sampling is single-process)."""
from __future__ import annotations

import os

import pytest
import torch

from mcd_scale.testing.device_sanitizer import STAND_IN, DeviceMixError, DeviceSanitizer, sanitized
from tests.mp import run_cli_ranks, run_ranks

V = 9
TINY = ["model.vocab_size=61", "model.seq_len=16", "model.hidden=32", "model.layers=2", "model.heads=2",
        "model.ffn_hidden=64", "model.pad_vocab_multiple=8", "model.dropout=0.0"]


def _teacher(weight: torch.nn.Parameter):
    def fn(z, t):  # a FrozenTeacher's contract: inputs moved to the device, logits there
        return weight[z.to(STAND_IN)] + t.to(STAND_IN).float().view(-1, 1, 1)
    return fn


def test_sdtt_rollout_keeps_everything_on_the_teachers_device():
    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.distill.sdtt import sdtt_rollout
    from mcd_scale.rng import keyed_generator

    weight = torch.nn.Parameter(torch.randn(V + 1, 12, generator=torch.Generator().manual_seed(0)))
    z_t = torch.where(torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.5,
                      torch.randint(0, V, (3, 20)), torch.full((3, 20), V))
    with sanitized() as s:
        roll = sdtt_rollout(_teacher(weight), z_t, torch.full((3,), 0.5), 0.2, schedule=get_schedule("loglinear"),
                            vocab_size=V, generators=[keyed_generator("t", i) for i in range(3)], n_steps=2)
        on_device = [getattr(x, "_mcd_on_device", False) for x in (roll.target_logp, roll.z_final, roll.reveal_step)]
    assert on_device == [True, True, True] and not s.violations


def test_the_sanitizer_names_an_op_that_mixes_and_allows_legal_moves():
    from mcd_scale.distill.loss import mcd_loss

    x = torch.randint(0, V, (2, 5))
    z_t = torch.full_like(x, V)
    z_s = torch.where(torch.arange(5) < 2, x, torch.full_like(x, V))
    logits = torch.nn.Parameter(torch.randn(2, 5, V + 1))  # a device tensor (parameters always are)
    host_target = torch.log_softmax(torch.randn(2, 5, V), -1)
    with pytest.raises(DeviceMixError, match=r"mcd_scale/distill/loss\.py:\d+ in mcd_loss\(\)"):
        with sanitized():
            mcd_loss(logits, x.to(STAND_IN), z_t.to(STAND_IN), z_s.to(STAND_IN), host_target, V, validate=False)
    with sanitized() as s:  # the same call with the target moved: clean, and the host originals stay host
        target = host_target.to(STAND_IN)
        mcd_loss(logits, x.to(STAND_IN), z_t.to(STAND_IN), z_s.to(STAND_IN), target, V, validate=False)
        assert getattr(target, "_mcd_on_device") and not getattr(host_target, "_mcd_on_device", False)
    assert not s.violations


def _write_tokens(directory: str, vocab: int, seq_len: int) -> None:
    import numpy as np

    from mcd_scale.data.loader import TOKENS_FORMAT, TOKENS_FORMAT_VERSION
    from mcd_scale.data.manifest import write_manifest
    from mcd_scale.data.shards import write_shards
    from mcd_scale.rng import keyed_generator

    rows = torch.randint(0, vocab, (48, seq_len), generator=keyed_generator("sanitizer-tokens", vocab)).numpy()
    rows = rows.astype(np.uint16)
    splits = {}
    for split, data in (("train", rows[:32]), ("val", rows[32:])):
        shards = write_shards(os.path.join(directory, split), ((g, {"ids": r}) for g, r in enumerate(data)), 16)
        splits[split] = {"dir": split, "num_samples": len(data), "shards": shards}
    write_manifest(directory, {"format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION,
                               "vocab_size": vocab, "mask_id": vocab, "seq_len": seq_len, "dtype": str(rows.dtype),
                               "splits": splits, "tokenizer": {"sha256": "sanitizer"}})


def menu_overrides(menu: str) -> list[str]:
    if menu == "tp_zero3":
        return ["parallel.tp=2", "parallel.pp=1", "parallel.zero_stage=3"]
    return ["parallel.tp=1", "parallel.pp=2", "parallel.zero_stage=1"]


def run_objectives(root: str, menu: str) -> dict:
    """One rank: a 1-step teacher, then 1 step of MCD online and of SDTT from it, all under one sanitizer."""
    from mcd_scale.config import load_config, validate_layout
    from mcd_scale.parallel import collectives
    from mcd_scale.parallel.distributed import init_distributed
    from mcd_scale.training.trainer import run_training

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = TINY + menu_overrides(menu) + [
        f"data.path={os.path.join(root, 'tokens')}", "data.num_workers=0", "train.steps=1", "train.eval_every=1",
        "train.eval_batches=1", "train.log_every=1", "parallel.micro_batch=2", "parallel.global_batch=4",
        "logging.tensorboard=false", "schedule.warmup_steps=1", "train.ema_decay=0"]
    codes = {}
    with DeviceSanitizer() as s:
        dims = init_distributed(*(2, 1) if menu == "tp_zero3" else (1, 2))
        assert dims.device is STAND_IN
        if collectives.rank() == 0:
            _write_tokens(os.path.join(root, "tokens"), 61, 16)
        collectives.barrier()
        teacher = os.path.join(root, "teacher")
        runs = {"mdlm": ("configs/tiny/teacher.yaml", [f"run.dir={teacher}"])}
        if menu == "tp_zero3":  # a teacher inside the job needs pp = 1 (the config refuses it on the 3D menu)
            runs.update({
                "mcd_online": ("configs/tiny/distill.yaml", [f"run.dir={root}/mcd", f"distill.teacher={teacher}",
                                                             "distill.teacher_mode=online"]),
                "sdtt": ("configs/tiny/distill.yaml", [f"run.dir={root}/sdtt", f"distill.teacher={teacher}",
                                                       "train.objective=sdtt"])})
        for name, (cfg_file, extra) in runs.items():
            cfg = load_config([os.path.join(repo, cfg_file)], common + extra)
            validate_layout(cfg, dims.world_size)
            codes[name] = run_training(cfg, dims)
    return {"codes": codes, "violations": [str(v) for v in s.violations], "ops_seen": s.ops_checked}


def sample_under_sanitizer(teacher: str) -> dict:
    """One process without model-parallel groups (the weights load whole): both samplers on the stand-in
    device from the teacher's consolidated weights, as tools/sample.py runs them (the network built
    single-process and moved to the device; keyed draws on the host, moved once per step)."""
    from mcd_scale.config import load_config
    from mcd_scale.diffusion.sampling import ancestral_sample, coupled_sample
    from mcd_scale.diffusion.schedules import get_schedule
    from mcd_scale.distill.checkpoints import resolve_teacher_file
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config([os.path.join(repo, "configs/tiny/teacher.yaml")], TINY + ["parallel.tp=1", "parallel.pp=1"])
    model = build_model(cfg, None, init=False, dtype=torch.float32).eval()
    load_full_state_dict(model, load_safetensors(resolve_teacher_file(teacher)), None)
    model = DeviceSanitizer.on_device(model.to(STAND_IN))
    m = cfg.model
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    shapes = []
    with DeviceSanitizer() as s, torch.no_grad():
        for fn in (ancestral_sample, coupled_sample):
            res = fn(lambda z, t: model(z, t), 2, m.seq_len, 4, m.vocab_size, schedule, 0,
                     time_conditioned=m.time_conditioning, device=STAND_IN)
            shapes.append(tuple(res.tokens.shape))
    return {"shapes": shapes, "violations": [str(v) for v in s.violations]}


def test_tp_zero3_menu_mdlm_mcd_online_sdtt_and_sampling_under_the_sanitizer(tmp_path):
    results = run_ranks("tests.test_device_sanitizer:run_objectives", world_size=2,
                        kwargs={"root": str(tmp_path), "menu": "tp_zero3"}, timeout=240)
    for rank, res in enumerate(results):
        assert res["codes"] == {"mdlm": 0, "mcd_online": 0, "sdtt": 0}, (rank, res)
        assert res["violations"] == [], (rank, res["violations"])
    (sampled,) = run_ranks("tests.test_device_sanitizer:sample_under_sanitizer", world_size=1,
                           kwargs={"teacher": str(tmp_path / "teacher")}, timeout=120)
    assert sampled == {"shapes": [(2, 16), (2, 16)], "violations": []}, sampled


def test_3d_menu_mdlm_precompute_and_offline_mcd_under_the_sanitizer(tmp_path):
    """MDLM in-process; the precompute tool and offline MCD through the sanitizer's runner (python -m
    mcd_scale.testing.device_sanitizer ...), which exits 3 naming every op that mixed."""
    root = str(tmp_path)
    results = run_ranks("tests.test_device_sanitizer:run_objectives", world_size=2,
                        kwargs={"root": root, "menu": "3d"}, timeout=240)
    for rank, res in enumerate(results):
        assert res["codes"]["mdlm"] == 0 and res["violations"] == [], (rank, res)
    teacher, traj = os.path.join(root, "teacher"), os.path.join(root, "traj")
    runner = ["-m", "mcd_scale.testing.device_sanitizer"]
    sets = [a for o in TINY + menu_overrides("3d") + [
        f"data.path={root}/tokens", "data.num_workers=0", "train.steps=1", "train.eval_every=0", "train.log_every=1",
        "parallel.micro_batch=2", "parallel.global_batch=4", "logging.tensorboard=false", "train.ema_decay=0",
        "schedule.warmup_steps=1", "distill.teacher_mode=offline", "distill.top_k=8", f"distill.teacher={teacher}",
        f"data.trajectories={traj}", f"run.dir={root}/mcd_offline"] for a in ("--set", o)]
    codes, log = run_cli_ranks(runner + ["tools/precompute_trajectories.py", "--teacher", teacher, "--data",
                                         f"{root}/tokens", "--out", traj, "--config", "configs/tiny/distill.yaml",
                                         "--samples-per-shard", "16", "--batch-size", "8", "--no-progress",
                                         *sets], world_size=2, timeout=180)
    assert codes == [0, 0] and log.count("device sanitizer: no device mixing") == 2, log[-4000:]
    codes, log = run_cli_ranks(runner + ["-m", "mcd_scale.train", "--config", "configs/tiny/distill.yaml", *sets],
                               world_size=2, timeout=180)
    assert codes == [0, 0] and log.count("device sanitizer: no device mixing") == 2, log[-4000:]
