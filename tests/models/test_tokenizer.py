"""The tokenizer gives the same ids as transformers' CLIPTokenizer (SD1) and open_clip's (SD2)."""

import json

import pytest
import torch

from plainsd.models.tokenizer import EOT, SOT, Tokenizer, split_words
from tests.prompts import corpus

PROMPTS = corpus()


def test_corpus_is_large_and_varied():
    assert len(PROMPTS) >= 200
    joined = "".join(PROMPTS)
    assert any(ord(c) > 0x1F000 for c in joined), "emoji"
    assert "\t" in joined and "\u3000" in joined, "odd whitespace"
    tok = Tokenizer("sd1")
    assert sum(len(tok.encode(p)) > 75 for p in PROMPTS) >= 3, "prompts longer than the context"


def test_special_ids_and_shape():
    tok = Tokenizer("sd1")
    assert tok.vocab_size == 49408
    assert (tok.sot_id, tok.eot_id) == (49406, 49407)
    ids = tok(["a red circle", "x"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, 4] == 49407 and (ids[0, 5:] == 49407).all()
    assert (Tokenizer("sd2")(["a red circle"])[0, 5:] == 0).all()


def test_truncation_keeps_end_token():
    tok = Tokenizer("sd1")
    ids = tok(["word " * 200])[0]
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id and len(ids) == 77


def test_decode_round_trip():
    tok = Tokenizer("sd1")
    assert tok.decode(tok.encode("a red circle, on the left!")) == "a red circle , on the left !"


def test_split_words_pattern():
    assert split_words("it's a cat's 123 hello!!") == ["it", "'s", "a", "cat", "'s", "1", "2", "3", "hello", "!!"]
    assert split_words(f"{SOT}hi{EOT}") == [SOT, "hi", EOT]


def test_bad_input():
    with pytest.raises(ValueError, match="allowed: sd1, sd2"):
        Tokenizer("sd3")
    with pytest.raises(TypeError):
        Tokenizer("sd1")([1, 2])


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' slow CLIPTokenizer built from the same merges file (no download)."""
    transformers = pytest.importorskip("transformers")
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    vocab = {k.replace("<start_of_text>", SOT).replace("<end_of_text>", EOT): v for k, v in ref.encoder.items()}
    merges = ["#version: 0.2"] + [" ".join(m) for m in sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)]
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    assert tok.fix_text is not None, "ftfy must be installed so that CLIPTokenizer cleans text as SD1 tools did"
    return tok


def test_same_ids_as_transformers(hf_tokenizer):
    ours = Tokenizer("sd1")(PROMPTS)
    ref = hf_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    bad = [(p, ours[i].tolist(), ref[i].tolist()) for i, p in enumerate(PROMPTS) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]}"


def test_same_ids_as_open_clip():
    open_clip = pytest.importorskip("open_clip")
    ours = Tokenizer("sd2")(PROMPTS)
    ref = open_clip.tokenize(PROMPTS)
    bad = [(p, ours[i].tolist(), ref[i].tolist()) for i, p in enumerate(PROMPTS) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} prompts differ, first: {bad[0]}"
