"""Interleaved shapes documents, the LM tokenizer, few-shot prompts and VQAv2 accuracy."""
import os

import numpy as np
import pytest

from input_pipeline import DataError, interleaved
from input_pipeline.shapes import generator
from vlm_jax.evaluators import fewshot

IMG, EOC = 512, 513


@pytest.fixture(scope="module")
def tok():
    return interleaved.lm_tokenizer(64)


def test_shipped_tokenizer_is_the_one_the_generator_texts_make(tmp_path):
    path = interleaved.write_lm_tokenizer(str(tmp_path / "lm.model"))
    with open(path, "rb") as a, open(interleaved.LM_TOKENIZER_PATH, "rb") as b:
        assert a.read() == b.read(), "rebuild it: python -m input_pipeline.interleaved"


def test_every_question_kind_has_an_answer_sentence_and_no_unknown_pieces(tok):
    seen = set()
    for i in range(300):
        scene = generator.sample_scene(generator.SPLIT_SEEDS["test"], i)
        sentence = interleaved.answer_sentence(scene.question, scene.answer)
        assert sentence.endswith(scene.answer) or f" {scene.answer} " in sentence
        seen.add(" ".join(scene.question.split()[:2]))
        for text in (scene.caption, interleaved.qa_text(scene.question, scene.answer, False)):
            assert 1 not in tok._sp.encode(text), text  # 1: the unknown piece
    assert len(seen) >= 3
    with pytest.raises(DataError, match="No answer sentence"):
        interleaved.answer_sentence("why is the sky blue?", "because")


def test_layout_of_a_multimodal_document(tok):
    chunks = ["a red circle.", "question: what color is the star? answer: red"]
    tokens, weights, kept = interleaved.layout(chunks, tok, 40, image_id=IMG, eoc_id=EOC)
    sp = tok._sp
    want = ([tok.bos_id, IMG] + sp.encode(chunks[0]) + [EOC, IMG] + sp.encode(chunks[1])
            + [EOC, tok.eos_id])
    assert kept == 2
    assert tokens[:len(want)].tolist() == want and np.all(tokens[len(want):] == 0)
    # Targets: texts, <|endofchunk|> and eos; never bos, <image> or padding.
    expected_w = [0.0 if t in (tok.bos_id, IMG) else 1.0 for t in want]
    assert weights[:len(want)].tolist() == expected_w and np.all(weights[len(want):] == 0)
    # Too long: whole chunks are dropped from the end.
    short, _, kept = interleaved.layout(chunks, tok, len(want) - 1, image_id=IMG, eoc_id=EOC)
    assert kept == 1 and short[:len(sp.encode(chunks[0])) + 4].tolist()[-1] == tok.eos_id
    # A prompt stays open after its last chunk.
    prompt, _, _ = interleaved.layout(["x", "question: how many shapes are there? answer:"],
                                      tok, 40, image_id=IMG, eoc_id=EOC, close=False)
    real = prompt[prompt != 0].tolist()
    assert real[-1] == sp.encode("answer:")[-1] and tok.eos_id not in real
    with pytest.raises(DataError, match="max_length"):
        interleaved.layout(chunks, tok, 3, image_id=IMG, eoc_id=EOC)


def _iterator(data_dir, **kw):
    args = dict(data_dir=data_dir, config_name="32px", split="train", global_batch_size=8,
                seed=3, tokenizer=interleaved.lm_tokenizer(96), max_length=96)
    args.update(kw)
    return interleaved.create_document_iterator(**args)


def test_documents_do_not_depend_on_the_process_count(shapes_data_dir):
    kw = dict(image_id=IMG, eoc_id=EOC, image_size=32)
    one = [next(_iterator(shapes_data_dir, **kw)) for _ in range(1)][0]
    parts = [next(_iterator(shapes_data_dir, process_index=i, process_count=2, **kw))
             for i in range(2)]
    for key in ("tokens", "weights", "images"):
        merged = np.empty_like(one[key])
        merged[0::2], merged[1::2] = parts[0][key], parts[1][key]
        np.testing.assert_array_equal(merged, one[key])
    # Images: one per <image> token, zeros after.
    n_img = (one["tokens"] == IMG).sum(1)
    assert n_img.min() >= 1 and n_img.max() <= 5
    for row, n in zip(one["images"], n_img):
        assert np.all(np.abs(row[:n]).sum((1, 2, 3)) > 0) and np.all(row[n:] == 0)


def test_packed_text_rows_are_full_and_checkpointable(shapes_data_dir):
    it = _iterator(shapes_data_dir, docs_per_row=6, max_length=64)
    first = next(it)
    assert np.all(first["tokens"] != 0)  # packed: no padding
    assert (first["tokens"] == 2).sum(1).min() >= 2  # several documents per row
    state = it.get_state()
    want = next(it)
    it2 = _iterator(shapes_data_dir, docs_per_row=6, max_length=64)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["tokens"], want["tokens"])
    with pytest.raises(DataError, match="text-only"):
        _iterator(shapes_data_dir, docs_per_row=2, image_id=IMG, eoc_id=EOC, image_size=32)


def test_documents_keep_one_answer_style(shapes_data_dir):
    batch = next(_iterator(shapes_data_dir, global_batch_size=64))
    tok = interleaved.lm_tokenizer(96)
    styles = []
    for row in batch["tokens"]:
        text = tok.decode(row)
        if "question:" not in text:
            continue
        answers = [part.split("question:")[0].strip() for part in text.split("answer:")[1:]]
        short = {len(a.split()) == 1 for a in answers}
        assert len(short) == 1, text
        styles.append(short.pop())
    assert len(styles) > 10 and 0 < np.mean(styles) < 1


# VQAv2 accuracy: cases worked by hand from the official vqaEval.py rules.
@pytest.mark.parametrize("pred,answers,acc", [
    ("two", ["2"] * 10, 1.0),
    ("Two.", ["2"] * 10, 1.0),
    ("the red", ["red"], 1.0),
    ("a cat", ["cat"] * 3 + ["dog"] * 7, 0.9),  # 3 of 9 others match in 3 subsets -> 1; else 2/3
    ("dog", ["cat"] * 3 + ["dog"] * 7, 1.0),
    ("bird", ["cat"] * 9 + ["bird"], 0.3),  # 1/3 in the 9 subsets that keep the bird
    ("yes, it is", ["yes"] * 10, 0.0),
    ("1,000", ["1000"] * 10, 1.0),
])
def test_vqa_accuracy(pred, answers, acc):
    assert fewshot.vqa_accuracy(pred, answers) == pytest.approx(acc)


def test_majority_baselines():
    pool_q = ["what color?"] * 3 + ["how many?"] * 2
    pool_a = ["red", "red", "blue", "two", "two"]
    out = fewshot.majority_baselines(pool_q, pool_a, ["what color?", "how many?", "what color?"],
                                     ["red", "two", "blue"])
    # Overall majority: "red" (2 of 5, first counted); per question: red / two.
    assert out["vqa_majority_baseline"] == pytest.approx(1 / 3)
    assert out["vqa_question_prior_baseline"] == pytest.approx(2 / 3)


def test_fewshot_examples_nest_and_prompts_left_pad():
    four = fewshot._example_order(7, 100, 4)
    eight = fewshot._example_order(7, 100, 8)
    assert four.tolist() == eight[:4].tolist() and len(set(eight)) == 8
    tokens, valid = fewshot._left_pad([np.array([5, 6, 7]), np.array([8])], 0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert valid.tolist() == [[True] * 3, [False, False, True]]


@pytest.mark.skipif(os.environ.get("VLM_JAX_SKIP_E2E") == "1", reason="end-to-end disabled")
def test_fewshot_generation_uses_the_images(repo_root, shapes_data_dir):
    """A few-shot VQA run through the evaluator with a random tiny Flamingo: the generations are
    a function of the prompt images (changing the query image changes some answers)."""
    import jax
    from flax import nnx

    from vlm_jax import parallel
    from vlm_jax.evaluators.common import FeatureExtractor
    from vlm_jax.models.flamingo import Flamingo

    model = Flamingo(vision=dict(image_size=32, patch_size=16, width=32, depth=1, num_heads=2,
                                 mlp_dim=64),
                     lm=dict(vocab_size=512, width=32, depth=2, num_heads=2, mlp_dim=64,
                             max_length=160, bos_id=2, eos_id=3),
                     resampler=dict(depth=1, num_latents=4, num_heads=2),
                     cross_attn=dict(num_heads=2), cross_attn_every=1, rngs=nnx.Rngs(0))
    for block in model.xattn:
        block.attn_gate[...] = 3.0
        block.ff_gate[...] = 3.0
    graphdef, params = nnx.split(model)
    mesh = parallel.create_mesh({"data": 2}, devices=jax.devices()[:2])
    params_sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
    ex = FeatureExtractor(graphdef, params, params_sh, mesh, parallel.DEFAULT_RULES, 4)
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(6, 32, 32, 3)).astype(np.float32)
    data = {"image": imgs, "question": ["what color is the star?"] * 3,
            "answer": ["red"] * 3,
            "pool": {"image": imgs, "question": ["how many shapes are there?"] * 6,
                     "answer": ["two"] * 6, "caption": ["a red star."] * 6},
            "prompt_format": interleaved.PromptFormat(interleaved.lm_tokenizer(160), 512, 513)}
    data["image"] = imgs[:3]
    tok = interleaved.lm_tokenizer(160)
    a = fewshot.generate_fewshot(ex, tok, data, "vqa", 2, 6)
    data2 = dict(data, image=-imgs[:3])
    b = fewshot.generate_fewshot(ex, tok, data2, "vqa", 2, 6)
    assert len(a) == 3 and a != b
