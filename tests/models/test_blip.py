"""BLIP's captioning network against transformers' BlipForConditionalGeneration on identical random weights."""

import gc

import pytest
import torch

from plainsd.weights import load_blip
from tests.blip_reference import base_blip_config, build_tiny_folder, pictures, randomise

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip")
    reference, processor = build_tiny_folder(folder)
    model, _ = load_blip(folder)
    pixels = processor(images=pictures(3), return_tensors="pt").pixel_values
    return reference, model, pixels


def test_image_tokens_match_transformers(tiny_pair, record_parity):
    reference, model, pixels = tiny_pair
    with torch.no_grad():
        want = reference.vision_model(pixel_values=pixels).last_hidden_state
        got = model.vision_model(pixels)
    diff = (got - want).abs().max().item()
    record_parity("blip tiny: image tokens", diff)
    assert want.abs().max() > 1 and diff < 1e-4


def test_decoder_logits_match_transformers(tiny_pair, record_parity):
    reference, model, pixels = tiny_pair
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = model.config.bos_token_id
    with torch.no_grad():
        want = reference(pixel_values=pixels, input_ids=ids).logits
        got = model(pixels, ids)
    diff = (got - want).abs().max().item()
    record_parity("blip tiny: decoder logits", diff)
    assert want.std() > 0.5 and diff < 1e-4


def test_cached_steps_equal_the_whole_caption(tiny_pair):
    """The KV cache: feeding the caption a token at a time gives the logits of one pass over all of it."""
    _, model, pixels = tiny_pair
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    decoder = model.text_decoder
    with torch.no_grad():
        image_kv = decoder.image_keys_values(model.vision_model(pixels))
        whole = decoder(ids, image_kv)
        cache = decoder.new_cache()
        steps = [decoder(ids[:, :2], image_kv, cache)] + [decoder(ids[:, i:i + 1], image_kv, cache) for i in range(2, 6)]
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5)


def test_tied_output_layer_follows_the_word_embeddings(tiny_pair):
    """transformers ties the LM head to the word embeddings: changing them must change the logits the same way."""
    _, model, pixels = tiny_pair
    ids = torch.tensor([[model.config.bos_token_id, 11, 17]] * 3)
    with torch.no_grad():
        image_kv = model.text_decoder.image_keys_values(model.vision_model(pixels))
        before = model.text_decoder(ids, image_kv)
        model.text_decoder.bert.embeddings.word_embeddings.weight[5] += 1.0
        after = model.text_decoder(ids, image_kv)
        model.text_decoder.bert.embeddings.word_embeddings.weight[5] -= 1.0
    assert not torch.allclose(before[:, -1, 5], after[:, -1, 5])
    assert torch.equal(before[:, -1, 6:], after[:, -1, 6:])


@pytest.mark.slow
def test_base_size_logits_match_transformers(tmp_path, record_parity):
    """blip-image-captioning-base's sizes (ViT-B/16 at 384, 12-layer decoder), random weights, through a folder."""
    from transformers import BlipForConditionalGeneration
    torch.manual_seed(0)
    reference = randomise(BlipForConditionalGeneration(base_blip_config()), seed=0, std=0.02)
    reference.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[30522, 1037, 3861, 1997, 1037, 4937]])
    with torch.no_grad():
        want = reference(pixel_values=pixels, input_ids=ids)
        want_image, want_logits = want.last_hidden_state, want.logits
    del reference, want
    gc.collect()
    model, _ = load_blip(tmp_path)
    with torch.no_grad():
        image = model.vision_model(pixels)
        logits = model.text_decoder(ids, model.text_decoder.image_keys_values(image))
    record_parity("blip base: image tokens", (image - want_image).abs().max().item())
    record_parity("blip base: decoder logits", (logits - want_logits).abs().max().item())
    assert torch.allclose(image, want_image, atol=1e-3)
    assert want_logits.std() > 0.1 and torch.allclose(logits, want_logits, atol=1e-3)
