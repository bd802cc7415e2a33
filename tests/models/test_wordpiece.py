"""The WordPiece tokenizer against transformers' BertTokenizer and BertTokenizerFast (the tokenizers library, what
BlipProcessor loads by default) on the same vocab.txt."""

import pytest

from plainsd.models.wordpiece import WordPieceTokenizer
from tests.blip_reference import TINY_VOCAB

transformers = pytest.importorskip("transformers")

TEXTS = [
    "a picture of two cats sitting",
    "A Picture  OF\tthe RED circle!",            # case, runs of whitespace, punctuation
    "the café's dog, on the left.",             # accents, apostrophes, commas
    "we don't sit; it's a cat-dog?",            # contractions, hyphens, unknown punctuation
    "sitted catsly zzz 北京 circle",             # continuations, an unknown word, CJK characters
    "x" * 120 + " cat",                         # a word too long for WordPiece
    "\u0000a\u200bcat\u00a0dog\ufffd",          # control, zero-width, no-break space, replacement characters
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n")
    return WordPieceTokenizer.from_file(path), [transformers.BertTokenizer(str(path), do_lower_case=True),
                                                transformers.BertTokenizerFast(str(path), do_lower_case=True)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_bert_tokenizer(tokenizers, text):
    ours, references = tokenizers
    for reference in references:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_decode_matches_bert_tokenizer(tokenizers):
    ours, references = tokenizers
    sequences = [references[0].encode(t) for t in TEXTS + ["we do not sit"]] + [[2, 19, 26, 15, 13, 47, 51, 5, 3, 0, 0],
                                                       [11, 7, 26, 6, 29, 8, 13, 9, 38, 7, 37, 1, 19]]
    for ids in sequences:
        for reference in references:
            assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), ids


def test_ids_past_the_vocabulary_are_left_out():
    """BLIP's [DEC] and [ENC] sit after vocab.txt's pieces: special tokens, never words of a caption."""
    tok = WordPieceTokenizer(TINY_VOCAB)
    cat = TINY_VOCAB.index("cat")
    assert tok.decode([len(TINY_VOCAB), cat, len(TINY_VOCAB) + 1, TINY_VOCAB.index("[SEP]")]) == "cat"


def test_a_vocabulary_without_unk_is_refused():
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        WordPieceTokenizer(["a", "b"])
