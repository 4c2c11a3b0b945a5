"""Training a student on the honest ceiling's own per-token targets (docs/ceiling.md, "Can a network reach
the ceiling?").

The MCD loss's population optimum is a per-token distribution; SGD on single coupled draws estimates it
with one draw per step. Here each training state gets the optimum itself, estimated from K teacher
continuations per position class (``mcd-ceiling`` in mcd_scale/eval/ideal_student.py), and the student is
fitted to it by cross-entropy onto the target (forward KL to the optimum, minimised by q = target). If a
network of this size can represent the optimum on the states it meets, the student sampled at the
ceiling's step count approaches the ceiling's quality; if not, this bounds what the loss can deliver with
this network.

States: clean sequences from the prepared data (train split for training, val for early stopping), a
grid step k of the sampler's grid uniformly, z_t by the forward process at t = times[k] (each token masked
with probability 1 - alpha_t), keyed by (purpose, seed, split, index). Early stopping on the held-out
states' target cross-entropy (a proxy: the matched-entropy score needs sampling and is measured once at the
end).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import yaml

from mcd_scale.diffusion.sampling import ancestral_sample, sampling_times
from mcd_scale.diffusion.schedules import Schedule, get_schedule
from mcd_scale.rng import keyed_generator
from mcd_scale.checkpoint.integrity import verify_file
from mcd_scale.config import from_dict
from mcd_scale.eval.ideal_student import IdealStudent
from mcd_scale.eval.synthetic import load_source


SPLITS = ("train", "val", "heldout")


@dataclass
class TargetSet:
    """States and the ceiling's log q at their masked positions (-inf rows elsewhere are never read)."""
    z: torch.Tensor        # [N, L] int64, mask id = V
    t: torch.Tensor        # [N] float32 grid times
    logq: torch.Tensor     # [N, L, V] float32 log targets (rows at unmasked positions: zeros, unused)


def forward_states(x: torch.Tensor, steps: int, schedule: Schedule, V: int, seed: int, split: str):
    """(z_t [N, L], t [N]): a grid step per row (cycled, so every step is covered equally) and the forward
    process's masks, keyed per row."""
    times = sampling_times(steps)
    N, L = x.shape
    ks = torch.arange(N) % steps
    t = times[ks]
    alpha = schedule.alpha(t)
    z = x.clone()
    for i in range(N):
        u = torch.rand(L, generator=keyed_generator("multidraw-forward", seed, SPLITS.index(split), i),
                       dtype=torch.float64)
        z[i][u >= alpha[i]] = V
    return z, t.float()


def build_targets(ceiling: Callable, z: torch.Tensor, t: torch.Tensor, V: int, batch: int = 8,
                  log: Optional[Callable[[str], None]] = None) -> TargetSet:
    """The ceiling (an IdealStudent of kind mcd-ceiling) at every state; rows grouped by time (one grid step
    per call, as the ceiling requires)."""
    N, L = z.shape
    logq = torch.zeros(N, L, V)
    done = 0
    for tv in torch.unique(t):
        rows = (t == tv).nonzero().flatten()
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            out = ceiling(z[r], t[r])[..., :V].float()
            logq[r] = torch.where(torch.isfinite(out), out, torch.full_like(out, -1e4))
            done += len(r)
            if log:
                log(f"targets: {done}/{N}")
    return TargetSet(z, t, logq)


def target_cross_entropy(logits: torch.Tensor, targets: TargetSet, idx: torch.Tensor, V: int) -> torch.Tensor:
    """Mean over masked positions of CE(target, student) = -sum_v q_v log p_v (forward KL to the target
    plus its entropy)."""
    z = targets.z[idx]
    masked = z == V
    logp = torch.log_softmax(logits[..., :V].float(), -1)
    q = targets.logq[idx].exp()
    ce = -(q * logp).sum(-1)
    return (ce * masked).sum() / masked.sum().clamp(min=1)


def target_entropy(targets: TargetSet, V: int) -> float:
    """Mean over masked positions of H(q): the floor of :func:`target_cross_entropy` (CE - H = KL(q || p))."""
    masked = targets.z == V
    q = targets.logq.exp()
    h = -(q * targets.logq).sum(-1)
    return float((h * masked).sum() / masked.sum().clamp(min=1))


def save_targets(path: str, targets: TargetSet, meta: dict) -> None:
    """The targets as safetensors (no pickle), with what they were built from in the metadata; written atomically."""
    from safetensors.torch import save_file
    save_file({"z": targets.z.contiguous(), "t": targets.t.contiguous(), "logq": targets.logq.contiguous()},
              path + ".tmp", metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(path + ".tmp", path)


def load_targets(path: str, meta: Optional[dict] = None) -> TargetSet:
    """Targets saved by :func:`save_targets`; with ``meta``, refused (ValueError naming the field) if built from
    other settings."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as fh:
        saved = {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
        for k, v in (meta or {}).items():
            if saved.get(k) != v:
                raise ValueError(f"{path}: targets built with {k}={saved.get(k)!r}, this run asks {v!r}; "
                                 "pass another --targets-cache or delete this file")
        return TargetSet(fh.get_tensor("z"), fh.get_tensor("t"), fh.get_tensor("logq"))


def target_disagreement(a: TargetSet, b: TargetSet, V: int) -> float:
    """Mean over masked positions of the Jensen-Shannon divergence (nats, at most log 2) between two estimates of
    the same targets (other draw seeds). The targets carry Monte Carlo noise from their K draws, and each
    estimate gives no mass to tokens none of its draws produced, so KL between two estimates is dominated by
    those holes; JS stays finite. A student fitted on one draw set meets this noise on held-out states."""
    masked = a.z == V
    m = torch.logaddexp(a.logq, b.logq) - math.log(2.0)
    js = 0.5 * (a.logq.exp() * (a.logq - m)).sum(-1) + 0.5 * (b.logq.exp() * (b.logq - m)).sum(-1)
    return float((js * masked).sum() / masked.sum().clamp(min=1))


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def train_on_targets(model: torch.nn.Module, train: TargetSet, val: TargetSet, V: int, lr: float = 3e-4,
                     batch: int = 16, max_epochs: int = 40, patience: int = 4, seed: int = 0,
                     log: Optional[Callable[[str], None]] = None) -> dict:
    """Adam on the target cross-entropy; the weights of the best held-out epoch are restored."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            idx = torch.arange(len(val.z))
            return float(target_cross_entropy(model(val.z, val.t), val, idx, V))

    floor = target_entropy(val, V)  # CE - floor = KL(target || student) on the held-out states
    best, best_state, history, since = val_loss(), _snapshot(model), [], 0
    history.append({"epoch": 0, "val_ce": best, "val_kl": best - floor})
    for epoch in range(1, max_epochs + 1):
        model.train()
        perm = torch.randperm(len(train.z), generator=gen)
        total = 0.0
        for s in range(0, len(perm), batch):
            idx = perm[s:s + batch]
            loss = target_cross_entropy(model(train.z[idx], train.t[idx]), train, idx, V)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(idx)
        v = val_loss()
        history.append({"epoch": epoch, "train_ce": total / len(perm), "val_ce": v, "val_kl": v - floor})
        if log:
            log(f"epoch {epoch}: train CE {total / len(perm):.4f}, held-out CE {v:.4f} (KL to the targets {v - floor:.4f})")
        if v < best - 1e-4:
            best, since = v, 0
            best_state = _snapshot(model)
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return {"best_val_ce": best, "val_target_entropy": floor, "val_kl_start": history[0]["val_kl"],
            "best_val_kl": best - floor, "history": history}


def load_model_file(path: str, device: str = "cpu"):
    """(model, cfg) of a model.safetensors with its config.resolved.yaml beside it, fp32, single process."""
    # lazy: loads megatron; importing this module does not need it
    from mcd_scale.model.build import build_model
    from mcd_scale.model.weights import load_full_state_dict, load_safetensors

    resolved = os.path.join(os.path.dirname(path), "config.resolved.yaml")
    if not os.path.isfile(path) or not os.path.isfile(resolved):
        raise FileNotFoundError(f"{path}: need a model.safetensors with config.resolved.yaml beside it")
    verify_file(path)
    with open(resolved, encoding="utf-8") as fh:
        cfg = from_dict(yaml.safe_load(fh), source=resolved)
    cfg.train.precision = "fp32"
    cfg.parallel.activation_checkpointing = False
    model = build_model(cfg, None, init=False, dtype=torch.float32).eval().to(device)
    load_full_state_dict(model, load_safetensors(path), None)
    return model, cfg


def run_experiment(teacher_path: str, data: str, chain_path: str, out: str, steps: int = 16, draws: int = 8,
                   groups: int = 3, continuation_steps: int = 64, train_states: int = 192, val_states: int = 32,
                   num_samples: int = 32, temperatures=(0.8, 0.9, 1.0), seed: int = 0, max_epochs: int = 40,
                   lr: float = 3e-4, targets_cache: Optional[str] = None, noise_check: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Targets from the ceiling on the teacher, the student (the teacher's weights) fitted to them, and the
    student's samples at ``steps`` written as samples JSONL rows (model "mcd-multidraw") to ``out``."""
    # lazy: loads webdataset; importing this module does not need it
    from mcd_scale.data.loader import open_prepared

    teacher, cfg = load_model_file(teacher_path)
    student, _ = load_model_file(teacher_path)
    chain = load_source(chain_path)
    V, L = cfg.model.vocab_size, cfg.model.seq_len
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)

    def teacher_fn(z, t):
        with torch.no_grad():
            return teacher(z, t).float()

    ceiling = IdealStudent("mcd-ceiling", chain, teacher_fn, steps, schedule, draws=draws, seed=seed + 101,
                           groups=groups, continuation_steps=continuation_steps)

    def states(split: str, n: int):
        ds = open_prepared(data, split)
        if len(ds) < n:
            raise ValueError(f"{data}: split {split} has {len(ds)} sequences, need {n}")
        x = torch.stack([torch.as_tensor(ds[i]["ids"].astype("int64")) for i in range(n)])
        return forward_states(x, steps, schedule, V, seed, split)

    start = time.perf_counter()
    meta = {"teacher": os.path.abspath(teacher_path), "steps": steps, "draws": draws, "groups": groups,
            "continuation_steps": continuation_steps, "seed": seed}

    def cached(name: str, meta_of: dict, build: Callable[[], TargetSet]) -> TargetSet:
        """Targets read from ``{targets_cache}.{name}.safetensors`` when built before with the same settings,
        else built (and written there when a cache is given)."""
        path = f"{targets_cache}.{name}.safetensors" if targets_cache else None
        if path and os.path.exists(path):
            log(f"targets: {name} read from {path}")
            return load_targets(path, meta_of)
        built = build()
        if path:
            save_targets(path, built, meta_of)
        return built

    tr = cached("train", {**meta, "states": train_states},
                lambda: build_targets(ceiling, *states("train", train_states), V, log=log))
    va = cached("val", {**meta, "states": val_states},
                lambda: build_targets(ceiling, *states("val", val_states), V, log=log))
    log(f"targets ready in {time.perf_counter() - start:.0f} s")
    noise = None
    if noise_check:  # the held-out targets again from independent draws: their Monte Carlo noise, in nats
        other = IdealStudent("mcd-ceiling", chain, teacher_fn, steps, schedule, draws=draws, seed=seed + 202,
                             groups=groups, continuation_steps=continuation_steps)
        va2 = cached("val_noise", {**meta, "seed": seed + 202, "states": val_states},
                     lambda: build_targets(other, va.z, va.t, V, log=log))
        noise = target_disagreement(va, va2, V)
        log(f"target noise: Jensen-Shannon divergence between two draw sets of the held-out targets {noise:.4f} nats")
    fit = train_on_targets(student, tr, va, V, lr=lr, seed=seed, max_epochs=max_epochs, log=log)

    def student_fn(z, t):
        with torch.no_grad():
            return student(z, t).float()

    with open(out + ".tmp", "w", encoding="utf-8") as fh:
        for temp in temperatures:
            res = ancestral_sample(student_fn, num_samples, L, steps, V, schedule, seed, temperature=temp,
                                   batch_size=16, time_conditioned=cfg.model.time_conditioning)
            for ids in res.tokens.tolist():
                fh.write(json.dumps({"benchmark": "synthetic", "model": "mcd-multidraw", "round": 1, "steps": steps,
                                     "temperature": temp, "ids": ids, "text": " ".join(map(str, ids)),
                                     "draws": None, "target_draws": draws, "groups": groups,
                                     "train_states": train_states, "nfe": res.nfe,
                                     "seconds_per_sample": res.seconds / num_samples}) + "\n")
    os.replace(out + ".tmp", out)
    summary = {k: fit[k] for k in ("best_val_ce", "val_target_entropy", "val_kl_start", "best_val_kl", "history")}
    summary.update(seconds=time.perf_counter() - start, train_states=train_states, val_states=val_states, lr=lr,
                   target_noise_js=noise)
    with open(out + ".fit.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return summary
