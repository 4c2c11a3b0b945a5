#!/usr/bin/env python
"""Few-step student vs many-step teacher: wall clock per sample, side by side. Prints one JSON object.

    python tools/bench/sampling.py                               # demo synthetic shape, ~2 min on 2 cores
    python tools/bench/sampling.py --checkpoint runs/demo/synthetic_teacher --batch-sizes 8 16 64
    python tools/bench/sampling.py --config configs/tiny/teacher.yaml --set model.seq_len=128
    python tools/bench/sampling.py --large-vocab --repeats 3   # V = 50,257, L = 1,024, stub network

Sampling cost does not depend on the weights, so without ``--checkpoint`` a randomly initialised model
of the config's shape (default: the demo's synthetic teacher, 2x128 at L = 256, V = 64) stands for
both teacher and student. For each batch size (rows per sampler call) the ancestral sampler runs at
``--many-steps`` N and at N/16 steps in the same process, alternating, ``--repeats`` times; the figures
are medians. Each chunk of samples runs teacher then student back to back (a timed pair).
``speedup_wall`` = teacher s/sample / student s/sample (medians) at the same batch size;
``speedup_wall_paired`` = median over pairs of the pair's ratio (the least noise-sensitive figure on a
shared machine); ``speedup_wall_min`` = ratio of the fastest runs;
``speedup_wall_best`` compares each at its own fastest batch size; ``speedup_nfe`` is the ratio of
network calls per sample, which bounds what caching leaves to gain (~10.1x at N = 256, L = 256).
``--few-steps`` / ``--few-reveal-order strided``: the few-step side at another step count and/or with the
coupled sampler's strided order (docs/diffusion.md), e.g. the strided teacher at 8 steps against itself
at 256 (docs/log.md, "Reveal order").

In the same timed groups (unless ``--no-strided`` / ``--no-ar``): the few-step side again with the strided
order (``student_strided_*``, when the few-step side is not already strided), and an autoregressive model of
the same width, depth, heads and FFN (``mcd_scale.eval.ar_evaluator.CausalLM``, random weights) sampling the
same number of tokens left to right with a KV cache (``mcd_scale.eval.ar_sampling``), the speed reference:
``ar_*``, ``student_vs_ar`` = AR s/sample / student s/sample. Every side also reports ``*_tokens_per_s``
(sequence length / s per sample).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (REPO,):
    if p not in sys.path:
        sys.path.insert(0, p)
import torch  # noqa: E402


def large_vocab_row(device, vocab_size: int = 50257, seq_len: int = 1024, steps=(1, 16), repeats: int = 3) -> dict:
    """Our per-step sampler work at a real vocabulary (stub network: fixed random logits [1, L, V + 1] on the
    device, returned at no cost) against a bare ``softmax + multinomial`` over the same logits on the same
    device (what a sampler that draws every position each step does). ``all_positions``: one step reveals
    all L tokens, the same draws on both sides (the like-for-like ratio, target <= 1.2); ``steps_N``: our
    mean step at N steps (L/N reveals a step) against the bare draw of all L positions. Medians of
    ``repeats``. ``host_gumbel_s_per_position``: the former host-side float64 Gumbel noise (positions x V),
    timed on 64 positions, for reference."""
    import time

    import numpy as np

    from mcd_scale.diffusion.sampling import coupled_sample, token_gumbel_rows
    from mcd_scale.diffusion.schedules import get_schedule

    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (3.0 * torch.randn(1, seq_len, vocab_size + 1, generator=gen)).to(device)
    schedule = get_schedule("loglinear", 1e-3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stub(z, t):
        return logits[: z.shape[0]]

    def bare() -> float:
        sync()
        t0 = time.perf_counter()
        probs = torch.softmax(logits[0, :, :vocab_size], dim=-1)
        torch.multinomial(probs, 1).cpu()
        sync()
        return time.perf_counter() - t0

    def ours(n_steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        coupled_sample(stub, 1, seq_len, n_steps, vocab_size, schedule, seed=0, device=device)
        sync()
        return (time.perf_counter() - t0) / n_steps

    bare(), ours(1)  # warm-up (allocator, kernels)
    base = statistics.median(bare() for _ in range(repeats))
    row = {"vocab_size": vocab_size, "seq_len": seq_len, "device": str(device), "repeats": repeats,
           "bare_softmax_multinomial_s": round(base, 6)}
    for n in steps:
        ours_s = statistics.median(ours(n) for _ in range(repeats))
        key = "all_positions" if n == 1 else f"steps_{n}"
        row[key] = {"ours_s_per_step": round(ours_s, 6), "ratio_vs_bare": round(ours_s / base, 3),
                    "reveals_per_step": seq_len / n}
    t0 = time.perf_counter()
    token_gumbel_rows(0, 0, np.arange(64), vocab_size, "bench")
    row["host_gumbel_s_per_position"] = round((time.perf_counter() - t0) / 64, 6)
    row["target_ratio"] = 1.2
    row["meets_target"] = row["all_positions"]["ratio_vs_bare"] <= 1.2
    return row


def _load(a, device):
    from mcd_scale import inference as sample_cli

    if a.checkpoint:
        return sample_cli.load_model(a.checkpoint, device=device)
    from mcd_scale.config import load_config

    cfg = load_config([os.path.join(REPO, a.config)], list(a.overrides))
    return sample_cli.single_process_model(cfg, init=True, weights_path="random-init", device=device)


def _ar_model(loaded, device):
    """The speed reference: the project's causal LM at the diffusion model's width, depth, heads and FFN
    (random weights: the cost of sampling does not depend on them)."""
    from mcd_scale.eval.ar_evaluator import ARConfig, CausalLM, _init_weights

    m = loaded.cfg.model
    model = CausalLM(ARConfig(vocab_size=loaded.vocab_size, max_len=loaded.seq_len, hidden=m.hidden, layers=m.layers,
                              heads=m.heads, ffn=m.ffn_hidden))
    _init_weights(model, 0)
    return model.to(device).eval()


def _ar_seconds(model, n: int, length: int, seed: int, device) -> float:
    import time

    from mcd_scale.eval.ar_sampling import generate

    t0 = time.perf_counter()
    generate(model, n, length, seed)  # returns host ids: the device's work is included
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="run dir / checkpoint / model.safetensors (default: random)")
    ap.add_argument("--config", default="configs/demo/synthetic_teacher.yaml", help="shape when no --checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--many-steps", type=int, default=256)
    ap.add_argument("--few-steps", type=int, default=None, help="default: many-steps / 16")
    ap.add_argument("--few-reveal-order", choices=["random", "strided"], default="random",
                    help="strided: the few-step side uses the coupled sampler's strided order")
    ap.add_argument("--num-samples", type=int, default=32, help="samples per measurement")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    ap.add_argument("--no-strided", dest="strided", action="store_false",
                    help="skip the strided few-step side (measured by default)")
    ap.add_argument("--no-ar", dest="ar", action="store_false",
                    help="skip the autoregressive KV-cache reference (measured by default)")
    ap.add_argument("--large-vocab", action="store_true",
                    help="only the real-vocabulary row: V = --vocab, L = --length, stub network, our sampler vs a "
                         "bare softmax + multinomial (target <= 1.2x)")
    ap.add_argument("--vocab", type=int, default=50257, help="--large-vocab's vocabulary (GPT-2's by default)")
    ap.add_argument("--length", type=int, default=1024, help="--large-vocab's sequence length")
    a = ap.parse_args(argv)
    from mcd_scale.parallel.device import DeviceFlagError, resolve_device

    try:
        device = resolve_device(a.device)
    except DeviceFlagError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.large_vocab:
        print(json.dumps(large_vocab_row(device, a.vocab, a.length, repeats=max(a.repeats, 1)), indent=1))
        return 0
    from mcd_scale import inference as sample_cli

    loaded = _load(a, device)
    few = a.few_steps or max(a.many_steps // 16, 1)
    if few < 1 or few >= a.many_steps:
        print(f"bench: error: --few-steps must be in [1, --many-steps), got {few}", file=sys.stderr)
        return 2
    strided = a.few_reveal_order == "strided"
    few_kwargs = dict(sampler="coupled", reveal_order="strided") if strided else {}
    sides = {"teacher": (a.many_steps, {}), "student": (few, few_kwargs)}
    if a.strided and not strided:
        sides["student_strided"] = (few, dict(sampler="coupled", reveal_order="strided"))
    ar_model = _ar_model(loaded, device) if a.ar else None
    L = loaded.seq_len
    sample_cli.sample(loaded, few, min(4, a.num_samples), seed=0, **few_kwargs)  # warm-up (allocator, kernels)
    if ar_model is not None:
        _ar_seconds(ar_model, min(4, a.num_samples), L, 0, device)
    per_batch, nfe = {}, {}
    for bs in a.batch_sizes:
        # Every side runs back to back on each chunk of bs samples (a timed group), so a burst of machine noise
        # (another process, the host reclaiming memory) hits a group rather than one side of a ratio.
        chunk = min(bs, a.num_samples)
        times = {name: [] for name in list(sides) + (["ar"] if ar_model is not None else [])}
        pair_ratios = []
        for rep in range(a.repeats):
            for first in range(0, a.num_samples, chunk):
                n = min(chunk, a.num_samples - first)
                group = {}
                for name, (steps, kwargs) in sides.items():
                    res = sample_cli.sample(loaded, steps, n, seed=1000 * rep + first, batch_size=bs, **kwargs)
                    group[name] = res.seconds / n
                    nfe.setdefault(name, []).append(res.nfe)
                if ar_model is not None:
                    group["ar"] = _ar_seconds(ar_model, n, L, 1000 * rep + first, device) / n
                for name, v in group.items():
                    times[name].append(v)
                pair_ratios.append(group["teacher"] / group["student"])
        med = {name: statistics.median(v) for name, v in times.items()}
        teacher, student = med["teacher"], med["student"]
        row = {"teacher_s_per_sample": round(teacher, 5), "student_s_per_sample": round(student, 5),
               "speedup_wall": round(teacher / student, 3),
               "speedup_wall_paired": round(statistics.median(pair_ratios), 3),
               "speedup_wall_min": round(min(times["teacher"]) / min(times["student"]), 3),
               "pairs": len(pair_ratios)}
        for name, v in med.items():
            row[f"{name}_s_per_sample"] = round(v, 5)
            row[f"{name}_tokens_per_s"] = round(L / v, 1)
        if "student_strided" in med:
            row["speedup_wall_strided"] = round(teacher / med["student_strided"], 3)
        if "ar" in med:
            row["student_vs_ar"] = round(med["ar"] / student, 3)
            row["teacher_vs_ar"] = round(med["ar"] / teacher, 3)
        per_batch[str(bs)] = row
    nfe = {name: statistics.fmean(v) for name, v in nfe.items()}
    best_teacher = min(v["teacher_s_per_sample"] for v in per_batch.values())
    best_student = min(v["student_s_per_sample"] for v in per_batch.values())
    out = {"model": loaded.weights_path, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "seq_len": loaded.seq_len, "vocab_size": loaded.vocab_size,
           "many_steps": a.many_steps, "few_steps": few, "few_reveal_order": a.few_reveal_order,
           "num_samples": a.num_samples, "repeats": a.repeats,
           "threads": torch.get_num_threads(), "nfe_teacher": round(nfe["teacher"], 2), "nfe_student": nfe["student"],
           "speedup_nfe": round(nfe["teacher"] / nfe["student"], 3), "per_batch_size": per_batch,
           "speedup_wall_best": round(best_teacher / best_student, 3)}
    if "student_strided" in nfe:
        out["nfe_student_strided"] = nfe["student_strided"]
    if ar_model is not None:
        out["ar_model"] = {**dataclasses.asdict(ar_model.cfg), "params": sum(p.numel() for p in ar_model.parameters()),
                           "nfe": loaded.seq_len, "kv_cache": True}
        out["diffusion_params"] = sum(p.numel() for p in loaded.model.parameters())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
