"""The CUDA-path fixes that a CPU can show: backend and device choice, fp32 gradient accumulation in the derived
DeepSpeed config and the memory plan, no host copy for loss stats, lazily prepared micro-batches, and preemption
handlers put back when the training loop returns."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.mp import REPO, run_ranks


def test_ds_accelerator_cpu_means_gloo_even_with_cuda_visible(monkeypatch):
    from mcd_scale.parallel.distributed import backend_for_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_for_device({"DS_ACCELERATOR": "cpu"}) == "gloo"
    assert backend_for_device({}) == "nccl" and backend_for_device({"DS_ACCELERATOR": "cuda"}) == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_for_device({}) == "gloo"


def test_cuda_device_index_agrees_with_deepspeed_under_every_binding():
    from mcd_scale.parallel.distributed import cuda_device_index

    assert [cuda_device_index(r, 8) for r in range(8)] == list(range(8))  # every GPU visible: cuda:LOCAL_RANK
    assert [cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # one visible GPU per rank
    with pytest.raises(ValueError, match="LOCAL_RANK 5 sees 2 CUDA devices"):
        cuda_device_index(5, 2)  # local_rank % count would put two ranks on one GPU
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        cuda_device_index(0, 0)


def _cfg(*overrides: str):
    from mcd_scale.config import load_config

    return load_config([os.path.join(REPO, "configs/teacher_1b.yaml")], list(overrides))


def test_zero3_bf16_accumulates_gradients_in_fp32_in_the_config_and_the_plan():
    from mcd_scale.parallel.deepspeed import deepspeed_config
    from mcd_scale.parallel.memory_plan import memory_plan

    cfg = _cfg("train.precision=bf16", "parallel.zero_stage=3")
    ds = deepspeed_config(cfg, 8)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"] == {"enabled": True}
    plan = memory_plan(cfg, 8)
    n = plan["parameters_tp_shard"] / cfg.parallel.pp
    assert plan["bytes"]["gradients"] == int(n * 4 / plan["dp"])  # fp32 partitions, not the model's bf16
    fp32 = _cfg("train.precision=fp32", "parallel.zero_stage=3")
    assert "data_types" not in deepspeed_config(fp32, 8)  # fp32 training accumulates in fp32 already
    zero1 = _cfg("train.precision=bf16", "parallel.zero_stage=1")
    assert "data_types" not in deepspeed_config(zero1, 8)


def test_deepspeed_builds_a_zero3_bf16_engine_with_fp32_gradient_partitions():
    """The key DeepSpeed reads: its ZeRO-3 optimizer's accumulation buffer is fp32 (world size 1, tiny model)."""
    results = run_ranks("tests.test_gpu_path:grad_accum_dtype_of_engine", world_size=1, timeout=180)
    assert results == ["torch.float32"]


def grad_accum_dtype_of_engine() -> str:
    from mcd_scale.config import load_config
    from mcd_scale.parallel.distributed import init_distributed
    from mcd_scale.training.engine import TrainEngine

    cfg = load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], [
        "model.vocab_size=61", "model.seq_len=16", "model.hidden=32", "model.layers=2", "model.heads=2",
        "model.ffn_hidden=64", "model.pad_vocab_multiple=8", "parallel.tp=1", "parallel.pp=1",
        "parallel.zero_stage=3", "train.precision=bf16", "parallel.micro_batch=2", "parallel.global_batch=4"])
    dims = init_distributed(1, 1)
    engine = TrainEngine(cfg, dims, lambda logits, labels: logits.float().mean())
    return str(engine.engine.optimizer.gradient_accumulation_dtype)


class _CountFactories(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tensor", "as_tensor", "scalar_tensor"):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_loss_stats_make_no_tensor_from_a_python_number():
    """torch.tensor(n, device=cuda) is a blocking host-to-device copy per micro-batch, for a stat nobody reads."""
    from mcd_scale.distill.loss import mcd_loss
    from mcd_scale.distill.sdtt import sdtt_loss

    V = 7
    x = torch.randint(0, V, (2, 5))
    z_t = torch.full_like(x, V)
    z_s = torch.where(torch.arange(5) < 2, x, z_t)
    logits = torch.randn(2, 5, V + 1)
    target = torch.log_softmax(torch.randn(2, 5, V), -1)
    with _CountFactories() as mode:
        _, stats = mcd_loss(logits, x, z_t, z_s, target, V, validate=False)
        _, sdtt_stats = sdtt_loss(logits, z_t, target, V)
    assert mode.calls == []
    assert stats["n_tokens"] == sdtt_stats["n_tokens"] == 10


def record_step_order(root: str) -> dict:
    """One rank: a 1-step online-MCD-free MDLM Trainer (grad_accum 2) with prepare/forward logged."""
    from mcd_scale.config import load_config
    from mcd_scale.parallel.distributed import init_distributed
    from mcd_scale.training.trainer import Trainer
    from tests.test_device_sanitizer import TINY, _write_tokens

    _write_tokens(os.path.join(root, "tokens"), 61, 16)
    cfg = load_config([os.path.join(REPO, "configs/tiny/teacher.yaml")], TINY + [
        f"data.path={root}/tokens", f"run.dir={root}/run", "data.num_workers=0", "train.steps=1",
        "train.eval_every=0", "parallel.micro_batch=2", "parallel.global_batch=4", "parallel.tp=1", "parallel.pp=1",
        "parallel.zero_stage=0", "logging.tensorboard=false", "train.ema_decay=0", "checkpoint.every=0"])
    dims = init_distributed(1, 1)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer = Trainer(cfg, dims)
    events = []
    prepare, forward = trainer.objective.prepare, trainer.engine.engine.forward

    def logged_prepare(*a, **k):
        events.append("prepare")
        return prepare(*a, **k)

    def logged_forward(*a, **k):
        events.append("forward")
        return forward(*a, **k)

    trainer.objective.prepare = logged_prepare
    trainer.engine.engine.forward = logged_forward
    code = trainer.fit()
    after = {s: signal.getsignal(s) for s in before}
    return {"code": code, "events": events, "handlers_restored": after == before}


def test_micro_batches_are_prepared_one_at_a_time_and_fit_restores_signal_handlers(tmp_path):
    (res,) = run_ranks("tests.test_gpu_path:record_step_order", world_size=1, kwargs={"root": str(tmp_path)},
                       timeout=180)
    assert res["code"] == 0
    assert res["events"] == ["prepare", "forward", "prepare", "forward"], res["events"]
    assert res["handlers_restored"], "Trainer.fit left its SIGTERM/SIGUSR1 handlers installed"


def test_preemption_flag_sets_on_signal_and_puts_the_old_handlers_back():
    from mcd_scale.signals import PreemptionFlag

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionFlag() as flag:
        assert signal.getsignal(signal.SIGUSR1) != before[signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signum == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before
