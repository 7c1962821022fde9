"""Command line: ``vlm-jax train | eval | convert | export | caption | compile | data``.

    vlm-jax train --config experiments/clip_tiny.py --workdir runs/tiny [--config.key=value ...]
    vlm-jax eval  --workdir runs/tiny [--config experiments/clip_tiny.py] [--step N]
                  [--evaluators zeroshot,retrieval,linear_probe]
    vlm-jax eval  --workdir runs/tiny --suite datacomp [--max_examples N]
    vlm-jax eval  --checkpoint runs/tiny/checkpoints/1200
    vlm-jax convert --input ViT-B-32.safetensors --act quick_gelu --workdir runs/openai_b32
    vlm-jax convert --input TinyLlama-1.1B/ --workdir runs/tinyllama  # a Hugging Face LM directory
    vlm-jax convert --input siglip-base-patch16-224/ --workdir runs/siglip  # HF CLIP / SigLIP(2)
    vlm-jax export --workdir runs/siglip --format hf --output out/siglip  # or --format open_clip
    vlm-jax caption --workdir runs/coca_tiny --images photos/ [--method beam --beam_size 3]
    vlm-jax compile --config experiments/clip_openai.py:B/16 --topology v5e:16x16
    vlm-jax data prepare --config experiments/clip_tiny.py
    vlm-jax data export  --config experiments/clip_tiny.py --split train --output shards/
    vlm-jax data convert --input 'shards/train-*.tar' --output gs://bucket/records/train --workers 8
    vlm-jax data inspect --input 'shards/train-*.tar' --output grid.png
    vlm-jax data embed   --config experiments/lit_tiny_shapes.py --output embeddings/

``train`` on a workdir that holds checkpoints resumes from the latest one. ``eval`` without
``--config`` uses the ``config.json`` the run saved. Config errors are reported before any data
is read or any device is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="vlm-jax", description="Pretrain and evaluate vision-language models in JAX.",
        epilog="Any --config.<key>=<value> overrides a config field, e.g. "
               "--config.total_steps=100 --config.mesh.fsdp=2.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, config_required=True):
        p.add_argument("--config", required=config_required,
                       help="experiments/<name>.py[:arg] (or a run's config.json)")
        p.add_argument("--coordinator_address", default=None,
                       help="host:port of process 0, for multi-process runs "
                            "(on Cloud TPU pods leave unset: jax detects the pod)")
        p.add_argument("--num_processes", type=int, default=None)
        p.add_argument("--process_id", type=int, default=None)
        p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("train", help="train (or resume) a model in --workdir, then evaluate")
    common(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--preempted_exit_code", type=int, default=0,
                   help="exit code after saving on a preemption notice (SIGTERM) or Ctrl-C "
                        "(default 0); e.g. 42 under xpk / JobSet, which restarts a workload on "
                        "that code and treats 0 as finished")
    p = sub.add_parser("eval", help="evaluate the latest (or --step) checkpoint of a workdir")
    common(p, config_required=False)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir")
    where.add_argument("--checkpoint", help="a checkpoint directory, <workdir>/checkpoints/<step>")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--evaluators", default=None,
                   help="comma-separated names of entries of config.evals to run (default: all "
                        "but the on-request ones, every_steps=-1), e.g. zeroshot,linear_probe")
    p.add_argument("--dataset", default=None,
                   help="run the selected entries on this dataset instead of theirs: shapes or "
                        "tfds:<name> (in config.eval.data_dir)")
    p.add_argument("--split", default=None,
                   help="run the selected entries on this split instead of theirs")
    p.add_argument("--suite", default=None,
                   help="run a benchmark suite instead of config.evals: 'datacomp' (DataComp's "
                        "38 tasks; those TFDS prepares run from config.eval.data_dir, the others "
                        "are listed with how to prepare them)")
    p.add_argument("--max_examples", type=int, default=0,
                   help="with --suite: examples per task (default 0: the whole split)")
    p = sub.add_parser("convert", help="import OpenAI CLIP / open_clip weights (.safetensors, "
                                       ".pt/.bin with torch) or a Hugging Face LLaMA / GPT-2 "
                                       "model directory into a workdir that eval and train use")
    common(p, config_required=False)
    p.add_argument("--input", required=True,
                   help="the CLIP state dict file, or a Hugging Face model directory "
                        "(config.json + model.safetensors) of a LLaMA or GPT-2 causal LM or of "
                        "a CLIPModel / SiglipModel / Siglip2Model (with its tokenizer files)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--act", default=None, choices=["quick_gelu", "gelu"],
                   help="CLIP state dicts without open_clip_config.json (required there): "
                        "quick_gelu for OpenAI's models and open_clip's *-quickgelu, gelu for "
                        "the other open_clip models")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the converted model (model.dtype; default float32, "
                        "whose embeddings match the original's)")
    p = sub.add_parser("export", help="write a CLIP / SigLIP workdir's model as open_clip "
                                      "(open_clip_config.json) or transformers (config.json) "
                                      "safetensors")
    p.add_argument("--workdir", required=True)
    p.add_argument("--format", required=True, choices=["open_clip", "hf"])
    p.add_argument("--output", required=True, help="a new (or empty) directory")
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--hf_model_type", default=None, choices=["clip", "siglip", "siglip2"],
                   help="--format hf: the transformers class (default CLIPModel for CLIP-style "
                        "models, SiglipModel for SigLIP-style ones; siglip2: Siglip2Model)")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("caption", help="caption a folder of images with a CoCa checkpoint")
    common(p, config_required=False)
    p.add_argument("--workdir", required=True)
    p.add_argument("--images", required=True, help="a folder of .jpg / .png / .webp images")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--output", default=None, help="JSONL file (default <workdir>/captions.jsonl)")
    p.add_argument("--method", default=None, choices=["greedy", "beam", "sample"],
                   help="default: the options of the config's captioning entry (config.evals)")
    p.add_argument("--beam_size", type=int, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p = sub.add_parser("compile", help="compile the train step for a TPU topology (no TPU "
                                       "needed): per-chip memory, FLOPs, predicted step time")
    common(p)
    p.add_argument("--topology", required=True,
                   help="TPU slice, <generation>:<chips per dim>: v4:8x8x4, v5e:16x16, "
                        "v5p:4x4x8, v6e:8x8")
    p.add_argument("--num_slices", type=int, default=1,
                   help="multi-slice: number of such slices (config.mesh.slice spans them)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--grad_accum_steps", default=None,
                   help="micro-batches per step: 'auto' (the smallest power of two that fits, "
                        "searched from config.optim.grad_accum_steps; contrastive families "
                        "micro-batched at the embeddings, every negative kept) or a number. "
                        "Default: 'auto', unless --config.optim.grad_accum_steps is given or "
                        "the config sets a count other than 1: that count is compiled as given")
    p = sub.add_parser(
        "data", help="dataset tools: prepare | export | convert | inspect | embed",
        description="prepare: build the config's dataset. export: write a split of it as "
                    "webdataset tar shards (--output DIR). convert: webdataset tars (--input "
                    "PATTERN) or an image folder (--input DIR --captions CSV/JSONL) to ArrayRecord "
                    "shards (--output PREFIX, local or gs://), with --workers processes per host "
                    "and --process_id/--num_processes hosts; rerunning it resumes. inspect: "
                    "counts, bad samples, caption lengths and a PNG grid (--input PATTERN --format "
                    "webdataset|array_record --output PNG); with --config, also the samples its "
                    "data.min_side / data.filters reject. embed: a LiT config's locked image "
                    "tower's embeddings of its training pairs, computed once, as ArrayRecord "
                    "(--output DIR; train on them with --config.data.name=image_embeddings "
                    "--config.data.train_files=DIR).")
    p.add_argument("action", choices=["prepare", "export", "convert", "inspect", "embed"])
    common(p, config_required=False)
    p.add_argument("--input", default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--format", default="webdataset", choices=["webdataset", "array_record"])
    p.add_argument("--captions", default=None, help="convert: CSV (file,caption) or JSONL")
    p.add_argument("--split", default="train", help="export: split to write")
    p.add_argument("--shard_size", type=int, default=1000)
    p.add_argument("--num_shards", type=int, default=None,
                   help="convert: output shards (default: one per input tar shard, or per "
                        "10,000 rows of --captions)")
    p.add_argument("--workers", type=int, default=1,
                   help="convert: worker processes on this host")
    p.add_argument("--keep_bad", action="store_true",
                   help="convert: also write the samples that fail the checks (still counted)")
    p.add_argument("--max_scan", type=int, default=None, help="inspect: samples to scan")
    p.add_argument("--workdir", default=None,
                   help="embed: take the locked tower from this run's latest checkpoint "
                        "(default: as the config's init_from loads it)")

    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in rest:
        if item.startswith("--config."):
            overrides.append(item[len("--config."):])
        else:
            unknown.append(item)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config fields are set with "
                     "--config.<key>=<value>)")
    return args, overrides


def _load(args, overrides):
    from vlm_jax import config as config_lib  # pylint: disable=import-outside-toplevel

    spec = args.config
    if spec is None and args.command == "convert":
        spec = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "clip_openai.py")
    if spec is None:  # epath: pathlib would turn gs://bucket/run into a local gs:/bucket/run.
        from etils import epath  # pylint: disable=import-outside-toplevel

        spec = os.fspath(epath.Path(args.workdir) / "config.json")
    if spec.endswith(".json"):
        return config_lib.load_json_config(spec, overrides)
    return config_lib.load_config(spec, overrides)


def _eval_elsewhere(config, names, dataset, split):
    """``vlm-jax eval --dataset D [--split S]``: the selected entries (``--evaluators``, default
    all) read ``D`` / ``S`` instead of their own dataset and split."""
    from vlm_jax.config import ConfigError, apply_override  # pylint: disable=C0415

    chosen = names if names is not None else list(config.evals)
    with config.unlocked():
        for name in chosen:
            if name not in config.evals:
                raise ConfigError(f"--evaluators: no entry {name!r} in config.evals; the "
                                  f"entries are {sorted(config.evals)}.")
            if dataset:
                apply_override(config, f"evals.{name}.dataset={dataset}")
            if split:
                apply_override(config, f"evals.{name}.split={split}")
    return config


def _add_suite(config, suite, names, max_examples):
    """``vlm-jax eval --suite S``: the config with the entries of the suite's tasks that run
    here (:func:`vlm_jax.suites.suite_evals`) added to ``config.evals``, the names to run (those,
    or the ones of ``--evaluators`` among them) and the tasks left out, with why."""
    from vlm_jax import suites  # pylint: disable=import-outside-toplevel
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    entries, skipped = suites.suite_evals(suite, config.eval.data_dir or None, max_examples)
    if names is not None:
        every = [suites.entry_name(t) for t in suites.suite_tasks(suite)]
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ConfigError(f"--evaluators {unknown}: not tasks of suite {suite!r}; its tasks "
                              f"are {every}.")
        entries = {k: v for k, v in entries.items() if k in names}
    with config.unlocked():
        evals = dict(config.evals) if "evals" in config else {}
        evals.update(entries)
        config.evals = evals
    return config, list(entries), skipped


def _eval_suite(config, args, names, skipped) -> int:
    """Runs the suite's entries that can run (none: only the report) and prints the suite's
    table, with the preparation of the tasks that did not run."""
    import jax  # pylint: disable=import-outside-toplevel

    from vlm_jax import suites, train  # pylint: disable=import-outside-toplevel

    results = train.evaluate_checkpoint(config, args.workdir, args.step, names) if names else {}
    if jax.process_index() == 0:
        print("\n" + suites.summary(args.suite, results, skipped))
    return 0


def _init_distributed(args) -> None:
    """Starts jax.distributed from explicit flags or a cluster jax detects (vlm_jax.runtime)."""
    from vlm_jax import runtime  # pylint: disable=import-outside-toplevel

    runtime.initialize(runtime.plan_distributed(args.coordinator_address, args.num_processes,
                                                args.process_id))


def _convert_process(args) -> tuple[int, int]:
    """(process index, count) of ``data convert``: ``--process_id`` / ``--num_processes``, else
    the cluster jax detects (a TPU pod with ``--worker=all``: each host takes its share), else
    (0, 1). Conversion shares no state between hosts, so no distributed runtime is started."""
    from input_pipeline import DataError  # pylint: disable=import-outside-toplevel

    if (args.process_id is None) != (args.num_processes is None):
        raise DataError("vlm-jax data convert: --process_id and --num_processes go together.")
    if args.process_id is not None:
        return args.process_id, args.num_processes
    from vlm_jax import runtime  # pylint: disable=import-outside-toplevel

    plan = runtime.plan_distributed()
    if plan.source == "cluster" and plan.num_processes and plan.process_id is not None:
        return plan.process_id, plan.num_processes
    return 0, 1


def _data_command(args, config) -> int:
    import json  # pylint: disable=import-outside-toplevel

    from input_pipeline import DataError, tools  # pylint: disable=import-outside-toplevel

    def need(flag, value):
        if not value:
            raise DataError(f"vlm-jax data {args.action} needs --{flag}.")
        return value

    if args.action == "prepare":
        from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

        d = get_family(config).make_data(config)
        print(f"Dataset {config.data.name}/{config.data.config_name} ready in {d.data_dir}")
    elif args.action == "export":
        from vlm_jax.families import get_family  # pylint: disable=import-outside-toplevel

        d = get_family(config).make_data(config)
        paths = tools.export_webdataset(d.data_dir, config.data.eval_name
                                        if config.data.name != "shapes" else "shapes",
                                        config.data.config_name, args.split,
                                        need("output", args.output), args.shard_size)
        print(f"Wrote {len(paths)} tar shard(s): {paths[0]} ... {paths[-1]}")
    elif args.action == "embed":
        from vlm_jax import embed  # pylint: disable=import-outside-toplevel

        embed.embed_images(config, need("output", args.output), workdir=args.workdir)
    elif args.action == "convert":
        index, count = _convert_process(args)
        report = tools.convert_shards(need("input", args.input), need("output", args.output),
                                      args.num_shards, args.captions, workers=args.workers,
                                      process_index=index, process_count=count,
                                      keep_bad=args.keep_bad)
        print(report.summary())
    else:
        decode = None  # With a config: its data.min_side and data.filters, as training skips.
        if config is not None:
            from input_pipeline.transforms import DecodePair  # pylint: disable=C0415
            from vlm_jax import data as data_lib  # pylint: disable=import-outside-toplevel

            decode = DecodePair(config.data.min_side, filters=data_lib.sample_filters(config))
        report = tools.inspect(args.format, need("input", args.input), args.output,
                               max_scan=args.max_scan, decode=decode)
        print(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from vlm_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
    from vlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
    from input_pipeline import DataError  # pylint: disable=import-outside-toplevel

    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
        flags.FLAGS(sys.argv[:1], known_only=True)
    if getattr(args, "checkpoint", None):  # eval --checkpoint <workdir>/checkpoints/<step>
        from etils import epath  # pylint: disable=import-outside-toplevel

        ckpt_dir = epath.Path(args.checkpoint.rstrip("/"))  # gs:// paths too
        if not ckpt_dir.name.isdigit() or ckpt_dir.parent.name != "checkpoints":
            print(f"vlm-jax eval: --checkpoint {ckpt_dir}: expected <workdir>/checkpoints/<step>.",
                  file=sys.stderr)
            return 2
        args.workdir, args.step = os.fspath(ckpt_dir.parent.parent), int(ckpt_dir.name)
    names = None  # vlm-jax eval: the entries of config.evals to run (None: the default ones)
    if getattr(args, "evaluators", None):
        names = [n.strip() for n in args.evaluators.split(",") if n.strip()]
    if args.command == "export":  # Files in, files out: no config, no distributed runtime.
        from vlm_jax import export  # pylint: disable=import-outside-toplevel

        try:
            export.export(args.workdir, args.format, args.output, step=args.step,
                          hf_model_type=args.hf_model_type)
        except (export.ExportError, CheckpointError) as e:
            print(f"vlm-jax export: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "data" and args.action in ("convert", "inspect"):
            config = None  # These work on files, not on a config; inspect applies the sample
            if args.action == "inspect" and (args.config or overrides):  # filters of a config.
                if args.config is None:
                    raise ConfigError("vlm-jax data inspect: --config.* overrides need --config "
                                      "(e.g. --config experiments/clip_tiny.py).")
                config = _load(args, overrides)
        else:
            if args.config is None and args.command == "data":
                raise ConfigError(f"vlm-jax data {args.action} needs --config.")
            config = _load(args, overrides)  # Fails on a bad key before anything happens.
            if args.command == "eval" and (args.dataset or args.split):
                if args.suite:
                    raise ConfigError("vlm-jax eval: --suite runs each task on its own dataset; "
                                      "leave out --dataset / --split.")
                config = _eval_elsewhere(config, names, args.dataset, args.split)
            if args.command == "eval" and args.max_examples and not args.suite:
                raise ConfigError("vlm-jax eval: --max_examples goes with --suite; for the "
                                  "entries of config.evals set "
                                  "--config.evals.<name>.max_examples=N.")
            if args.command == "eval" and args.suite:
                config, names, suite_skipped = _add_suite(config, args.suite, names,
                                                          args.max_examples)
        # Compiling for a TPU topology and converting data need no distributed runtime.
        if args.command != "compile" and not (args.command == "data" and args.action == "convert"):
            _init_distributed(args)
        if args.command == "train":
            from vlm_jax import train  # pylint: disable=import-outside-toplevel

            try:
                out = train.train_and_evaluate(config, args.workdir)
                if "preempted_at_step" in out:  # Saved; the same command resumes.
                    return args.preempted_exit_code
            except train.TrainingDiverged as e:
                print(f"vlm-jax train: TrainingDiverged: {e}", file=sys.stderr)
                return 3
        elif args.command == "eval":
            from vlm_jax import train  # pylint: disable=import-outside-toplevel

            if args.suite:
                return _eval_suite(config, args, names, suite_skipped)
            train.evaluate_checkpoint(config, args.workdir, args.step, names)
        elif args.command == "convert":
            from vlm_jax import convert  # pylint: disable=import-outside-toplevel

            try:
                convert.convert(args.input, args.workdir, act=args.act, base_config=config,
                                dtype=args.dtype)
            except convert.ConvertError as e:
                print(f"vlm-jax convert: ConvertError: {e}", file=sys.stderr)
                return 2
        elif args.command == "caption":
            from vlm_jax import caption  # pylint: disable=import-outside-toplevel

            options = None
            if args.method:
                options = {"method": args.method}
                for key in ("beam_size", "top_k", "top_p", "temperature"):
                    if getattr(args, key) is not None:
                        options[key] = getattr(args, key)
            try:
                caption.caption_folder(config, args.workdir, args.images, step=args.step,
                                       output=args.output, options=options)
            except ValueError as e:  # Decoding options that do not fit the method.
                print(f"vlm-jax caption: {e}", file=sys.stderr)
                return 2
        elif args.command == "compile":
            from vlm_jax import aot  # pylint: disable=import-outside-toplevel

            accum = args.grad_accum_steps
            if accum is None:  # The count the user chose, else the planner's search.
                chosen = int(config.optim.grad_accum_steps) != 1 or any(
                    o.startswith("optim.grad_accum_steps") for o in overrides)
                accum = None if chosen else "auto"
            return aot.run(config, args.topology, args.num_slices, args.json,
                           grad_accum_steps=accum)
        elif args.command == "data":
            return _data_command(args, config)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"vlm-jax {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
