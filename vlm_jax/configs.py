r"""The base config: the default of every setting outside ``model`` and ``evals``, and the
reference of what each key means.

An experiment file starts from it and states only what differs::

    from vlm_jax import configs

    def get_config(arg=None):
        c = configs.base_config()
        c.name, c.total_steps, c.batch_size = "my_run", 10_000, 1024
        c.model = dict(name="clip", ...)            # the architecture: always the experiment's
        c.optim.update(lr=1e-3, warmup_steps=500)  # what differs from the defaults below
        c.evals = dict(...)                         # named evaluations (vlm_jax/evaluation.py)
        return c

:func:`vlm_jax.config.load_config` (an experiment file) and
:func:`vlm_jax.config.load_json_config` (a run's ``config.json``) merge what they read onto
:func:`base_config`: a key the base has and the file lacks takes its default (a ``config.json``
written before the key existed still loads, and resumes, see
:func:`vlm_jax.config.fill_defaults`); a key the base does not know fails, naming it. The code
therefore reads these keys directly (``config.optim.trainable``), never with a second default.

Keys that only some model families read (``data.seq_length``, ``loss.caption_weight``,
``optim.trainable``, ...) are here too, with values that leave the other families unchanged.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from vlm_jax import parallel

# Top-level keys every experiment must set (None in the base): what the experiment is.
REQUIRED = ("name", "total_steps", "batch_size")
# Top-level sections that are not in the base (the architecture and the evaluation entries are
# always the experiment's own; without ``evals`` a run takes its family's default entries) or
# whose entries are free-form (``init_from``: one per model part; ``published``: a record).
# They are taken from the experiment as they are.
OPEN_SECTIONS = ("model", "evals", "init_from", "published")


def base_config() -> ConfigDict:
    """The defaults of every config section except ``model``, ``eval`` and ``evals``.

    Returns a new, unlocked ConfigDict on every call (experiments add ``model`` and ``eval``).
    """
    c = ConfigDict()

    # ---- The run -------------------------------------------------------------------------------
    # name: the experiment's name, as eval results and `vlm-jax compile` reports name the model.
    c.name = None  # Required.
    # seed: fixes initialisation, data order, augmentation and dropout; (seed, step) fixes a step.
    c.seed = 0
    # total_steps: optimizer steps of the run (the learning-rate schedule ends there). Raising it
    # on resume is allowed (the schedule changes from there on, with a note).
    c.total_steps = None  # Required.
    # batch_size: the GLOBAL batch (all processes, all devices; each process loads its share).
    c.batch_size = None  # Required.
    # log_every_steps: metrics (loss, lr, throughput, MFU) are fetched, checked for NaN/Inf and
    # written to metrics.jsonl / TensorBoard every this many steps.
    c.log_every_steps = 100

    # ---- data: the training stream (the evaluation data is the eval / evals sections') --------
    c.data = dict(
        # 'shapes': the embedded dataset, built on first use (TFDS, ArrayRecord) in data_dir.
        # Raw image-text shards: 'webdataset' (img2dataset tar shards) / 'array_record'
        # (`vlm-jax data convert`) read from train_files; 'tfds' reads a prepared TFDS dataset
        # (train_files='<name>@<split>', e.g. 'coco_captions@train', with image_key /
        # caption_key). Raw sources are evaluated on the shapes splits (eval_name, config_name).
        # 'image_embeddings' (LiT with a locked image tower, vlm_jax/families/lit.py): the
        # tower's embeddings of the training pairs that `vlm-jax data embed` wrote to the
        # directory train_files; the step is then text-only.
        name="shapes",
        # The shapes variant: '64px' or '32px' (image side); also the shapes evaluation splits of
        # a run on raw shards.
        config_name="64px",
        # Where TFDS datasets live ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets); local or gs://.
        data_dir="",
        # Training examples of the shapes dataset to build (0 = the builder's default).
        num_train=0,
        # grain worker processes per host for decoding and augmentation (0 = in the main process).
        worker_count=0,
        # Raw shards: brace ranges, globs and comma-separated lists, local or gs://
        # ('shards/train-{00000..00009}.tar').
        train_files="",
        # The tokenizer of raw shards: 'clip_bpe' (OpenAI's BPE, shipped), a CLIP
        # bpe_simple_vocab_16e6.txt.gz-format file or a sentencepiece .model
        # ('' = the shapes tokenizer).
        tokenizer="",
        # The shapes dataset that evaluates a run on raw shards.
        eval_name="shapes",
        # Bad samples (no image or caption, undecodable, smaller than min_side px) are skipped and
        # counted; the run stops when more than this fraction of the samples read are (1.0: never).
        max_skipped_fraction=0.1,
        min_side=8,
        # Sample filters of image-text pairs from raw shards (webdataset / array_record / tfds),
        # applied before decoding where they can be (input_pipeline/transforms.py SampleFilters;
        # docs/data.md). A rejected sample is skipped and counted as data/skipped/<reason>, and
        # counts towards max_skipped_fraction (raise it when filtering a noisy corpus on purpose).
        # 0 means no limit. Caption lengths are of the whitespace-collapsed caption.
        filters=dict(
            # Long side / short side at most this (e.g. 3.0), from the image header:
            # extreme_aspect_ratio.
            max_aspect_ratio=0.0,
            # caption_too_short / caption_too_long, in characters and in words.
            min_caption_chars=0,
            max_caption_chars=0,
            min_caption_words=0,
            max_caption_words=0,
            # Predicates 'field op literal' on the sample's .json metadata (as img2dataset writes
            # it, with --save_additional_columns), all of which must hold; ops == != < <= > >= in
            # 'not in', literals in Python syntax (ast.literal_eval), e.g. LAION-400M:
            # ["similarity >= 0.3", "NSFW != 'NSFW'"], DataComp: ["clip_l14_similarity_score >=
            # 0.3"]. Skipped as metadata:<field> when the value fails, metadata_missing:<field>
            # when the field is absent or null (bad_json: metadata that is not a JSON object).
            metadata=[],
        ),
        # name='webdataset': how the tar shards are read. 'indexed': every shard's headers are
        # read at start-up (one record per sample in every process), then one global shuffle;
        # resumes on any process count. 'stream': no index (LAION scale: start-up and host
        # memory independent of the corpus size); each process and grain worker reads whole
        # shards of its own, every shard once per epoch, through a shuffle buffer; resumes
        # exactly on the same process count and worker_count only. 'resampled': as 'stream'
        # with shards drawn with replacement (open_clip's --dataset-resampled).
        # See docs/design.md ("Webdataset at LAION scale is streamed").
        webdataset_mode="indexed",
        # 'stream' / 'resampled': raw samples in each reader's shuffle buffer (1 = shard order).
        shuffle_buffer=1000,
        # 'resampled': samples (all processes) per epoch; each epoch draws shards from new seeds
        # (0 = one endless epoch).
        samples_per_epoch=0,
        # Several sources mixed by weight: [dict(name=..., train_files=..., weight=...), ...]
        # (replaces name / train_files when non-empty).
        mixture=[],
        # name='tfds': the feature names of the image and its caption ('captions/text', or
        # 'label:a photo of a {}.' for classification data).
        image_key="image",
        caption_key="caption",
        # Interleaved documents (LM and Flamingo): up to max_images image-text chunks per
        # document, docs_per_row documents packed into each row of seq_length tokens
        # (0 = the model's max_length). Image-text pairs (CLIP, SigLIP, CoCa) ignore these.
        max_images=5,
        seq_length=0,
        docs_per_row=1,
        # Documents other than shapes. name='tfds' | 'jsonl' | 'array_record' with an LM: a text
        # corpus (input_pipeline/text.py; for tfds, train_files='<name>@<split>' of a dataset
        # prepared in data_dir); name='webdataset' with Flamingo: OBELICS / MMC4-layout document
        # tars (input_pipeline/interleaved.py). eval_files: held-out text of the same kind as
        # train_files, read by an lm_loss entry with dataset='eval_files'. text_key: the JSON field / TFDS feature of the
        # text. record_format (array_record text): 'text' (a record is UTF-8 text) or 'json' (a
        # JSON object with text_key). min_image_similarity: MMC4 images matched to their
        # sentence below this CLIP similarity are left out (open_flamingo: 0.24-0.32).
        eval_files="",
        text_key="text",
        record_format="text",
        min_image_similarity=0.0,
    )

    # ---- loss -----------------------------------------------------------------------------------
    c.loss = dict(
        # 'softmax' (CLIP's InfoNCE) or 'sigmoid' (SigLIP's pairwise loss; needs
        # model.logit_bias_init). See vlm_jax/losses.py.
        name="softmax",
        # How the contrastive loss crosses devices: 'gather' (all-gather, local b x B logits),
        # 'ring' (text blocks passed around with ppermute), 'chunked' (softmax only: the
        # logits walked in b x chunk_size blocks, recomputed in the backward pass) or
        # 'ring_recompute' ('ring' re-run in the backward pass: O(b x D) memory, texts sent twice).
        variant="gather",
        chunk_size=0,  # chunked: the block width (0 = the default).
        # CoCa: loss = contrastive_weight x contrastive + caption_weight x captioning
        # cross-entropy (open_clip's defaults 1.0 and 2.0). LM / Flamingo train on next-token
        # cross-entropy and read no loss key.
        contrastive_weight=1.0,
        caption_weight=2.0,
        # SigLIP 2's self-supervised terms (CLIP / SigLIP family; vlm_jax/distill.py), each off
        # at weight 0: loss = contrastive + self_distill_weight x SILC local-to-global
        # self-distillation + masked_pred_weight x TIPS masked prediction, from step
        # ssl_start_fraction x total_steps, against an EMA teacher (momentum ema_momentum) of
        # the image tower. They need model.ssl_prototypes > 0 (the projection heads).
        # experiments/siglip2_tiny_shapes.py gives the published values and their sources.
        self_distill_weight=0.0,
        masked_pred_weight=0.0,
        ssl_start_fraction=0.8,
        ema_momentum=0.996,
        local_views=8,
        local_size=0,  # the local views' side (0: 96/224 of the image side, patch multiple)
        global_crop_scale=[0.4, 1.0],  # fractions of the image area (SILC)
        local_crop_scale=[0.05, 0.4],
        mask_ratio=0.5,
        student_temp=0.1,
        teacher_temp=0.04,
        # LocCa (model.name='locca', vlm_jax/families/locca.py): loss = contrastive (+ the
        # SigLIP 2 terms above) + locca_weight x the decoder's cross-entropy on per-example
        # Cap / ARef / GCap sequences drawn with the relative frequencies locca_task_weights,
        # a locca_parallel_fraction of them predicted in parallel (CapPa). Sources:
        # experiments/locca_tiny_shapes.py.
        locca_weight=1.0,
        locca_task_weights=[1.0, 1.0, 1.0],
        locca_parallel_fraction=0.5,
    )

    # ---- optim: OpenAI CLIP's recipe (Radford et al., 2021, Table 20) ---------------------------
    # AdamW with decoupled weight decay on weights only (not gains, biases, the class token or
    # the temperature, as open_clip), linear warm-up then the schedule. See vlm_jax/optim.py.
    c.optim = dict(
        name="adamw",  # The only optimizer.
        lr=5e-4,  # Peak learning rate, reached after warmup_steps.
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.2,
        warmup_steps=2000,  # Must be smaller than total_steps.
        schedule="cosine",  # After the warm-up: 'cosine', 'linear' (decay) or 'constant'.
        end_lr_factor=0.0,  # The final learning rate, as a fraction of lr.
        grad_clip_norm=0.0,  # Global-norm gradient clipping (0 = off).
        # A step is one optimizer update on batch_size examples: total_steps, warmup_steps and
        # the logged train/lr count updates. grad_accum_steps=k computes each step in k
        # micro-batches of batch_size / k (memory of one micro-batch; k must divide the rows
        # of each batch shard). grad_accum_mode: 'embeddings' (contrastive families: the loss
        # over all batch_size embeddings, every negative kept, equal to k=1; one extra forward
        # pass), 'gradients' (the mean of the micro-batches' objectives: exact for per-example
        # losses, but a contrastive micro-batch then sees only its own negatives), 'auto' (the
        # first for contrastive families, the second otherwise).
        grad_accum_steps=1,
        grad_accum_mode="auto",
        # A regular expression on parameter paths (re.search, e.g. '^(resampler|xattn)\.'):
        # only matching parameters train, the others are frozen and get no optimizer state
        # ('' = every parameter trains).
        trainable="",
    )

    # ---- mesh and sharding ----------------------------------------------------------------------
    # The global device mesh: the batch is split over slice x data x fsdp; parameters and
    # optimizer state are sharded over fsdp (ZeRO-3); mlp / heads / vocab dimensions over tensor.
    # One axis may be -1 and takes the remaining devices. slice > 1: a multi-slice run (only the
    # slice axis crosses the data-centre network).
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1)
    # [logical axis name, mesh axis or list of mesh axes or None]: how each parameter and
    # activation dimension (embed, mlp, heads, batch, ...) maps onto the mesh (vlm_jax/parallel.py).
    c.axis_rules = [list(r) for r in parallel.DEFAULT_RULES]

    # ---- checkpoint -----------------------------------------------------------------------------
    c.checkpoint = dict(
        # Saved every every_steps (and on SIGTERM, and at the end of the run).
        every_steps=1000,
        # The newest `keep` are kept, plus every keep_every_steps-th (0 = none) for later
        # evaluation.
        keep=3,
        keep_every_steps=0,
        async_save=True,  # Write in the background while training continues.
        # Resume although data.train_files / mixture / tokenizer differ from the checkpoint's
        # (refused otherwise); the saved data-iterator position is applied to the new data.
        allow_data_change=False,
    )

    # ---- eval: settings shared by every evaluation entry (config.evals, vlm_jax/evaluation.py) --
    c.eval = dict(
        batch_size=256,  # Images / texts per feature-extraction batch (global).
        # Where 'tfds:<name>' evaluation datasets live ('' = $TFDS_DATA_DIR or
        # ~/tensorflow_datasets); local or gs://.
        data_dir="",
        # How vlm_jax.load(...).preprocess fits an image to the model's size: 'shortest' (resize
        # the short side, centre crop: OpenAI's and open_clip's default) or 'squash' (resize
        # both sides); `vlm-jax convert` takes it from open_clip_config.json.
        resize_mode="shortest",
    )

    # ---- guard: a NaN/Inf loss or gradient ------------------------------------------------------
    # 'stop' the run (the last good checkpoint is kept) or 'skip' the step (parameters and
    # optimizer state unchanged), stopping after max_consecutive_skips bad steps in a row.
    c.guard = dict(nonfinite="stop", max_consecutive_skips=10)

    # ---- profile --------------------------------------------------------------------------------
    # Trace steps start_step .. start_step+num_steps-1 with jax.profiler into <workdir>/profile
    # (num_steps=0: off; step 1 includes the compile). See vlm_jax/profiling.py.
    c.profile = dict(start_step=0, num_steps=0)

    # ---- init_from: parts of the model initialised from trained runs ----------------------------
    # {target: dict(workdir=<run>, subtree=<path in that run's params, '' = all>, step=<None =
    # latest>)}, e.g. Flamingo's frozen towers: dict(vision=dict(workdir='runs/clip_tiny',
    # subtree='image'), lm=dict(workdir='runs/lm_tiny', subtree='')), or LiT's locked image tower
    # from a `vlm-jax convert`-ed OpenAI / open_clip model (its output is a workdir too:
    # config.json + checkpoints/0): dict(image=dict(workdir='runs/openai_b16', subtree='image'),
    # image_projection=dict(workdir='runs/openai_b16', subtree='image_projection')). {} = none.
    c.init_from = {}

    # ---- published: the results the experiment reproduces (a record; the code reads none) -------
    c.published = {}
    return c
