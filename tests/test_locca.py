"""LocCa's decoder (vlm_jax/models/locca.py, vlm_jax/families/locca.py):

1. box tokens: quantisation and the bin centres against numpy arithmetic written here;
2. the task sequences of a shapes record against hand-built ones; the draws the same on 1 and
   2 processes; the decoder's inputs (teacher forcing, CapPa's masked inputs) against numpy;
3. the decoder loss against CoCa's captioning loss on the same caption tokens, and against a
   numpy cross-entropy on the target positions of ARef / GCap rows;
4. train steps sharded over 8 devices equal one device within 1e-5;
5. ``locate`` through the extractor on a constructed decoder whose logits name a known box at
   the four positions after the ARef prompt (and ``eos`` louder still: the readout must keep to
   box tokens), and the family's data, spec and default evaluations.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline.locca import LoccaTargets
from vlm_jax.models.locca import text_pieces
from tests.model_fixtures import clip_pair_batch, randomize, step_losses
from vlm_jax import config as config_lib
from vlm_jax.families import get_family
from vlm_jax.models import coca, locca
from vlm_jax.parallel import create_mesh

EXPERIMENT = "experiments/locca_tiny_shapes.py"


def _config(repo_root, arg="test", *overrides):
    return config_lib.load_config(f"{repo_root / EXPERIMENT}:{arg}", list(overrides))


def _layout(num_bins=64):
    return locca.TokenLayout(text_vocab=512, num_bins=num_bins, expression_length=12,
                             max_length=24, bos_id=2, eos_id=3, pad_id=0)


# --- 1. boxes -----------------------------------------------------------------------------------

def test_box_quantisation_round_trip_against_numpy():
    rng = np.random.default_rng(0)
    n = 64
    boxes = rng.uniform(0, 1, size=(200, 4)).astype(np.float32)
    boxes[:4] = [[0.0, 1.0, 0.5, 1 / 64], [63.999 / 64, 0.25, 1e-7, 0.999999]] * 2
    expected = np.array([[min(int(v * n), n - 1) for v in row] for row in boxes.tolist()])
    bins = locca.quantize_boxes(boxes, n)
    np.testing.assert_array_equal(bins, expected)
    np.testing.assert_array_equal(np.asarray(locca.quantize_boxes(jnp.asarray(boxes), n)),
                                  expected)
    centres = locca.dequantize_boxes(bins, n)
    np.testing.assert_allclose(centres, (expected + 0.5) / n, rtol=1e-6)
    assert np.abs(centres - boxes).max() <= 0.5 / n + 1e-6  # within half a bin
    np.testing.assert_array_equal(locca.quantize_boxes(centres, n), bins)  # centres are fixed
    lay = _layout(n)
    tokens = lay.box_tokens(boxes[5])
    assert tokens.tolist() == [512 + 3 + b for b in expected[5]]
    np.testing.assert_allclose(lay.tokens_to_boxes(tokens), centres[5], rtol=1e-6)


# --- 2. sequences -------------------------------------------------------------------------------

def test_task_sequences_and_decoder_inputs():
    lay = _layout()
    box = np.array([0.1, 0.2, 0.5, 0.9], np.float32)
    b = [512 + 3 + int(v * 64) for v in box]  # the box tokens, by hand
    aref, t_aref = lay.sequence("aref", [7, 8, 9], box)
    assert aref.tolist() == [512, 7, 8, 9] + [0] * 9 + [514] + b + [3] + [0] * 5
    assert np.flatnonzero(t_aref).tolist() == list(range(14, 19))  # box + eos
    gcap, t_gcap = lay.sequence("gcap", [5, 6], box)
    assert gcap.tolist() == [513] + b + [514, 5, 6, 3] + [0] * 15
    assert np.flatnonzero(t_gcap).tolist() == [6, 7, 8]
    cap, t_cap = lay.sequence("cap", list(range(4, 40)))  # cut to fit, eos kept
    assert cap.tolist() == list(range(4, 27)) + [3] and t_cap.all()
    assert lay.aref_prompts([[7, 8, 9]]).tolist() == [[2, 512, 7, 8, 9] + [0] * 9 + [514]]

    labels = np.stack([aref, gcap, cap])
    target = np.stack([t_aref, t_gcap, t_cap])
    parallel = np.array([True, False, True])
    got = np.asarray(locca.decoder_inputs(jnp.asarray(labels), jnp.asarray(target),
                                          jnp.asarray(parallel), lay))
    want = np.concatenate([np.full((3, 1), 2), labels[:, :-1]], axis=1)  # teacher forcing
    first = target.argmax(1)  # the first scored label of each row
    for r in np.flatnonzero(parallel):  # inputs after the prompt's last token are <mask>
        want[r, first[r] + 1:] = lay.mask_id
    np.testing.assert_array_equal(got, want)


def test_targets_of_a_shapes_record(repo_root, shapes_data_dir):
    from input_pipeline import pipeline  # pylint: disable=import-outside-toplevel

    config = _config(repo_root)
    lay = locca.token_layout(config.model)
    tok = pipeline.tokenizer_for(shapes_data_dir, "shapes", "32px", 24)
    source, _ = pipeline._data_source(shapes_data_dir, "shapes", "32px", "train")  # pylint: disable=protected-access
    record = pipeline.FeatureSubset(source, ("caption", "objects"))[3]
    objects = record["objects"]
    seen = set()
    for seed in range(40):
        for task, weights in (("cap", (1, 0, 0)), ("aref", (0, 1, 0)), ("gcap", (0, 0, 1))):
            out = LoccaTargets(tok, lay, weights, 0.5).random_map(
                record, np.random.default_rng(seed))
            labels = out["locca_labels"].tolist()
            if task == "cap":
                assert labels[:labels.index(3)] == text_pieces(tok, [record["caption"].decode()])[0]
                continue
            box_at = 14 if task == "aref" else 1
            k = [i for i, bx in enumerate(objects["bbox"])
                 if labels[box_at:box_at + 4] == lay.box_tokens(bx).tolist()]
            assert len(k) == 1  # the box of one object of the scene...
            text = objects["refexp" if task == "aref" else "caption"][k[0]].decode()
            words = labels[1:1 + len(text_pieces(tok, [text])[0])] if task == "aref" else \
                labels[6:labels.index(3)]
            assert words == text_pieces(tok, [text])[0]  # ...with its own expression / caption
            seen.add((task, k[0], bool(out["locca_parallel"])))
    assert {p for *_, p in seen} == {True, False}


def test_targets_do_not_depend_on_the_process_count(repo_root, shapes_data_dir):
    """Step t's global batch carries the same (image, task sequence, parallel) rows on 1 and on
    2 processes: the draws come from the global stream position."""
    from input_pipeline import pipeline  # pylint: disable=import-outside-toplevel

    config = _config(repo_root)
    lay = locca.token_layout(config.model)
    tok = pipeline.tokenizer_for(shapes_data_dir, "shapes", "32px", 24)

    def rows(count, steps=3):
        its = [pipeline.create_train_iterator(
            data_dir=shapes_data_dir, config_name="32px", global_batch_size=16, seed=0,
            context_length=24, process_index=i, process_count=count,
            targets=LoccaTargets(tok, lay)) for i in range(count)]
        out = []
        for _ in range(steps):
            batches = [next(it) for it in its]
            out.append(sorted((b["image"][r].tobytes(), b["locca_labels"][r].tobytes(),
                               bool(b["locca_parallel"][r]))
                              for b in batches for r in range(len(b["image"]))))
        return out

    single = rows(1)
    assert rows(2) == single
    tasks = {labels[:4] for step in single for _, labels, _ in step}
    assert len(tasks) > 1  # different tasks were drawn


# --- 3. the loss --------------------------------------------------------------------------------

def _np_cross_entropy(logits, labels, target):
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return (nll * target).sum() / target.sum()


def test_decoder_loss_matches_coca_captioning_loss_and_numpy(repo_root):
    config = _config(repo_root)
    model = randomize(get_family(config).build_model(config.model, nnx.Rngs(0)), scale=0.3)
    lay = model.layout
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
    caps = [lay.sequence("cap", rng.integers(4, 256, rng.integers(3, 20)).tolist())
            for _ in range(4)]
    labels, target = (np.stack(a) for a in zip(*caps))
    ctx = model.image_context(images)
    logits = model.decoder_logits(ctx, jnp.asarray(labels), jnp.asarray(target),
                                  jnp.zeros(4, bool))
    got = float(locca.sequence_loss(logits, jnp.asarray(labels), jnp.asarray(target)))
    # CoCa's loss reads [bos, caption, eos, pad...] and scores every non-pad label.
    tokens = np.concatenate([np.full((4, 1), lay.bos_id), labels], axis=1)
    ref = float(coca.captioning_loss(logits, jnp.asarray(tokens), lay.pad_id))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(got, _np_cross_entropy(np.asarray(logits), labels, target),
                               rtol=1e-5)

    box = rng.uniform(0, 1, 4)
    rows = [lay.sequence("aref", [9, 10], box), lay.sequence("gcap", [5, 6, 7], box)] * 2
    labels, target = (np.stack(a) for a in zip(*rows))
    parallel = np.array([True, True, False, False])
    logits = model.decoder_logits(ctx, jnp.asarray(labels), jnp.asarray(target),
                                  jnp.asarray(parallel))
    got = float(locca.sequence_loss(logits, jnp.asarray(labels), jnp.asarray(target)))
    np.testing.assert_allclose(got, _np_cross_entropy(np.asarray(logits), labels, target),
                               rtol=1e-5)
    # Causal rows see no later label; parallel rows see no target label at all.
    changed = labels.copy()
    changed[:, 16:] = 7
    again = np.asarray(model.decoder_logits(ctx, jnp.asarray(changed), jnp.asarray(target),
                                            jnp.asarray(parallel)))
    np.testing.assert_allclose(again[:, :17], np.asarray(logits)[:, :17], atol=1e-5)
    assert not np.allclose(again[2:, 17:], np.asarray(logits)[2:, 17:])
    np.testing.assert_allclose(again[0, :], np.asarray(logits)[0, :], atol=1e-5)  # ARef, masked


# --- 4. sharded steps ---------------------------------------------------------------------------

def _batch(config, seed):
    rng = np.random.default_rng(seed)
    batch = clip_pair_batch(config, seed)
    lay = locca.token_layout(config.model)
    rows = [lay.sequence(locca.TASKS[i % 3], rng.integers(4, 256, rng.integers(2, 12)).tolist(),
                         np.sort(rng.uniform(0, 1, 4))) for i in range(config.batch_size)]
    labels, target = (np.stack(a) for a in zip(*rows))
    batch.update(locca_labels=labels, locca_target=target,
                 locca_parallel=rng.uniform(size=config.batch_size) < 0.5)
    return batch


def test_train_steps_sharded_match_one_device(repo_root):
    config = _config(repo_root, "test", "model.image.num_heads=2")
    batches = [_batch(config, i) for i in range(2)]
    ref, _ = step_losses(config, create_mesh({}, devices=jax.devices()[:1]), batches)
    got, _ = step_losses(config, create_mesh({"data": 8}), batches)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert ref[1] != ref[0]


# --- 5. locate and the family -------------------------------------------------------------------

def _layer_norm(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_locate_reads_the_box_after_the_aref_prompt(repo_root):
    """The decoder's layers are zeroed, so position ``t``'s logits are ``LN(pos_embed[t]) @ W``;
    ``W`` names bin ``b_k`` at the position predicting coordinate ``k`` (and ``eos`` louder,
    which the box readout must ignore): ``locate`` must return those bins' centres."""
    from vlm_jax import parallel  # pylint: disable=import-outside-toplevel
    from vlm_jax.evaluators import EVALUATORS  # pylint: disable=import-outside-toplevel
    from vlm_jax.evaluators.common import FeatureExtractor  # pylint: disable=import-outside-toplevel

    config = _config(repo_root)
    model = get_family(config).build_model(config.model, nnx.Rngs(0))
    lay, dec = model.layout, model.decoder
    for _, var in nnx.to_flat_state(nnx.state(dec.decoder.blocks, nnx.Param)):
        var.set_value(jnp.zeros_like(var.get_value()))
    width = dec.width
    dec.token_embed.embedding.set_value(jnp.zeros((lay.vocab_size, width)))
    pos = np.eye(lay.max_length, width, dtype=np.float32)
    dec.pos_embed.set_value(jnp.asarray(pos))
    feats = _layer_norm(pos)
    bins = [5, 11, 17, 30]  # (ymin, xmin, ymax, xmax)
    w = np.zeros((width, lay.vocab_size), np.float32)
    p = lay.expression_length + 3  # the decoding prompt: bos <aref> expression <sep>
    for k, b in enumerate(bins):
        w[:, lay.box_start + b] = 10 * feats[p - 1 + k]
        w[:, lay.eos_id] += 20 * feats[p - 1 + k]
    dec.decoder.vocab_projection.kernel.set_value(jnp.asarray(w))

    mesh = create_mesh({"data": 8})
    graphdef, state = nnx.split(model)
    shardings = parallel.state_shardings(state, mesh, parallel.DEFAULT_RULES)
    params = jax.device_put(state.to_pure_dict(), shardings)
    extractor = FeatureExtractor(graphdef, params, shardings, mesh,
                                 parallel.DEFAULT_RULES, batch_size=8, tokenizer=_Tokenizer())
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3)).astype(np.uint8)
    expressions = ["the red circle", "the square in the top left"] * 5
    boxes = extractor.locate(images, expressions)
    np.testing.assert_allclose(boxes, np.tile((np.array(bins) + 0.5) / lay.num_bins, (10, 1)),
                               rtol=1e-6)
    truth = {"image": images, "refexp": expressions,
             "refexp_bbox": np.tile((np.array(bins) + 0.5) / lay.num_bins, (10, 1))}
    result = EVALUATORS["refexp"](extractor, None, truth)
    assert result["acc@0.5"] == 1.0
    truth["refexp_bbox"] = np.tile([0.6, 0.6, 0.9, 0.9], (10, 1))
    assert EVALUATORS["refexp"](extractor, None, truth)["acc@0.5"] == 0.0


class _Tokenizer:
    """Word ids for the constructed case (the readout ignores the expression there)."""
    bos_id, eos_id, pad_id = 2, 3, 0

    def encode(self, texts):
        out = np.zeros((len(texts), 24), np.int32)
        for row, text in zip(out, texts):
            ids = [2, *[4 + len(w) for w in text.split()], 3]
            row[:len(ids)] = ids
        return out


def test_family_spec_evals_and_refusals(repo_root):
    config = _config(repo_root)
    family = get_family(config)
    assert family.name == "locca" and {"embed", "caption", "locate"} <= family.capabilities
    spec = family.batch_spec(config)
    assert spec["locca_labels"].shape == (16, 24) and spec["locca_parallel"].shape == (16,)
    assert {"zeroshot", "retrieval", "captioning", "refexp"} <= set(family.default_evals(config))
    assert {"captioning", "refexp"} <= set(config.evals)
    with pytest.raises(config_lib.ConfigError, match="need boxes.*data.name='shapes'"):
        family.make_data(_config(repo_root, "test", "data.name=webdataset"))
    bad = _config(repo_root)
    bad.model.decoder.bos_id = 1
    with pytest.raises(config_lib.ConfigError, match="bos / eos / pad are 2 / 3 / 0"):
        family.make_data(bad)
    assert family.flops_per_example(config.model) > get_family("clip").flops_per_example(
        config.model)
