"""Captioning metrics (vlm_jax.evaluators.captioning): hand-computed BLEU / ROUGE-L cases,
CIDEr-D against an independent numpy implementation of the paper's formula, the Python PTB
tokenisation against pycocoevalcap's Java tokenizer (when java is installed), the evaluator with a
fake captioning extractor, and the most-frequent-caption baseline."""

import collections
import math
import shutil

import numpy as np
import pytest

from vlm_jax.evaluators.captioning import (caption_metrics, evaluate, most_frequent_caption,
                                           most_frequent_caption_baseline, tokenize)

BETA = 1.2  # pycocoevalcap's ROUGE-L beta.


# -------------------------------------------------------------------------------------------
# Tokenisation.
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("A Bathroom, with a toilet; sink: and SHOWER!", "a bathroom with a toilet sink and shower"),
    ("Is this a kitchen? Yes...", "is this a kitchen yes"),
    ('A sign that says "STOP" -- or \u201cgo\u201d \u2013 here',
     "a sign that says stop or go here"),
    ("A woman's hand; it's a dog's life", "a woman 's hand it 's a dog 's life"),
    ("He isn't, can't, won't", "he is n't ca n't wo n't"),
    ("cannot gonna", "can not gon na"),
    # Brackets become -lrb- / -rrb- and stay: the Java tokenizer lower-cases them, and
    # pycocoevalcap's PUNCTUATIONS only lists the upper-case "-LRB-".
    ("A dog (a retriever) [x]", "a dog -lrb- a retriever -rrb- -lsb- x -rsb-"),
    ("A 2.5-inch t-shirt, 1,000 people at 10:30", "a 2.5-inch t-shirt 1,000 people at 10:30"),
    ("Mr. Smith in the U.S. at 5 p.m. (etc.)", "mr. smith in the u.s. at 5 p.m. -lrb- etc. -rrb-"),
    ("The dog is ill. Say no. No. 5", "the dog is ill say no no. 5"),
    ("50% off $5 a+b", "50 % off $ 5 a + b"),
    ("wow!! ok?!", "wow !! ok ?!"),
    ("...", ""),
    ("", ""),
])
def test_tokenize_examples(text, expected):
    assert tokenize(text) == expected


def test_tokenize_rejects_non_strings():
    with pytest.raises(TypeError, match="str caption"):
        tokenize(3)


# Caption-like sentences with the constructs the tokenizer handles; the Java PTBTokenizer of
# pycocoevalcap is the reference for all of them.
JAVA_CORPUS = [
    "A man riding a wave on top of a surfboard.",
    "A bathroom with a toilet, sink, and shower.",
    "A woman's hand holding a cell phone.",
    "The cat is sitting on the laptop's keyboard.",
    "a large red circle left of a small blue square.",
    "An old-fashioned clock tower in the middle of town.",
    "A dog (a golden retriever) plays fetch.",
    "People at the beach; some are swimming.",
    'A sign that says "STOP" at the intersection.',
    "A sign reading 'No Parking' near a fire hydrant",
    "a bus that is driving down the street , near a building .",
    "A train is going down the tracks...",
    "There are 3 zebras, 2 giraffes & 1 elephant.",
    "A person on skis going down a snow-covered slope!",
    "Is this a kitchen? Yes, it is.",
    "A young boy isn't wearing a helmet while he's skating.",
    "A kid who can't stop laughing at his dad's joke",
    "Several people are standing outside a St. Patrick's Day parade.",
    "A 12-year-old girl with a 2.5 lb. fish",
    "The U.S. flag flies over the Washington D.C. building.",
    "Mr. and Mrs. Smith cutting their wedding cake",
    "Man in a black jacket--holding an umbrella.",
    "Man in a black jacket - holding an umbrella.",
    "Two men playing frisbee: one is jumping.",
    "A woman at 5:30 p.m. waiting for her train.",
    "A vase with flowers [roses] on a table {wooden}",
    "A man is doing a trick on his skateboard!!",
    "A bowl filled with oranges,bananas and apples.",
    "A photo of a 1950's car",
    "The kids' toys are all over the floor.",
    "A bike parked next to a pole w/ a sign.",
    "Two birds sit on a wire... one flies away.",
    "An airplane flying in the sky \u2014 very high.",
    "The giraffe is eating leaves from the tree?",
    "A zebra in the grass, e.g. at the zoo.",
    "They're eating pizza; we're not.",
    "A vintage car (circa 1920) parked on the street.",
    "a black cat sits in front of a t.v.",
    "a woman in a t-shirt & jeans at AT&T",
    "a table with a 50% off sign and a price tag of $5.99",
    "Oranges, apples, bananas, etc. on a table.",
    "A stop sign at Main St. and 5th Ave.",
    "the dog is ill. the car wash. a big miss. Wash. the answer is no. No. 5 and fig. 3",
    "Dr. Who and the co. at Mt. Hood vs. a.m. and Jan. 5",
    "the dog\u2019s bowl isn\u2019t \u201cbig\u201d \u2018ok\u2019 \u2026 fine",
    "don't DON'T I'm you'll we've she'd o'clock rock'n'roll y'all '80s 'em",
    "gonna gotta wanna cannot 'tis 'twas",
    "x-ray 100-year-old -5 5- 5-6 --- -- a.b.c. hello.world foo.bar. 3.5. 4.",
    "wow!!! really?? what?! #tag @user #1",
    "and etc... ok a... and Mr.. x the dog.. and dog.... Wash. and Ill. and ill. ok",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs java")
def test_tokenize_matches_pycocoevalcap_java_tokenizer():
    from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=import-outside-toplevel

    java = ptbtokenizer.PTBTokenizer().tokenize(
        {i: [{"caption": c}] for i, c in enumerate(JAVA_CORPUS)})
    mismatches = [(c, tokenize(c), java[i][0]) for i, c in enumerate(JAVA_CORPUS)
                  if tokenize(c) != java[i][0]]
    assert not mismatches, "\n".join(f"{c!r}\n  python: {p!r}\n  java:   {j!r}"
                                     for c, p, j in mismatches)


# -------------------------------------------------------------------------------------------
# BLEU and ROUGE-L: hand-checkable cases.
# -------------------------------------------------------------------------------------------


def test_identical_prediction_gives_bleu_and_rouge_one():
    m = caption_metrics(["a man riding a horse on the beach"],
                        [["A man riding a horse on the beach."]])
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-8)
    assert m["bleu1"] == pytest.approx(1.0, abs=1e-8)
    assert m["rouge_l"] == pytest.approx(1.0, abs=1e-12)


def test_prediction_sharing_no_word_gives_zero():
    m = caption_metrics({"img": "two cats sleeping"},
                        {"img": ["a dog runs on the grass", "the dog is running"]})
    # pycocoevalcap adds 1e-15 to matched counts, so "0" is ~1e-16, not exactly 0.
    assert m["bleu1"] == pytest.approx(0.0, abs=1e-12)
    assert m["bleu4"] == pytest.approx(0.0, abs=1e-12)
    assert m["rouge_l"] == 0.0
    assert m["cider"] == 0.0


PRED = "a man riding a horse on the beach"  # 8 words
REFS = ["a man is riding a horse on a beach",  # 9 words
        "a person rides a brown horse along the sandy beach"]  # 10 words


def test_bleu_worked_example():
    # Modified n-gram precisions: a prediction n-gram counts at most as often as it occurs in
    # a single reference (max over references).
    p1 = 8 / 8  # a x2 (ref 1 has 3), man, riding, horse, on (ref 1), the (ref 2), beach
    p2 = 4 / 7  # a man, riding a, a horse, horse on; not: man riding, on the, the beach
    p3 = 2 / 6  # riding a horse, a horse on
    p4 = 1 / 5  # riding a horse on
    # Brevity penalty with the reference length closest to the prediction's: |9-8| < |10-8|.
    c, r = 8, 9
    bp = math.exp(1 - r / c)
    m = caption_metrics([PRED], [REFS])
    assert m["bleu1"] == pytest.approx(bp * p1, rel=1e-7)
    assert m["bleu4"] == pytest.approx(bp * (p1 * p2 * p3 * p4) ** 0.25, rel=1e-7)


def test_bleu_is_corpus_level():
    # Counts and lengths are summed over images before the precisions are taken.
    m = caption_metrics([PRED, "A cat."], [REFS, ["a cat"]])
    p1, p2, p3, p4 = (8 + 2) / (8 + 2), (4 + 1) / (7 + 1), 2 / 6, 1 / 5
    c, r = 8 + 2, 9 + 2
    bp = math.exp(1 - r / c)
    assert m["bleu1"] == pytest.approx(bp * p1, rel=1e-7)
    assert m["bleu4"] == pytest.approx(bp * (p1 * p2 * p3 * p4) ** 0.25, rel=1e-7)
    # Not the mean of the per-image scores (the second image alone has no 3- or 4-grams).
    per_image = (caption_metrics([PRED], [REFS])["bleu4"]
                 + caption_metrics(["a cat"], [["a cat"]])["bleu4"]) / 2
    assert abs(m["bleu4"] - per_image) > 0.05


def f_measure(p, r, beta=BETA):
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def test_rouge_l_worked_example():
    # LCS(pred, ref 1) = "a man riding a horse on beach" = 7 -> P 7/8, R 7/9.
    # LCS(pred, ref 2) = "a a horse the beach"            = 5 -> P 5/8, R 5/10.
    m = caption_metrics([PRED], [REFS])
    assert m["rouge_l"] == pytest.approx(f_measure(max(7 / 8, 5 / 8), max(7 / 9, 5 / 10)),
                                         rel=1e-12)


def test_rouge_l_takes_best_precision_and_best_recall_separately():
    # pycocoevalcap: F(max_ref P, max_ref R), not max_ref F(P, R).
    # "a dog on the grass" vs "a dog": LCS 2, P 2/5, R 1.
    # vs "a brown dog running on the green grass": LCS "a dog on the grass" = 5, P 1, R 5/8.
    m = caption_metrics(["a dog on the grass"],
                        [["a dog", "a brown dog running on the green grass"]])
    assert m["rouge_l"] == pytest.approx(f_measure(1.0, 1.0), rel=1e-12)
    assert f_measure(2 / 5, 1.0) < 0.8 and f_measure(1.0, 5 / 8) < 0.8
    # Averaged over images.
    m2 = caption_metrics(["a dog on the grass", PRED],
                         [["a dog", "a brown dog running on the green grass"], REFS])
    assert m2["rouge_l"] == pytest.approx((1.0 + f_measure(7 / 8, 7 / 9)) / 2, rel=1e-12)


# -------------------------------------------------------------------------------------------
# CIDEr-D.
# -------------------------------------------------------------------------------------------


def ngram_counts(words, k):
    return collections.Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))


def cider_d_reference(preds, refs, n=4, sigma=6.0, clip=True):
    """CIDEr-D from Vedantam et al. (2015), sec. 3 and 6, with dense numpy tf-idf vectors.

    g^n(s) = tf(n-gram, s) * log(N / max(1, df)), df = number of images whose references contain
    the n-gram; per n: mean over references of exp(-(l_c - l_r)^2 / (2 sigma^2)) *
    <min(g(c), g(r)), g(r)> / (|g(c)| |g(r)|); CIDEr-D = 10 * mean over n, averaged over images.
    Lengths are word counts (pycocoevalcap counts bigrams, the same difference for non-empty
    sentences, which is all this test uses).
    """
    preds = [p.split() for p in preds]
    refs = [[r.split() for r in rs] for rs in refs]
    num_images = len(preds)
    scores = np.zeros(num_images)
    for k in range(1, n + 1):
        vocab = sorted({g for s in preds + [r for rs in refs for r in rs]
                        for g in ngram_counts(s, k)})
        index = {g: j for j, g in enumerate(vocab)}
        df = np.zeros(len(vocab))
        for rs in refs:
            for g in {g for r in rs for g in ngram_counts(r, k)}:
                df[index[g]] += 1
        idf = np.log(num_images) - np.log(np.maximum(df, 1.0))

        def vec(words, k=k, index=index, idf=idf):
            v = np.zeros(len(index))
            for g, c in ngram_counts(words, k).items():
                v[index[g]] = c
            return v * idf

        for i, (p, rs) in enumerate(zip(preds, refs)):
            gc = vec(p)
            sims = []
            for r in rs:
                gr = vec(r)
                denom = np.linalg.norm(gc) * np.linalg.norm(gr)
                sim = (np.minimum(gc, gr) if clip else gc) @ gr / denom if denom > 0 else 0.0
                sims.append(sim * np.exp(-(len(p) - len(r)) ** 2 / (2 * sigma ** 2)))
            scores[i] += np.mean(sims) / n
    return 10.0 * scores.mean()


def test_cider_identical_captions_two_images():
    # Every reference equals the prediction. "a" occurs in both images' references: idf =
    # log(2/2) = 0. All other n-grams: idf log(2) > 0, and the cosine of a vector with itself is 1
    # for n = 1, 2, 3. No 4-grams in three words: 0. CIDEr = 10 * (1 + 1 + 1 + 0) / 4 = 7.5.
    m = caption_metrics(["a dog runs", "a cat sleeps"],
                        [["a dog runs", "A dog runs."], ["a cat sleeps"]])
    assert m["cider"] == pytest.approx(7.5, rel=1e-12)
    assert m["cider"] == pytest.approx(
        cider_d_reference(["a dog runs", "a cat sleeps"],
                          [["a dog runs", "a dog runs"], ["a cat sleeps"]]), rel=1e-12)
    # Four words, no n-gram shared between the images: every n contributes 1 -> 10.
    m = caption_metrics(["one brown dog runs", "two cats sleep inside"],
                        [["one brown dog runs"], ["two cats sleep inside"]])
    assert m["cider"] == pytest.approx(10.0, rel=1e-12)


def test_cider_no_shared_ngram_is_zero():
    preds = ["purple elephants fly", "a cat sleeps"]
    refs = [["a dog runs on grass"], ["a cat sleeps"]]
    # Image 0 shares no n-gram with its reference: 0. Image 1: "a" has df 2 -> idf 0, the rest
    # as in the test above -> 7.5. Mean over images: 3.75.
    assert caption_metrics(preds, refs)["cider"] == pytest.approx((0.0 + 7.5) / 2, rel=1e-12)
    assert cider_d_reference(preds, refs) == pytest.approx((0.0 + 7.5) / 2, rel=1e-12)


def test_cider_single_image_corpus_is_zero():
    # idf = log(1) - log(1) = 0 for every reference n-gram: CIDEr needs a corpus.
    assert caption_metrics(["a dog runs"], [["a dog runs"]])["cider"] == 0.0


def test_cider_matches_independent_numpy_formula():
    preds = ["a dog a dog a dog runs",  # repeated n-grams: clipping
             "a small cat sleeps on a red sofa in the sun",  # length penalty vs short refs
             "two people ride bikes",
             "a man riding a horse on the beach"]
    refs = [["a dog runs", "a brown dog runs in the park", "the dog is running"],
            ["a cat sleeps", "a cat on a sofa", "a cat is sleeping on a red sofa"],
            ["two people riding bikes down a road", "people on bicycles"],
            REFS]
    m = caption_metrics(preds, refs)
    expected = cider_d_reference(preds, refs)
    assert 0.1 < expected < 10
    assert m["cider"] == pytest.approx(expected, rel=1e-10)
    # The cases exercise the clipping (repeated "a dog") and the length penalty: without either,
    # the score would differ.
    assert cider_d_reference(preds, refs, clip=False) > expected * 1.01
    assert cider_d_reference(preds, refs, sigma=1e9) > expected * 1.01


# -------------------------------------------------------------------------------------------
# Inputs.
# -------------------------------------------------------------------------------------------


def test_dict_and_list_inputs_agree():
    preds = ["a dog runs", "a cat sleeps on a sofa"]
    refs = [["a dog is running", "the dog runs"], ["a cat on a sofa"]]
    as_list = caption_metrics(preds, refs)
    as_dict = caption_metrics({"b": preds[1], "a": preds[0]}, {"a": refs[0], "b": refs[1]})
    assert as_list == pytest.approx(as_dict, rel=1e-12)
    assert set(as_list) == {"cider", "bleu4", "bleu1", "rouge_l"}
    assert all(isinstance(v, float) for v in as_list.values())


def test_input_errors():
    with pytest.raises(ValueError, match="same image ids"):
        caption_metrics({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption_metrics(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="both be dicts"):
        caption_metrics({1: "a dog"}, [["a dog"]])
    with pytest.raises(ValueError, match="no reference caption"):
        caption_metrics(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match="no images"):
        caption_metrics([], [])
    with pytest.raises(ValueError, match="empty after tokenisation"):
        caption_metrics(["a dog", "a cat"], [["."], ["!"]])


# -------------------------------------------------------------------------------------------
# The evaluator and the baseline.
# -------------------------------------------------------------------------------------------


class FakeCaptioner:
    """A feature extractor whose ``captions`` returns fixed strings (and records its input)."""

    def __init__(self, captions):
        self._captions = captions
        self.seen = None

    def captions(self, images):
        self.seen = images
        return list(self._captions)


IMAGES = np.zeros((3, 8, 8, 3), np.float32)
GENERATED = ["a dog runs on the grass.", "A cat sleeps on a sofa", "two people ride bikes"]


def test_evaluate_with_several_captions_per_image():
    refs = [["a dog running on grass", "the dog runs"], ["a cat on a sofa"],
            ["people riding bicycles", "two people ride bikes on a road", "bikes"]]
    # COCO layout as a dense [N, K] bytes array, short rows padded with empty strings.
    dense = np.array([[c.encode() for c in r] + [b""] * (3 - len(r)) for r in refs])
    extractor = FakeCaptioner(GENERATED)
    out = evaluate(extractor, None, {"image": IMAGES, "captions": dense})
    assert extractor.seen is IMAGES
    assert set(out) == {"cider", "bleu4", "rouge_l", "bleu1"}
    assert out == pytest.approx(caption_metrics(GENERATED, refs), rel=1e-12)
    # Image 2's prediction equals one of its references exactly: its ROUGE-L is 1, so the mean
    # is at least 1/3.
    assert out["rouge_l"] >= 1 / 3


def test_evaluate_with_one_caption_per_image():
    refs = ["a dog running on grass", "a cat on a sofa", "two people ride bikes"]
    out = evaluate(FakeCaptioner(GENERATED), None, {"image": IMAGES, "caption": refs})
    assert out == pytest.approx(caption_metrics(GENERATED, [[r] for r in refs]), rel=1e-12)


def test_evaluate_errors():
    refs = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"captions\(images\)"):
        evaluate(object(), None, {"image": IMAGES, "caption": refs})
    with pytest.raises(ValueError, match=r"data\['caption'\].*data\['captions'\]"):
        evaluate(FakeCaptioner(GENERATED), None, {"image": IMAGES, "text": refs})
    with pytest.raises(ValueError, match="3 images but 2"):
        evaluate(FakeCaptioner(GENERATED), None, {"image": IMAGES, "caption": refs[:2]})
    with pytest.raises(ValueError, match="returned 2 captions for 3 images"):
        evaluate(FakeCaptioner(GENERATED[:2]), None, {"image": IMAGES, "caption": refs})
    with pytest.raises(ValueError, match="unknown options"):
        evaluate(FakeCaptioner(GENERATED), None, {"image": IMAGES, "caption": refs}, beam=4)


def test_most_frequent_caption_baseline():
    # "a dog" occurs twice after tokenisation ("A dog." and "a dog"); the first raw form wins.
    train = [["A dog.", "a red car"], ["a cat", "a dog"], ["a red bus"]]
    assert most_frequent_caption(train) == "A dog."
    assert most_frequent_caption(["b x", "a y", "a y", "b x"]) == "b x"  # tie: first seen
    refs = [["a dog runs"], ["a cat sleeps"]]
    m = most_frequent_caption_baseline(train, refs)
    assert m == pytest.approx(caption_metrics(["a dog", "a dog"], refs), rel=1e-12)
    # By hand: unigrams matched 2 ("a", "dog") + 1 ("a") of 4; c = 4, closest r = 3 + 3 = 6.
    assert m["bleu1"] == pytest.approx(3 / 4 * math.exp(1 - 6 / 4), rel=1e-7)
    dict_refs = {"x": refs[0], "y": refs[1]}
    assert most_frequent_caption_baseline(train, dict_refs) == pytest.approx(m, rel=1e-12)
    with pytest.raises(ValueError, match="no non-empty training caption"):
        most_frequent_caption(["...", ""])

