"""Draws figs/pipeline.png, the BiSSL pipeline figure of the README.

    python figs/make_pipeline_figure.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, x, y, w, h, title, body, colour):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="k", lw=1.2))
    ax.text(x + w / 2, y + h - 0.07, title, ha="center", va="top", fontsize=11, weight="bold")
    ax.text(x + w / 2, y + h - 0.22, body, ha="center", va="top", fontsize=8.5, linespacing=1.4)


def arrow(ax, start, end, text=""):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.5))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.05, text, ha="center", fontsize=8, style="italic")


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 4.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4.2)
    ax.axis("off")
    box(ax, 0.2, 1.45, 3.0, 1.55, "1  ssl_pre-training.py",
        "SimCLR or BYOL on unlabelled images\n(ImageNet, 500 epochs, LARS)\n\n→ pretext_<type>_arch-<arch>\n    _bb.pth, _proj.pth (, _pred.pth)",
        "#dbe9f6")
    box(ax, 4.3, 0.75, 3.6, 2.85, "2  bissl.py",
        "head warmup (backbone frozen)\nthen T alternations of\n\nlower: N_L LARS steps on\n  L_P(θ_P, ψ) + λ/2 ‖θ_P − θ_D‖²\n"
        "upper: N_U SGD steps on L_D with\n  x = (I + H/(λ+δ))⁻¹ ∇L_D(θ_P, φ)\n  (CG on Hessian-vector products)\n"
        "  g_θD = x + γ ∇L_D(θ_D, φ)\n\n→ BiSSL-backbone_…_dset-<d>.pth (θ_P)",
        "#fde7c8")
    box(ax, 9.0, 1.45, 2.8, 1.55, "3  fine-tuning.py",
        "backbone + new linear head\nSGD, cosine, 400 epochs\n\nrandom (lr, wd) grid: 100 trials\nthen 10 seeds at the best pair\n→ results table",
        "#dff0d8")
    arrow(ax, (3.3, 2.2), (4.2, 2.2), "θ_P, ψ")
    arrow(ax, (8.0, 2.2), (8.9, 2.2), "θ_P")
    fig.tight_layout()
    out = Path(__file__).with_name("pipeline.png")
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
