"""The quickstart's recipe study: zero-shot top-1 and retrieval of clip_tiny variants, per seed.

    python benchmarks/quickstart_recipes.py                          # every variant, seeds 0 1
    python benchmarks/quickstart_recipes.py --variants first gap_900 --seeds 0 1 2

Each variant is ``experiments/clip_tiny.py`` with ``--config.<key>=<value>`` overrides, trained
by ``vlm-jax train`` in a subprocess (the shapes dataset built once, in ``--data_dir``) and
evaluated once, at its last step, on the shapes test split; the checkpoints of the run are
written at its end only. The wall column is the whole command, dataset build excluded, on this
machine at the time: compare rows measured in one session. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# The first recipe (experiments/clip_tiny.py's first_recipe()): class token, MLPs 4 x width,
# 24-token context, 1,200 steps.
FIRST = {"model.image.pool_type": "tok", "model.image.mlp_dim": 512, "model.text.mlp_dim": 512,
         "model.text.context_length": 24, "total_steps": 1200}
SMALL = {"model.image.mlp_dim": 256, "model.text.mlp_dim": 256,
         "model.text.context_length": 16}
VARIANTS: dict[str, dict] = {
    "first": FIRST,
    "small_tok_1200": {**SMALL, "model.image.pool_type": "tok", "total_steps": 1200},
    "small_tok_2heads_1200": {**SMALL, "model.image.pool_type": "tok", "total_steps": 1200,
                              "model.image.num_heads": 2, "model.text.num_heads": 2},
    "small_gap_1200": {**SMALL, "model.image.pool_type": "gap", "total_steps": 1200},
    "small_avg_900": {**SMALL, "model.image.pool_type": "avg", "total_steps": 900},
    "small_gap_900": {**SMALL, "model.image.pool_type": "gap", "total_steps": 900},
    "small_gap_700": {**SMALL, "model.image.pool_type": "gap", "total_steps": 700},
}


def run(name: str, overrides: dict, seed: int, data_dir: str, workdir: str) -> dict:
    """Trains one variant; returns its final test metrics and wall time."""
    args = [f"--config.{k}={v}" for k, v in {**overrides, "seed": seed}.items()]
    args += ["--config.evals.zeroshot.every_steps=0", "--config.evals.retrieval.every_steps=0",
             "--config.checkpoint.every_steps=1000000"]
    cmd = [sys.executable, "-c", "from vlm_jax.main import run; run()", "train", "--config",
           os.path.join(REPO, "experiments", "clip_tiny.py"), "--workdir", workdir, *args]
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "eval_results_test.json")) as f:
        metrics = {k: v for entry in json.load(f) for k, v in entry["metrics"].items()}
    return dict(variant=name, seed=seed, wall=wall, **metrics)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "quickstart_tfds"))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "quickstart_recipes"))
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    from input_pipeline import shapes  # pylint: disable=import-outside-toplevel

    shapes.prepare(args.data_dir, process_index=0, progress=False)
    print("| variant | overrides | seed | zero-shot top-1 | image->text / text->image R@1 | "
          "wall (s) |")
    print("|---|---|---|---|---|---|")
    for name in args.variants:
        for seed in args.seeds:
            r = run(name, VARIANTS[name], seed, args.data_dir,
                    os.path.join(args.workdir, f"{name}_s{seed}"))
            overrides = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in VARIANTS[name].items())
            print(f"| {name} | {overrides} | {seed} | {100 * r['acc1']:.2f} % | "
                  f"{100 * r['text_retrieval_recall@1']:.1f} / "
                  f"{100 * r['image_retrieval_recall@1']:.1f} % | {r['wall']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
