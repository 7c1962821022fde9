"""CLIP BPE tokenizer on a small merges file in the standard bpe_simple_vocab format."""
import gzip
import pickle

import numpy as np
import pytest

from input_pipeline import DataError
from input_pipeline.tokenizers import ClipBpeTokenizer, load_tokenizer

# Header line, then merges in rank order, as bpe_simple_vocab_16e6.txt.gz.
MERGES = ["#version: 0.2", "h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>"]


@pytest.fixture()
def bpe_file(tmp_path):
    path = tmp_path / "bpe_tiny.txt.gz"
    path.write_bytes(gzip.compress("\n".join(MERGES + [""]).encode()))
    return path


def _ids(tok, *symbols):
    return [tok.encoder[s] for s in symbols]


def test_vocabulary_layout(bpe_file):
    tok = ClipBpeTokenizer(bpe_file, context_length=12)
    # 256 bytes + 256 bytes with </w> + one per merge + sot + eot.
    assert tok.vocab_size == 512 + 6 + 2
    assert (tok.bos_id, tok.eos_id) == (518, 519)
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert tok.encoder["he"] == 512 and tok.encoder["cat</w>"] == 517


def test_merges_apply_in_rank_order(bpe_file):
    tok = ClipBpeTokenizer(bpe_file, context_length=12)
    # "hello": h e l l o</w> -> he l l o</w> -> he ll o</w> -> hell o</w> -> hello</w>.
    assert tok.tokens("hello") == _ids(tok, "hello</w>")
    # "cat": c a t</w> -> ca t</w> -> cat</w>.
    assert tok.tokens("cat") == _ids(tok, "cat</w>")
    # Unmerged letters fall back to byte symbols; the last carries </w>.
    assert tok.tokens("dog") == _ids(tok, "d", "o", "g</w>")
    # Lower-casing, html unescaping, whitespace cleaning and punctuation split like CLIP.
    assert tok.tokens("  HELLO &amp;\n cat!") == _ids(tok, "hello</w>", "&</w>", "cat</w>",
                                                    "!</w>")
    # Non-ASCII goes through the byte map: 'é' is two UTF-8 bytes.
    assert len(tok.tokens("é")) == 2


def test_encode_frames_pads_and_truncates(bpe_file):
    tok = ClipBpeTokenizer(bpe_file, context_length=6)
    rows = tok.encode(["hello cat", "dog dog dog dog", ""])
    assert rows.dtype == np.int32 and rows.shape == (3, 6)
    assert rows[0].tolist() == [tok.bos_id, *_ids(tok, "hello</w>", "cat</w>"), tok.eos_id, 0, 0]
    assert rows[1][0] == tok.bos_id and rows[1][-1] == tok.eos_id  # cut, eot kept last
    assert rows[2].tolist()[:2] == [tok.bos_id, tok.eos_id]
    assert tok.decode(rows[0]) == "hello cat"
    assert tok.decode(rows)[0] == "hello cat"
    clone = pickle.loads(pickle.dumps(tok))  # grain workers receive a pickled copy
    np.testing.assert_array_equal(clone.encode(["hello cat"]), rows[:1])


def test_factory_and_errors(bpe_file, tmp_path):
    assert isinstance(load_tokenizer(bpe_file, 8), ClipBpeTokenizer)
    with pytest.raises(DataError, match="does not exist"):
        ClipBpeTokenizer(tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\na b c\n")
    with pytest.raises(DataError, match="one merge"):
        ClipBpeTokenizer(bad)
