r"""SigLIP 2's recipe in miniature: SigLIP, + the LocCa decoder, + decoder and self-supervised terms.

    python benchmarks/siglip2_ablation.py                      # the table of docs/benchmarks.md
    python benchmarks/siglip2_ablation.py --steps 20 --workdir /tmp/abl_smoke   # a smoke run

Trains, one after another, with the same number of steps (``--steps``, overriding each
config's ``total_steps``; the learning-rate schedule follows it), under ``nice`` (``--nice``):

* (a) ``experiments/siglip_tiny.py``: SigLIP, the sigmoid loss alone;
* (b) ``experiments/locca_tiny_shapes.py``: (a) plus LocCa's decoder (Cap / ARef / GCap) from
  the first step;
* (c) ``experiments/locca_tiny_shapes.py:siglip2``: (b) plus SILC self-distillation and TIPS
  masked prediction for the last 20 % of the steps (SigLIP 2's full recipe).

Each run is ``vlm-jax train`` in a subprocess, in ``<workdir>/<run>``; a finished run (its
``eval_results_test.json`` at the last step) is reused with ``--reuse``. The table has the
shapes test split's zero-shot top-1, retrieval R@1 both ways, referring-expression accuracy at
IoU 0.5 (n/a without a decoder), the steps and the wall minutes of each run (training and its
evaluations, on whatever else the machine runs). Its last row is the refexp floor: the mean
box of the training split's referring expressions predicted for every test expression.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)

RUNS = {
    "a": ("SigLIP (`siglip_tiny.py`)", "experiments/siglip_tiny.py"),
    "b": ("+ LocCa decoder (`locca_tiny_shapes.py`)", "experiments/locca_tiny_shapes.py"),
    "c": ("+ decoder + self-distillation + masked prediction (`locca_tiny_shapes.py:siglip2`)",
          "experiments/locca_tiny_shapes.py:siglip2"),
}


def last_results(workdir: str) -> tuple[int, dict[str, float]]:
    """``(step, {entry/metric: value})`` of the last evaluation in ``eval_results_test.json``."""
    with open(os.path.join(workdir, "eval_results_test.json"), encoding="utf-8") as f:
        records = json.load(f)
    step = max(r["step"] for r in records)
    return step, {f"{r['entry']}/{k}": v for r in records if r["step"] == step
                  for k, v in r["metrics"].items()}


def train(run: str, steps: int, workdir: str, nice: int, reuse: bool) -> float:
    """Runs (or reuses) one run; returns its wall seconds."""
    out = os.path.join(workdir, run)
    wall_file = os.path.join(out, "ablation_wall.json")
    if reuse and os.path.exists(wall_file):
        with open(wall_file, encoding="utf-8") as f:
            record = json.load(f)
        if record["steps"] == steps and last_results(out)[0] == steps:
            return record["seconds"]
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "vlm_jax.main", "train", "--config",
           os.path.join(REPO, RUNS[run][1]), "--workdir", out,
           f"--config.total_steps={steps}"]
    print(" ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    with open(wall_file, "w", encoding="utf-8") as f:
        json.dump({"steps": steps, "seconds": seconds}, f)
    return seconds


def constant_box_floor(config_name: str = "64px") -> float:
    """refexp acc@0.5 of predicting the training split's mean referring-expression box."""
    from input_pipeline import pipeline  # pylint: disable=import-outside-toplevel
    from vlm_jax.evaluators.localisation import box_iou  # pylint: disable=import-outside-toplevel

    source, _ = pipeline._data_source(None, "shapes", config_name, "train")  # pylint: disable=protected-access
    train_split = pipeline.FeatureSubset(source, ("refexp_bbox",))
    mean = np.mean([train_split[i]["refexp_bbox"] for i in range(min(5000, len(train_split)))],
                   axis=0)
    test = pipeline.load_eval_split(data_dir=None, config_name=config_name, split="test",
                                    context_length=24)
    truth = test["refexp_bbox"]
    return float(np.mean(box_iou(np.tile(mean, (len(truth), 1)), truth) >= 0.5))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workdir", default="/tmp/siglip2_ablation")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs of the same step count in --workdir")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        seconds = train(run, args.steps, args.workdir, args.nice, args.reuse)
        step, m = last_results(os.path.join(args.workdir, run))
        refexp = m.get("refexp/acc@0.5")
        rows.append(f"| ({run}) {RUNS[run][0]} | {100 * m['zeroshot/acc1']:.1f} % | "
                    f"{100 * m['retrieval/text_retrieval_recall@1']:.1f} / "
                    f"{100 * m['retrieval/image_retrieval_recall@1']:.1f} % | "
                    + ("n/a" if refexp is None else f"{100 * refexp:.1f} %") + " | "
                    + (f"{m['captioning/cider']:.2f}" if "captioning/cider" in m else "n/a")
                    + f" | {step} | {seconds / 60:.1f} |")
    print("| run (shapes `test`) | zero-shot top-1 | R@1 image->text / text->image | "
          "refexp acc@0.5 | captioning CIDEr | steps | wall minutes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"| refexp floor: the training split's mean box for every expression | | | "
          f"{100 * constant_box_floor():.1f} % | | | |")


if __name__ == "__main__":
    main()
