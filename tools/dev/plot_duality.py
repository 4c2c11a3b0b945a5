"""Plot the Gaussian–masked duality: reveal rate vs t for both threshold forms against alpha_t, and the
masking times of the tokens along one coupled trajectory.

    python tools/dev/plot_duality.py [--out docs/duality.png] [--K 50258] [--schedule loglinear]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mcd_scale.diffusion.duality import masking_times, reveal_thresholds  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/duality.png")
    ap.add_argument("--K", type=int, default=50258, help="Gaussian dimension (vocabulary incl. mask)")
    ap.add_argument("--schedule", default="loglinear", choices=("loglinear", "cosine"))
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per form for the reveal-rate curve")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens in the trajectory panel")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sched = get_schedule(args.schedule)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    alpha = sched.alpha(t)
    ids = torch.arange(args.tokens // args.seq_len)
    forms = {"uniform": reveal_thresholds(ids, args.seq_len, args.seed, form="uniform"),
             f"Gaussian (K={args.K})": reveal_thresholds(ids, args.seq_len, args.seed, form="gaussian", K=args.K)}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    ax1.plot(t, alpha, "k-", lw=2, label=r"$\alpha_t$")
    for (name, u), style in zip(forms.items(), ("C0o", "C1x")):
        rate = (u.flatten()[None, :] < alpha[:, None]).double().mean(1)
        ax1.plot(t[::5], rate[::5], style, ms=5, label=f"reveal rate, {name}")
    ax1.set(xlabel="t", ylabel="P(token revealed)", title=f"Reveal rate vs t ({args.tokens} tokens/form)")
    ax1.legend(fontsize=8)

    # One trajectory: token l is revealed (white) for t < tau_l and masked (dark) after.
    u = reveal_thresholds(torch.tensor([args.seed]), args.seq_len, args.seed, form="gaussian", K=args.K)[0]
    tau = masking_times(u, sched)
    revealed = (t[:, None] < tau[None, :]).double()
    ax2.imshow(revealed.numpy(), aspect="auto", origin="lower", cmap="Greys_r", extent=(-0.5, args.seq_len - 0.5, 0, 1),
               interpolation="nearest")
    ax2.plot(range(args.seq_len), tau.numpy(), "r.", ms=4, label=r"masking time $\tau_\ell$")
    ax2.set(xlabel="token position", ylabel="t", title="One coupled trajectory (white = revealed)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
