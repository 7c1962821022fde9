"""The CLIP train step here and in open_clip, side by side on this machine's CPU.

    python benchmarks/vs_open_clip.py                        # tiny towers and ViT-B/32
    python benchmarks/vs_open_clip.py --models tiny --rounds 5
    python benchmarks/vs_open_clip.py --torch_python /path/to/venv/bin/python

Both sides run the same architecture, batch and optimizer on synthetic batches already in
memory: forward, contrastive loss, backward, gradient clipping at norm 1 and AdamW (b2 0.98,
eps 1e-6, weight decay 0.2), float32. Here it is ``vlm_jax.train.make_train_step`` (the step
``vlm-jax train`` runs: non-finite guard, donated state, metrics); there ``open_clip``'s
``CLIP`` with its ``ClipLoss`` and ``torch.optim.AdamW``, in eager mode as its training script
runs it. The models:

* ``tiny``: the towers of ``experiments/clip_tiny.py``'s first recipe (ViT width 128 x 4 layers,
  patch 16 at 64 px, class token; text width 128 x 4 layers, context 24, vocabulary 512; MLPs
  of 4 x width; embedding 128), batch 128;
* ``ViT-B/32``: OpenAI's CLIP ViT-B/32 (224 px, context 77, vocabulary 49,408), batch 16.

open_clip needs torch, which this package does not depend on: the script runs the torch side
with ``--torch_python`` (default: ``$VLM_JAX_TORCH_PYTHON``, else this interpreter) in a
subprocess, and skips it with a message when that interpreter cannot import open_clip
(``pip install open_clip_torch torch`` in any venv, then point ``--torch_python`` at it). Each
side runs in its own subprocess, one after the other, ``--rounds`` times alternating, so slow
phases of a shared machine hit both; the table reports the median step of each side over all
rounds and the ratio of their images/s (> 1: this package is faster). The machine's float32
``2048^3`` matmul time is printed as the reference for scaling the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")

# The models both sides build (open_clip's model-config layout; ours comes from the same
# experiment / preset).
OPEN_CLIP_CFG = {
    "tiny": dict(embed_dim=128,
                 vision_cfg=dict(image_size=64, layers=4, width=128, head_width=32,
                                 mlp_ratio=4.0, patch_size=16),
                 text_cfg=dict(context_length=24, vocab_size=512, width=128, heads=4,
                               layers=4)),
    "ViT-B/32": dict(embed_dim=512,
                     vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8,
                                   layers=12)),
}
DEFAULT_BATCH = {"tiny": 128, "ViT-B/32": 16}


# torch.profiler's operator names, grouped as benchmarks/step_profile.py groups XLA's ops.
TORCH_GROUPS = (
    ("matmuls (dot / library fusions)", ("addmm", "aten::mm", "bmm", "linear", "matmul",
                                         "convolution", "conv2d", "baddbmm")),
    ("layer norms", ("layer_norm",)),
    ("MLP activation (GELU)", ("gelu",)),
    ("attention softmax and mask", ("softmax", "scaled_dot_product", "masked_fill")),
    ("optimizer update (AdamW, clip)", ("adamw", "_foreach", "optimizer", "lerp", "addcdiv",
                                        "clip_grad", "norm")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("copies / transposes (layouts)", ("copy_", "contiguous", "clone", "transpose", "permute",
                                       "reshape", "view")),
)


def torch_profile(step, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of open_clip's step by group (torch.profiler)."""
    import torch  # pylint: disable=import-outside-toplevel

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    groups: dict[str, float] = {}
    for ev in prof.key_averages():
        name = ev.key.lower()
        group = next((g for g, keys in TORCH_GROUPS if any(k in name for k in keys)),
                     "other elementwise (residual adds, biases, embeddings, casts)")
        groups[group] = groups.get(group, 0.0) + ev.self_cpu_time_total / 1e6 / steps
    return groups


def torch_worker(model: str, batch: int, steps: int, threads: int,
                 profile: bool = False) -> dict:
    """open_clip's train step (as its ``train_one_epoch``, float32, no autocast)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import open_clip  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    # GELU, as ours (quick_gelu=False).
    net = open_clip.model.CLIP(**OPEN_CLIP_CFG[model], output_dict=True)
    net.train()
    loss_fn = open_clip.loss.ClipLoss()
    # CLIP's recipe, as experiments/clip_tiny.py: no decay on gains, biases and temperature.
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2
                                                             and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    cfg = OPEN_CLIP_CFG[model]
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(batch, 3, size, size)).astype(np.float32))
    text = torch.from_numpy(rng.integers(4, 200, size=(batch, ctx)).astype(np.int64))

    def step():
        opt.zero_grad()
        out = net(images, text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # open_clip's clamp after the update
            net.logit_scale.clamp_(0, np.log(100))
        return float(loss)  # the per-step host read open_clip's logging does

    step()
    if profile:
        return dict(side="open_clip", groups=torch_profile(step, steps))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(side="open_clip", version=f"open_clip {open_clip.__version__}, torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads", times=times)


def jax_worker(model: str, batch: int, steps: int) -> dict:
    """This package's train step (benchmarks/train_throughput.py's measurement)."""
    sys.path.insert(0, HERE)
    import jax  # pylint: disable=import-outside-toplevel
    import train_throughput  # pylint: disable=import-outside-toplevel

    r = train_throughput.bench(model, batch, steps)
    return dict(side="vlm_jax", version=f"vlm_jax, jax {jax.__version__}",
                times=r["times"], compile_s=r["compile_s"],
                matmul_s=train_throughput.matmul_seconds())


def run_worker(python: str, side: str, model: str, batch: int, steps: int,
               threads: int) -> dict | str:
    """One worker subprocess; its JSON result, or the reason it could not run."""
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--models", model,
           "--batch", str(batch), "--steps", str(steps), "--threads", str(threads)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return json.loads(lines[-1])


def has_open_clip(python: str) -> bool:
    return subprocess.run([python, "-c", "import open_clip, torch"], capture_output=True
                          ).returncode == 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "ViT-B/32"])
    p.add_argument("--batch", type=int, default=0, help="batch (default: tiny 128, B/32 16)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round "
                   "(default: tiny 20, B/32 3)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--torch_python", default=os.environ.get("VLM_JAX_TORCH_PYTHON",
                                                            sys.executable))
    p.add_argument("--profile", action="store_true",
                   help="print open_clip's time by operator group (torch.profiler) instead")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        model = args.models[0]
        if args.worker == "torch":
            r = torch_worker(model, args.batch, args.steps, args.threads, args.profile)
        else:
            r = jax_worker(model, args.batch, args.steps)
        print(json.dumps(r))
        return

    torch_ok = has_open_clip(args.torch_python)
    if args.profile:  # open_clip's side of benchmarks/step_profile.py's table.
        for model in args.models:
            batch = args.batch or DEFAULT_BATCH[model]
            cmd = [args.torch_python, os.path.abspath(__file__), "--worker", "torch",
                   "--models", model, "--batch", str(batch), "--steps",
                   str(args.steps or 5), "--threads", str(args.threads), "--profile"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
            groups = json.loads(out.stdout.splitlines()[-1])["groups"]
            total = sum(groups.values())
            print(f"\nopen_clip {model}, batch {batch}: {total * 1e3:.0f} ms of operator "
                  "self time per step")
            print("| group | ms per step | share |")
            print("|---|---|---|")
            for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"| {g} | {t * 1e3:.1f} | {100 * t / total:.1f}% |")
        return
    if not torch_ok:
        print(f"# open_clip is not importable by {args.torch_python}: only this package's "
              "side runs. Install open_clip_torch and torch in a venv and pass its python "
              "with --torch_python (or VLM_JAX_TORCH_PYTHON).")
    rows = []
    for model in args.models:
        batch = args.batch or DEFAULT_BATCH[model]
        steps = args.steps or (20 if model == "tiny" else 3)
        res = {"vlm_jax": [], "open_clip": []}
        info = {}
        for _ in range(args.rounds):
            sides = [("jax", sys.executable)] + ([("torch", args.torch_python)]
                                                 if torch_ok else [])
            for side, python in sides:
                r = run_worker(python, side, model, batch, steps, args.threads)
                if isinstance(r, list):
                    print(f"# {side} worker failed on {model}: {r[0]}")
                    continue
                res[r["side"]].extend(r["times"])
                info[r["side"]] = r["version"]
                if "matmul_s" in r:
                    info.setdefault("matmul", []).append(r["matmul_s"])
        rows.append((model, batch, res, info))
        _print(rows, torch_ok)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _print(rows, torch_ok: bool) -> None:
    model, batch, res, info = rows[-1]
    if len(rows) == 1:
        mm = _median(info.get("matmul", []))
        print(f"# {os.cpu_count()} cores; float32 2048^3 matmul {mm * 1e3:.1f} ms "
              f"({2 * 2048 ** 3 / mm / 1e9:.0f} GFLOP/s); {info.get('vlm_jax', '')}; "
              f"{info.get('open_clip', 'open_clip absent')}")
        print("| model | batch | vlm_jax step (s) | vlm_jax img/s | open_clip step (s) | "
              "open_clip img/s | ratio |")
        print("|---|---|---|---|---|---|---|")
    j, t = _median(res["vlm_jax"]), _median(res["open_clip"])
    ratio = f"{t / j:.2f}x" if torch_ok and res["open_clip"] else "-"
    print(f"| {model} | {batch} | {j:.3f} | {batch / j:.1f} | "
          f"{t:.3f} | {batch / t:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
