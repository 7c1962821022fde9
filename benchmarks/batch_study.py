r"""Large-batch CLIP in miniature: global batch size at a fixed number of samples seen.

    python benchmarks/batch_study.py                       # the table of docs/benchmarks.md
    python benchmarks/batch_study.py --batches 64 512 --losses sigmoid --samples 4096 \
        --out /tmp/batch_study_smoke.png                   # a smoke run (two minutes)
    python benchmarks/batch_study.py --plot-only rows.json # table and plot of saved rows

Trains ``experiments/clip_tiny.py`` (softmax loss) and ``experiments/siglip_tiny.py`` (sigmoid
loss) on the 32 px shapes dataset with a smaller tower (``--model-overrides``), once per global
batch size, every run seeing the same number of samples (``--samples``; so batch 4,096 makes
64x fewer updates than batch 64). Batches above ``--micro-batch`` are computed in micro-batches
(``optim.grad_accum_steps``; for contrastive losses gradient caching, which keeps every
negative: the loss and gradients are those of the whole batch), so each run is one update per
global batch, exactly as on a pod that holds the batch at once.

The learning rate follows the square-root rule for Adam (Malladi et al., "On the SDEs and
Scaling Rules for Adaptive Gradient Algorithms", 2022), anchored at the quickstart's
``lr=1e-3`` at batch 128: ``lr(B) = 1e-3 * sqrt(B / 128)`` (``--lr-rule``: also linear, or
constant as a control). The warm-up is a fixed fraction of the updates
(``--warmup-fraction``, default 10 %, as the quickstart's 100 of 1,200 rounded), then cosine
decay to zero. Everything else (AdamW b2 0.98, weight decay 0.2, clipping at norm 1, the
temperature and bias initialisations, seed 0) is the experiment's.

Each run is ``vlm_jax.train.train_and_evaluate`` in this process, one after another, in its own
workdir under ``--workdir`` (a temporary directory by default); it reports zero-shot top-1 and
retrieval R@1 in both directions on the shapes test split (2,000 examples, evaluated once, at
the end). The script prints a markdown table and writes a PNG (zero-shot top-1 and R@1 against
batch size, log x, one line per loss) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)
from vlm_jax import config as config_lib  # noqa: E402
from vlm_jax import train  # noqa: E402

EXPERIMENTS = {"softmax": "experiments/clip_tiny.py", "sigmoid": "experiments/siglip_tiny.py"}
BASE_LR, BASE_BATCH = 1e-3, 128  # clip_tiny's learning rate at its batch size.
ZEROSHOT_CHANCE = 1 / 30  # shapes zero-shot: 30 classes (colour x shape of the main object).
# The study's model: 32 px shapes, patch 8 (16 patches, as clip_tiny's 64 px / 16), towers of
# width 64 and depth 2 (clip_tiny: 128 and 4), small enough for 8 runs in ~40 minutes on 2 cores.
MODEL_OVERRIDES = (
    "data.config_name=32px",
    "model.embed_dim=64",
    "model.image.image_size=32", "model.image.patch_size=8", "model.image.width=64",
    "model.image.depth=2", "model.image.num_heads=2", "model.image.mlp_dim=256",
    "model.text.width=64", "model.text.depth=2", "model.text.num_heads=2",
    "model.text.mlp_dim=256",
    # clip_tiny's first recipe, with which the study was measured: class token, 24 tokens.
    "model.image.pool_type=tok", "model.text.context_length=24",
)


LR_RULES = {  # The learning rate at global batch B, from BASE_LR at BASE_BATCH.
    "sqrt": lambda b: BASE_LR * math.sqrt(b / BASE_BATCH),  # Adam (Malladi et al. 2022)
    "linear": lambda b: BASE_LR * b / BASE_BATCH,  # SGD (Goyal et al. 2017)
    "constant": lambda b: BASE_LR,  # no scaling: a control
}


def lr_for(batch: int, rule: str = "sqrt") -> float:
    """The learning rate at global batch ``batch`` under ``rule`` (a key of ``LR_RULES``)."""
    return LR_RULES[rule](batch)


def make_config(loss: str, batch: int, samples: int, micro_batch: int, warmup_fraction: float,
                model_overrides: list[str], lr_rule: str = "sqrt"):
    """The config of one run: ``samples // batch`` updates on global batches of ``batch``, in
    ``batch / micro_batch`` micro-batches when ``batch > micro_batch``."""
    if samples % batch:
        raise SystemExit(f"--samples {samples} is not a multiple of batch {batch}: every run "
                         "must see the same number of samples.")
    steps = samples // batch
    if steps < 2:
        raise SystemExit(f"--samples {samples} gives batch {batch} {steps} update(s); raise it.")
    accum = max(1, batch // micro_batch)
    if batch % accum:
        raise SystemExit(f"batch {batch} does not split into micro-batches of {micro_batch}.")
    warmup = min(steps - 1, max(1, round(warmup_fraction * steps)))
    overrides = [
        *model_overrides,
        f"batch_size={batch}", f"total_steps={steps}",
        f"log_every_steps={max(1, steps // 10)}",
        f"optim.lr={lr_for(batch, lr_rule)!r}", f"optim.warmup_steps={warmup}",
        f"optim.grad_accum_steps={accum}",
        f"checkpoint.every_steps={steps}", "checkpoint.keep=1",
        # Evaluated once, at the end, on the whole test split; no linear probe.
        "evals.zeroshot.every_steps=0", "evals.retrieval.every_steps=0",
        "eval.batch_size=500",
    ]
    return config_lib.load_config(os.path.join(REPO, EXPERIMENTS[loss]), overrides)


def plot(rows: list[dict], path: str, lr_rule: str = "sqrt") -> None:
    """Zero-shot top-1 and retrieval R@1 (both directions) against batch size, one line per
    loss."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    panels = [("zeroshot", "zero-shot top-1 (%)"), ("i2t", "R@1 image -> text (%)"),
              ("t2i", "R@1 text -> image (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    names = {"softmax": "softmax (CLIP)", "sigmoid": "sigmoid (SigLIP)"}
    for ax, (key, title) in zip(axes, panels):
        for loss, style in (("softmax", "o-"), ("sigmoid", "s--")):
            pts = sorted((r["batch"], 100 * r[key]) for r in rows if r["loss"] == loss)
            if pts:
                ax.plot(*zip(*pts), style, label=names[loss])
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [f"{b:,}" for b in batches])
        ax.set_xlabel("global batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].axhline(100 * ZEROSHOT_CHANCE, color="gray", ls=":", lw=1, label="chance")
    axes[0].legend()
    samples = rows[0]["samples"]
    rule = {"sqrt": f"{BASE_LR:g} x sqrt(B / {BASE_BATCH})",
            "linear": f"{BASE_LR:g} x B / {BASE_BATCH}", "constant": f"{BASE_LR:g}"}[lr_rule]
    fig.suptitle(f"shapes 32 px, {samples:,} samples seen per run, lr = {rule}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    """The markdown table of the runs."""
    lines = ["| loss | batch | micro-batches | lr | steps | warm-up | samples | zero-shot top-1 "
             "| R@1 i2t | R@1 t2i | final train loss | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['batch']:,} | {r['accum']} x {r['batch'] // r['accum']} "
            f"| {r['lr']:.2e} | {r['steps']} | {r['warmup']} | {r['samples']:,} "
            f"| {100 * r['zeroshot']:.1f} % | {100 * r['i2t']:.1f} % | {100 * r['t2i']:.1f} % "
            f"| {r['train_loss']:.3f} | {r['wall']:.0f} |")
    return "\n".join(lines)


def final_train_loss(workdir: str) -> float:
    """The last logged ``train/loss`` of a run (metrics.jsonl)."""
    last = float("nan")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                last = rec["train/loss"]
    return last


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--losses", nargs="+", choices=sorted(EXPERIMENTS),
                   default=["softmax", "sigmoid"])
    p.add_argument("--samples", type=int, default=131072,
                   help="samples seen by every run (a multiple of every batch size)")
    p.add_argument("--micro-batch", type=int, default=256,
                   help="batches above this are computed in micro-batches of this size")
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--lr-rule", choices=sorted(LR_RULES), default="sqrt",
                   help=f"the learning rate against batch, from {BASE_LR:g} at {BASE_BATCH}")
    p.add_argument("--model-overrides", nargs="*", default=list(MODEL_OVERRIDES),
                   help="config overrides (key=value) applied to every run")
    p.add_argument("--workdir", default="", help="run directories (default: a temporary one)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "batch_study.png"))
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--plot-only", default="", metavar="ROWS_JSON",
                   help="no training: table and plot from the rows a previous --json wrote")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as f:
            rows = json.load(f)
        print(table(rows))
        plot(rows, args.out, args.lr_rule)
        print(f"Plot: {args.out}")
        return

    configs = [(loss, b, make_config(loss, b, args.samples, args.micro_batch,
                                     args.warmup_fraction, args.model_overrides, args.lr_rule))
               for loss in args.losses for b in args.batches]  # All validated before any run.
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="batch_study_")
    root = args.workdir or tmp.name
    rows, t_all = [], time.perf_counter()
    for loss, batch, config in configs:
        workdir = os.path.join(root, f"{loss}_b{batch}")
        print(f"== {loss}, batch {batch}: {config.total_steps} steps of "
              f"{config.optim.grad_accum_steps} micro-batch(es), lr {config.optim.lr:.2e}, "
              f"warm-up {config.optim.warmup_steps} -> {workdir}", flush=True)
        t = time.perf_counter()
        results = train.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - t
        rows.append(dict(
            loss=loss, batch=batch, accum=int(config.optim.grad_accum_steps),
            lr=float(config.optim.lr), steps=int(config.total_steps),
            warmup=int(config.optim.warmup_steps), samples=batch * int(config.total_steps),
            zeroshot=results["zeroshot/acc1"],
            i2t=results["retrieval/text_retrieval_recall@1"],
            t2i=results["retrieval/image_retrieval_recall@1"],
            train_loss=final_train_loss(workdir), wall=wall))
        print(f"   zero-shot top-1 {100 * rows[-1]['zeroshot']:.1f} %, R@1 i2t "
              f"{100 * rows[-1]['i2t']:.1f} % t2i {100 * rows[-1]['t2i']:.1f} %, {wall:.0f} s",
              flush=True)
    print()
    print(table(rows))
    print(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s.")
    plot(rows, args.out, args.lr_rule)
    print(f"Plot: {args.out}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
