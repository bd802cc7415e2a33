"""Textual-inversion embeddings: A1111's file formats, and their vectors standing in for words in prompts."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from plainsd.embeddings import Embedding, EmbeddingSet, load_embeddings, read_embedding, save_embedding
from plainsd.pipeline import txt2img
from plainsd.prompts import encode_prompt, tokenize_chunks
from plainsd.weights import CheckpointError


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=2)


def word_vectors(sd, text: str) -> torch.Tensor:
    """The token embeddings of a text's tokens: an embedding made of them must act exactly like the text."""
    ids = torch.tensor(sd.tokenizer.encode(text))
    return sd.text_encoder.text_model.embeddings.token_embedding.weight[ids].detach().clone()


def test_file_formats_round_trip(tmp_path, sd):
    v = torch.randn(3, sd.config.text.width)
    save_embedding(Embedding("thing", v, step=500), tmp_path / "thing.safetensors")
    e = read_embedding(tmp_path / "thing.safetensors")
    assert e.name == "thing" and e.step == 500 and torch.equal(e.vectors, v)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "old", "step": 7,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "m"}, tmp_path / "old.pt")
    e = read_embedding(tmp_path / "old.pt")
    assert e.name == "old" and e.step == 7 and torch.equal(e.vectors, v)
    torch.save({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.bin")  # diffusers' textual_inversion output
    assert read_embedding(tmp_path / "learned_embeds.bin").vectors.shape == (1, sd.config.text.width)


def test_bad_embedding_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    with pytest.raises(CheckpointError):
        read_embedding(tmp_path / "evil.pt")
    save_file({"clip_l": torch.zeros(1, 768)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="has clip_l but not clip_g; an SDXL embedding needs both"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="clip_l has 1 vectors and clip_g 2"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no emb_params"):
        read_embedding(tmp_path / "other.safetensors")


def test_an_embedding_of_word_vectors_acts_as_those_words(tmp_path, sd):
    save_embedding(Embedding("mystar", word_vectors(sd, "red star")), tmp_path / "mystar.safetensors")
    save_embedding(Embedding("wide", torch.zeros(2, 16)), tmp_path / "wide.safetensors")  # another model's: skipped
    found = load_embeddings(tmp_path, sd)
    assert found.names == ["mystar"] and "wide" in found.skipped
    a = encode_prompt(sd.tokenizer, sd.text_encoder, "a big mystar on the left", embeddings=found)
    b = encode_prompt(sd.tokenizer, sd.text_encoder, "a big red star on the left")
    assert torch.equal(a, b)
    kw = dict(steps=3, seed=4, width=32, height=32)
    with_emb = txt2img(sd, "a (mystar:1.2)", embeddings_dir=tmp_path, **kw).images[0]
    assert with_emb.tobytes() == txt2img(sd, "a (red star:1.2)", **kw).images[0].tobytes()
    assert with_emb.tobytes() != txt2img(sd, "a mystar", **kw).images[0].tobytes()  # without the folder: just a word


def test_embeddings_are_not_split_across_chunks(sd):
    vectors = torch.randn(5, sd.config.text.width)
    found = EmbeddingSet([Embedding("fiver", vectors)], sd.tokenizer, sd.config.text.width, sd.config.text.vocab_size)
    chunks = tokenize_chunks(sd.tokenizer, "dog " * 73 + "fiver", embeddings=found)
    assert len(chunks) == 2
    placeholder = list(range(sd.config.text.vocab_size, sd.config.text.vocab_size + 5))
    assert chunks[1][0][1:6] == placeholder and not set(placeholder) & set(chunks[0][0])


def test_pooled_embedding_finds_the_end_token_past_placeholder_ids(sd):
    vectors = word_vectors(sd, "red star")
    found = EmbeddingSet([Embedding("mystar", vectors)], sd.tokenizer, sd.config.text.width,
                         sd.config.text.vocab_size)
    a = torch.tensor([tokenize_chunks(sd.tokenizer, "a mystar", found)[0][0]])
    b = torch.tensor([tokenize_chunks(sd.tokenizer, "a red star")[0][0]])
    with torch.no_grad():
        assert torch.equal(sd.text_encoder.pooled(a, extra=found.vectors), sd.text_encoder.pooled(b))


# --- SDXL: clip_l and clip_g ---------------------------------------------------------------------------------

def _by_hand(model, ids: torch.Tensor, at: list[int], vectors: torch.Tensor, **kw):
    """A transformers tower run on ids whose token embeddings at positions `at` are replaced by `vectors`."""
    def replace(module, args, out):
        out = out.clone()
        out[0, at] = vectors.to(out.dtype)
        return out

    hook = model.text_model.embeddings.token_embedding.register_forward_hook(replace)
    try:
        return model(ids, output_hidden_states=True, **kw)
    finally:
        hook.remove()


def test_sdxl_embedding_gives_each_tower_its_vectors(sdxl_reference, tmp_path):
    """A1111's SDXL embedding: the prompt with its name equals, for both towers, transformers' CLIP-L with the
    clip_l vectors put in place of the name's tokens and bigG with the clip_g ones (states and pooled text)."""
    config, _, _, text, text2, sd = sdxl_reference("tiny-sdxl")
    g = torch.Generator().manual_seed(3)
    clip_l, clip_g = torch.randn(2, config.text.width, generator=g), torch.randn(2, config.text2.width, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "mystar.safetensors"))
    save_file({"emb_params": torch.randn(1, config.text.width)}, str(tmp_path / "sd1.safetensors"))
    found = load_embeddings(tmp_path, sd)
    assert found.names == ["mystar"] and "takes clip_l and clip_g" in found.skipped["sd1"]
    states, pooled = encode_prompt(sd.tokenizer, sd.text_encoder, "a mystar on the left", embeddings=found, pooled=True)

    words = [49406, *sd.tokenizer.encode("a"), 0, 0, *sd.tokenizer.encode("on the left"), 49407]
    ids_l = torch.tensor([words + [49407] * (77 - len(words))])
    ids_g = torch.tensor([words + [0] * (77 - len(words))])
    with torch.no_grad():
        want_l = _by_hand(text, ids_l, [2, 3], clip_l).hidden_states[-2]
        out_g = _by_hand(text2, ids_g, [2, 3], clip_g)
    assert (states - torch.cat([want_l, out_g.hidden_states[-2]], dim=-1)).abs().max() <= 1e-5
    assert (pooled - out_g.text_embeds).abs().max() <= 1e-5
    plain, _ = encode_prompt(sd.tokenizer, sd.text_encoder, "a mystar on the left", pooled=True)
    assert (plain - states).abs().max() > 0.1  # without the embedding: the name's own tokens


def test_sdxl_embeddings_fit_sdxl_base_only(tmp_path):
    """The base model takes them; the refiner (bigG alone, 1280 wide) and SD 1 models skip them, as A1111's shape
    check does; they save back as clip_l / clip_g."""
    base, refiner, sd1 = (plainsd.build(name, seed=0) for name in ("tiny-sdxl", "tiny-sdxl-refiner", "tiny"))
    v = torch.randn(3, base.config.text.width + base.config.text2.width)
    save_embedding(Embedding("xl", v, step=9, clip_l=base.config.text.width), tmp_path / "xl.safetensors")
    e = read_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(e.vectors, v) and (e.clip_l, e.step) == (base.config.text.width, 9)
    assert load_embeddings(tmp_path, base).names == ["xl"]
    assert "an SDXL embedding" in load_embeddings(tmp_path, refiner).skipped["xl"]
    assert "an SDXL embedding" in load_embeddings(tmp_path, sd1).skipped["xl"]
