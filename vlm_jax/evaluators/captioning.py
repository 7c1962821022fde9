"""Caption generation metrics as the COCO caption evaluation computes them: CIDEr-D, BLEU, ROUGE-L.

The scores come from ``pycocoevalcap`` (the pip package of the COCO caption evaluation code,
github.com/salaniz/pycocoevalcap, which big_vision's COCO caption evaluator also uses):

* ``Bleu(4)``: corpus-level BLEU-1..4 (n-gram counts summed over all images before the modified
  precisions are taken; brevity penalty with the reference length closest to each prediction).
* ``Cider()``: CIDEr-D (Vedantam et al. 2015): tf-idf weighted n-grams, n = 1..4, clipped
  prediction counts, Gaussian length penalty with sigma = 6, mean over references, x10. The
  document frequencies are those of the *evaluated set's references*, so the score depends on the
  whole corpus: evaluate a full split at once, never batch by batch and average. (On a corpus of
  one image every idf is log(1) - log(1) = 0 and CIDEr is 0.)
* ``Rouge()``: ROUGE-L F-measure with beta = 1.2 from the best LCS precision and the best LCS
  recall over an image's references, averaged over images.

Only the tokenisation is re-implemented. pycocoevalcap tokenises predictions and references with
Stanford CoreNLP 3.4.1's ``PTBTokenizer`` (``-preserveLines -lowerCase``) through a ``java``
subprocess and then drops the tokens of its ``PUNCTUATIONS`` list. Java is not available on TPU
VMs or in CI images, so :func:`tokenize` does the same in Python, for the text captions are made
of. It reproduces, as the Java tokenizer does them: lower-casing; splitting off , ; : ! ? and
other symbols (runs of ! / ? stay one token); brackets as ``-lrb-`` ``-rrb-`` ``-lcb-`` ``-rcb-``
``-lsb-`` ``-rsb-`` (lower-cased by ``-lowerCase``, so pycocoevalcap's upper-case ``-LRB-``
entries never match and these tokens stay in the scored text); quotes, ellipses and dashes (also
the Unicode ones) as separate tokens that are then removed; clitics (``dog 's``, ``i 'm``,
``do n't``, ``ca n't``) and assimilations (``can not``, ``gon na``, ``'t is``); numbers with
``.`` ``,`` ``:`` inside (``3.5``, ``1,000``, ``10:30``) and hyphenated or slashed words
(``t-shirt``, ``and/or``, ``o'clock``) kept whole; a word-final period split off except after an
abbreviation (``mr.``, ``st.``, ``etc.``, ``jan.``, single letters and dotted acronyms such as
``u.s.``, ``e.g.``, ``a.m.``; ``no.`` / ``fig.`` only before a number; ``Mass.`` / ``Wash.`` /
``Ill.`` only when capitalised), with the abbreviation lists of CoreNLP 3.4.1's ``PTBLexer``,
checked word by word against the 3.4.1 jar. ``tests/test_captioning_metrics.py`` compares it with
pycocoevalcap's Java ``PTBTokenizer`` whenever ``java`` is installed. Not reproduced (not caption
text): SGML, e-mail addresses, emoticons (``:)`` is ``:-rrb-`` in Java), phone numbers, fractions
written with a space (``3 1/2``, one token in Java), ``c:d`` (``c :d`` in Java) and other rare
lexer corner cases.

``evaluate(extractor, tokenizer, data)`` scores the captions a captioning model generates
(``extractor.captions(images)``) against ``data['caption']`` or ``data['captions']``;
:func:`most_frequent_caption_baseline` is the floor a captioning model must clear.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

# -------------------------------------------------------------------------------------------
# Tokenisation: Stanford PTBTokenizer (CoreNLP 3.4.1, -preserveLines -lowerCase) as
# pycocoevalcap applies it, in Python because Java is not available on TPU VMs / in CI.
# -------------------------------------------------------------------------------------------

def _pycocoevalcap():
    """The pycocoevalcap modules, imported on first use: the package (104 MB, mostly the Java
    METEOR / SPICE files) is an optional extra, ``pip install 'vlm_jax[caption]'``."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=import-outside-toplevel
        from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
        from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=import-outside-toplevel
        from pycocoevalcap.tokenizer.ptbtokenizer import (  # pylint: disable=import-outside-toplevel
            PUNCTUATIONS)
    except ImportError as e:
        raise ImportError("Captioning metrics need pycocoevalcap: pip install 'vlm_jax[caption]' "
                          "(or pip install pycocoevalcap).") from e
    return Bleu, Cider, Rouge, frozenset(PUNCTUATIONS)  # pycocoevalcap's own list, not copied.

# Abbreviations whose final period stays on the word (PTBLexer's ABBREV1 / ABBREV2: months,
# days, states, company words, titles, ...), lower-case.
_ABBREVIATIONS = frozenset("""
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn
    tenn va vt wis wisc wyo
    inc co cos corp pty ptys pte ppty ltd plc rt bancorp dept bhd assn univ intl sys
    tel est ext sq jr sr bros blvd rd esq etc al seq bldg ph.d ed.d
    mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs adm rev
    maj sgt cpl pvt mt ft capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det
    mme mlle msgr adj asst vs alex wm jos cie cf treas ph invt elec natl mfg mtg
""".split())
# States that are also common words: abbreviations only when capitalised ("Wash." vs "wash.").
_CAPITALISED_ABBREVIATIONS = frozenset("az ark del ill la mass miss ore pa tex wash".split())
# Abbreviations only before a number ("no. 5", "fig. 3"; "say no." ends a sentence).
_NUMBER_ABBREVIATIONS = frozenset("ca fig figs prop no nos art op pp".split())
_ACRONYM = re.compile(r"[^\W\d_](?:\.[^\W\d_])*")  # "a", "u.s", "e.g", "a.m"

_CHAR_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u00b4": "'",  # curly single quotes
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ",  # en / em dashes -> "--"
    "\u2026": " ... ",
    "\u00a3": "#", "\u20ac": "$",  # PTBLexer's currency normalisation
    "\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4",  # and fractions
})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-",
             "]": "-rsb-"}

_TOKEN = re.compile(r"""
    (?P<url>(?:https?|ftp)://[^\s"<>|(){}\[\]]*[^\s"'<>|.!?(){},;:&\[\]-])
  | (?P<handle>[@\#][^\W\d][\w]*)                               # @user, #tag
  | (?P<amp>[A-Z]+(?:&[A-Z]+)+)                                 # AT&T (upper case only)
  | (?P<bracket>-(?i:lrb|rrb|lcb|rcb|lsb|rsb)-)                 # already tokenised brackets
  | (?P<assim>(?i:can(?=not\b)|gon(?=na\b)|got(?=ta\b)|wan(?=na\b)|lem(?=me\b)|gim(?=me\b)
               |'t(?=(?:is|was)\b)))
  | (?P<apos>'[nN]'|'(?i:em|till?|cause|[2-9]0s)(?![^\W\d_]))   # 'n' 'em 'til 'cause '80s
  | (?P<yall>[yYjJ]'(?=[^\W\d_]))                              # y'all -> y' all
  | (?P<clitic>(?i:'(?:s|m|d|re|ve|ll)|n't)(?![^\W\d_]))        # 's 'm 'd 're 've 'll n't
  | (?P<word>(?:[dDoOlL]'(?=[^\W_]))?                            # o'clock, d'ye, l'amour
             (?:[-+](?=\d))?                                    # -5
             [^\W_]+(?:(?:[-./]|(?<=\d)[,:](?=\d))[^\W_]+)*)    # t-shirt 3.5 1,000 10:30 u.s
  | (?P<ellipsis>\.{3,})
  | (?P<dashes>-{2,})
  | (?P<bangs>[?!]+)
  | (?P<other>\S)
""", re.VERBOSE)


def _keeps_period(word: str, text: str, end: int) -> bool:
    """Whether the period at ``text[end]`` after ``word`` stays on it (an abbreviation)."""
    low = word.lower()
    if _ACRONYM.fullmatch(word) or low in _ABBREVIATIONS:
        return True
    if low in _CAPITALISED_ABBREVIATIONS:
        return word[0].isupper()
    if low in _NUMBER_ABBREVIATIONS:
        return re.match(r"\s+\d", text[end + 1:]) is not None
    return False


def ptb_tokens(text: str) -> list[str]:
    """Lower-cased PTB tokens of ``text``, punctuation tokens included (before removal).

    The token sequence Stanford's ``PTBTokenizer -preserveLines -lowerCase`` produces for
    caption text; see the module docstring for what is and is not reproduced.
    """
    text = text.translate(_CHAR_MAP)
    out = []
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        m = _TOKEN.match(text, pos)
        kind, tok, end = m.lastgroup, m.group(), m.end()
        if kind == "word":
            # "don't" -> "do" + "n't", "can't" -> "ca" + "n't".
            if (len(tok) > 1 and tok[-1] in "nN" and text[end:end + 2].lower() == "'t"
                    and not (end + 2 < n and text[end + 2].isalpha())):
                tok, end = tok[:-1], end - 1
            elif end < n and text[end] == "." and _keeps_period(tok, text, end):
                tok, end = tok + ".", end + 1
        elif kind == "ellipsis":
            tok = "..."
        elif kind == "dashes":
            tok = "--"
        elif tok == '"':  # Opening or closing quote; both are removed afterwards.
            tok = "``" if pos == 0 or text[pos - 1].isspace() or text[pos - 1] in "([{" else "''"
        elif tok == "'":
            tok = "`" if pos == 0 or text[pos - 1].isspace() or text[pos - 1] in "([{" else "'"
        elif tok in _BRACKETS:
            tok = _BRACKETS[tok]
        out.append(tok.lower())
        pos = end
    return out


def tokenize(text: str) -> str:
    """A caption as pycocoevalcap scores it: PTB-tokenised, lower-cased, punctuation removed.

    Equivalent to pycocoevalcap's ``PTBTokenizer().tokenize`` (Stanford CoreNLP 3.4.1 through
    Java, then removal of the tokens in its ``PUNCTUATIONS`` list) for caption text, without
    Java. Example: ``tokenize("A man's hat (red).") == "a man 's hat -lrb- red -rrb-"``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise TypeError(f"tokenize: expected a str caption, got {type(text).__name__}: "
                        f"{text!r}.")
    # pycocoevalcap: " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS).
    punctuation = _pycocoevalcap()[3]
    return " ".join(t for t in ptb_tokens(text) if t not in punctuation)


# -------------------------------------------------------------------------------------------
# Metrics.
# -------------------------------------------------------------------------------------------


def _as_str(x, what: str) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, str):  # Also numpy.str_.
        return str(x)
    raise TypeError(f"{what}: expected a caption string, got {type(x).__name__}: {x!r}.")


def _as_refs(refs, what: str) -> list[str]:
    if isinstance(refs, (str, bytes)):  # One reference given as a bare string.
        return [_as_str(refs, what)]
    refs = [_as_str(r, what) for r in refs]
    if not refs:
        raise ValueError(f"{what}: no reference caption; every image needs at least one.")
    return refs


def _pair(predictions, references) -> tuple[list[Hashable], list[str], list[list[str]]]:
    """Image ids, predictions and references from two dicts keyed by id or two lists."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise TypeError("caption_metrics: predictions and references must both be dicts keyed "
                        "by image id or both be lists in the same image order; got "
                        f"{type(predictions).__name__} and {type(references).__name__}.")
    if isinstance(predictions, Mapping):
        ids = list(predictions)
        missing = [i for i in ids if i not in references]
        extra = [i for i in references if i not in predictions]
        if missing or extra:
            raise ValueError(
                f"caption_metrics: predictions and references must have the same image ids; "
                f"{len(missing)} predicted ids have no references (e.g. {missing[:5]}), "
                f"{len(extra)} referenced ids have no prediction (e.g. {extra[:5]}).")
        preds = [predictions[i] for i in ids]
        refs = [references[i] for i in ids]
    else:
        preds, refs = list(predictions), list(references)
        if len(preds) != len(refs):
            raise ValueError(f"caption_metrics: {len(preds)} predictions but {len(refs)} "
                             "reference lists; give one prediction and one list of references "
                             "per image, in the same order.")
        ids = list(range(len(preds)))
    if not ids:
        raise ValueError("caption_metrics: no images to score.")
    preds = [_as_str(p, f"prediction for image {i!r}") for i, p in zip(ids, preds)]
    refs = [_as_refs(r, f"references of image {i!r}") for i, r in zip(ids, refs)]
    return ids, preds, refs


def caption_metrics(predictions: Mapping[Hashable, str] | Sequence[str],
                    references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
                    ) -> dict[str, float]:
    """CIDEr-D, BLEU-4, BLEU-1 and ROUGE-L of predicted captions, as pycocoevalcap reports them.

    Args:
      predictions: one caption per image, as ``{image_id: caption}`` or a list.
      references: the reference captions of each image, as ``{image_id: [captions]}`` or a list
        of lists in the order of ``predictions`` (a bare string counts as one reference).
        Captions are raw text: both sides go through :func:`tokenize` first, as in the COCO
        evaluation.

    Returns:
      ``{'cider', 'bleu4', 'bleu1', 'rouge_l'}``: pycocoevalcap's ``CIDEr`` (CIDEr-D, x10 scale:
      about 0-10, 1.0-1.4 for good COCO models), ``Bleu_4``, ``Bleu_1`` and ``ROUGE_L`` (both in
      [0, 1]). All are corpus scores of the whole set (see the module docstring).

    Raises:
      ValueError: ids or lengths differ, no images, an image without references, or every
        reference empty after tokenisation.
      TypeError: a caption is not a string.
    """
    ids, preds, refs = _pair(predictions, references)
    res = {i: [tokenize(p)] for i, p in zip(ids, preds)}
    gts = {i: [tokenize(r) for r in rs] for i, rs in zip(ids, refs)}
    if not any(r for rs in gts.values() for r in rs):
        raise ValueError("caption_metrics: every reference caption is empty after tokenisation "
                         "(punctuation only?); check the references.")
    Bleu, Cider, Rouge, _ = _pycocoevalcap()  # pylint: disable=invalid-name
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "bleu1": float(bleu[0]),
            "rouge_l": float(rouge)}


def _flatten(captions: Iterable) -> list[str]:
    out = []
    for c in captions:
        if isinstance(c, (str, bytes)):
            out.append(_as_str(c, "train_captions"))
        else:  # Several captions per image (COCO layout).
            out.extend(_as_str(x, "train_captions") for x in c)
    return out


def most_frequent_caption(train_captions: Iterable[str] | Iterable[Sequence[str]]) -> str:
    """The most frequent training caption (counted after :func:`tokenize`, so ``"A dog."`` and
    ``"a dog"`` are one caption); ties go to the caption seen first. Returns its first raw form.

    ``train_captions``: a list of captions, or a list of lists (several per image).
    """
    raw = [c for c in _flatten(train_captions) if tokenize(c)]
    if not raw:
        raise ValueError("most_frequent_caption: no non-empty training caption.")
    first = {}
    counts = collections.Counter()
    for c in raw:
        t = tokenize(c)
        first.setdefault(t, c)
        counts[t] += 1
    best = max(counts.values())
    return next(first[t] for t in counts if counts[t] == best)  # Counter keeps insertion order.


def most_frequent_caption_baseline(
        train_captions: Iterable[str] | Iterable[Sequence[str]],
        references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
) -> dict[str, float]:
    """Metrics of predicting the most frequent training caption for every image.

    The floor a captioning model has to clear (the CoCa acceptance requires the model's CIDEr to
    be at least 3x this baseline's). ``references`` as in :func:`caption_metrics`; the returned
    dict has the same keys.
    """
    caption = most_frequent_caption(train_captions)
    if isinstance(references, Mapping):
        predictions = {i: caption for i in references}
    else:
        predictions = [caption] * len(references)
    return caption_metrics(predictions, references)


# -------------------------------------------------------------------------------------------
# The evaluator.
# -------------------------------------------------------------------------------------------


def data_references(data: Mapping) -> list[list[str]]:
    """Reference captions per image from ``data['captions']`` or ``data['caption']``."""
    if "captions" in data:
        refs = []
        for i, caps in enumerate(data["captions"]):
            caps = [caps] if isinstance(caps, (str, bytes)) else list(np.asarray(caps).ravel())
            # Empty strings are padding of a dense [N, K] array of captions, not references.
            caps = [c for c in (_as_str(c, f"data['captions'][{i}]") for c in caps) if c.strip()]
            if not caps:
                raise ValueError(f"captioning evaluator: image {i} has no reference caption in "
                                 "data['captions'].")
            refs.append(caps)
        return refs
    if "caption" in data:
        return [[_as_str(c, f"data['caption'][{i}]")] for i, c in enumerate(data["caption"])]
    raise ValueError("captioning evaluator: the data has no reference captions; set "
                     "data['caption'] (one str per image) or data['captions'] (a list of strs "
                     f"per image, COCO layout). Keys present: {sorted(data)}.")


def evaluate(extractor, tokenizer, data: Mapping, **options) -> dict[str, float]:
    """Captioning metrics of the captions a model generates for ``data['image']``.

    ``data``: ``image`` [N, H, W, 3] and the references, either ``caption`` (N strings, one per
    image) or ``captions`` (N lists of strings, several per image as in COCO; empty strings are
    treated as padding). The captions come from ``extractor.captions(images) -> list[str]``
    (greedy or beam decoding plus detokenisation, provided by the feature extractor of
    captioning models such as CoCa). ``tokenizer`` is unused (the extractor detokenises); no
    options are accepted (the signature is the evaluators' common one).

    Returns:
      ``{'cider', 'bleu4', 'rouge_l', 'bleu1'}`` from :func:`caption_metrics`, on the whole set.

    Raises:
      ValueError: no ``image``, no references, an unknown option, an extractor without a
        ``captions`` method, or a number of captions / references different from the number
        of images.
    """
    del tokenizer
    if options:
        raise ValueError(f"captioning evaluator: unknown options {sorted(options)}; it takes "
                         "none.")
    if "image" not in data:
        raise ValueError("captioning evaluator: data['image'] ([N, H, W, 3] images) is missing.")
    refs = data_references(data)  # Checked before any generation.
    images = data["image"]
    if len(refs) != len(images):
        raise ValueError(f"captioning evaluator: {len(images)} images but {len(refs)} reference "
                         "entries in data['caption'/'captions']; give one per image.")
    captions_fn = getattr(extractor, "captions", None)
    if not callable(captions_fn):
        raise ValueError(
            "captioning evaluator: the feature extractor has no captions(images) -> list[str] "
            f"method ({type(extractor).__name__}); captioning needs a model with a text decoder "
            "(e.g. CoCa) whose extractor generates and detokenises captions.")
    predictions = list(captions_fn(images))
    if len(predictions) != len(refs):
        raise ValueError(f"captioning evaluator: extractor.captions returned {len(predictions)} "
                         f"captions for {len(refs)} images.")
    return caption_metrics(predictions, refs)
