"""BLIP captioning (plainsd.blip, plainsd.weights.load_blip) against transformers' BlipProcessor and
BlipForConditionalGeneration.generate on identical random weights: pixels, token ids of greedy and beam search,
the decoded captions; and the folders it refuses."""

import json
import shutil

import pytest
import torch

from plainsd.blip import BlipCaptioner, preprocess
from plainsd.weights import CheckpointError, load_blip
from tests.blip_reference import TINY_VOCAB, build_tiny_folder, pictures

pytest.importorskip("transformers")
SEP = TINY_VOCAB.index("[SEP]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip")
    reference, processor = build_tiny_folder(folder)
    return folder, reference, processor, BlipCaptioner.from_folder(folder)


def _reference_ids(reference, processor, images, prompt, **kwargs) -> list[list[int]]:
    """transformers' output, cut after the first [SEP] past the prompt (the rest is its padding)."""
    inputs = processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    n = inputs["input_ids"].shape[1] - 1 if prompt else 1
    out = reference.generate(**inputs, do_sample=False, **kwargs).tolist()
    return [s[:s.index(SEP, n) + 1] if SEP in s[n:] else s for s in out]


def test_pixels_match_blip_image_processor(tiny):
    _, _, processor, captioner = tiny
    images = pictures(4)
    want = processor(images=images, return_tensors="pt").pixel_values
    got = preprocess(images, captioner.model.config.image_size)
    assert want.shape == got.shape == (4, 3, 32, 32) and (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("prompt", [None, "a picture of"])
@pytest.mark.parametrize("beams,repetition_penalty", [(1, 1.0), (1, 1.5), (3, 1.0), (4, 1.3)])
def test_token_ids_equal_transformers_generate(tiny, prompt, beams, repetition_penalty):
    _, reference, processor, captioner = tiny
    images = pictures(6)
    kwargs = dict(min_length=4, max_length=16)
    want = _reference_ids(reference, processor, images, prompt, num_beams=beams,
                          repetition_penalty=repetition_penalty, **kwargs)
    got = captioner.generate(images, prompt, beams=beams, repetition_penalty=repetition_penalty, **kwargs)
    assert got == want


def test_min_length_holds_off_the_end(tiny):
    _, reference, processor, captioner = tiny
    images = pictures(3)
    short = captioner.generate(images, beams=3, min_length=2, max_length=20)
    long = captioner.generate(images, beams=3, min_length=12, max_length=20)
    assert min(len(s) for s in short) < 12 <= min(len(s) for s in long)
    assert long == _reference_ids(reference, processor, images, None, num_beams=3, min_length=12, max_length=20)


@pytest.mark.parametrize("beams", [1, 3])
def test_captions_equal_blip_processor_decode(tiny, beams):
    _, reference, processor, captioner = tiny
    images = pictures(5)
    for prompt in (None, "A picture of"):
        inputs = processor(images=images, text=[prompt] * 5 if prompt else None, return_tensors="pt")
        out = reference.generate(**inputs, num_beams=beams, min_length=5, max_length=30, do_sample=False)
        want = processor.batch_decode(out, skip_special_tokens=True)
        got = captioner.caption(images, prompt=prompt, beams=beams)
        assert got == want
        assert all(c.startswith("a picture of") for c in got) if prompt else len(set(got)) > 1


def test_batches_give_the_captions_of_single_pictures(tiny):
    _, _, _, captioner = tiny
    images = pictures(5)
    one_by_one = [captioner.caption([im], beams=2)[0] for im in images]
    captioner.batch_size = 2
    try:
        assert captioner.caption(images, beams=2) == one_by_one
    finally:
        captioner.batch_size = BlipCaptioner.batch_size


def test_pytorch_bin_folder_loads_the_same(tmp_path, tiny):
    folder, *_ , captioner = tiny
    build_tiny_folder(tmp_path / "bin", safe=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    model, _ = load_blip(tmp_path / "bin")
    for (name, a), b in zip(model.state_dict().items(), captioner.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_logits_follow_float32(tiny):
    """dtype=torch.bfloat16 loads the weights in bf16 (half the memory); the logits stay close to float32's."""
    folder, _, _, captioner = tiny
    bf16 = BlipCaptioner.from_folder(folder, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16 and bf16.model.text_decoder.cls.predictions.bias.dtype == torch.bfloat16
    pixels = preprocess(pictures(3), 32)
    ids = torch.tensor([[len(TINY_VOCAB), 11, 17, 14, 19]] * 3)
    with torch.no_grad():
        want, got = captioner.model(pixels, ids), bf16.model(pixels, ids).float()
    assert torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1] > 0.99
    assert len(bf16.caption(pictures(2))) == 2


def test_runtime_attention_in_bfloat16_agrees_with_sdpa(tiny):
    """from_folder gives BLIP's layers runtime attention (bf16 on a CPU without AMX: oneDNN's products, not
    SDPA's kernel): the same logits as the plain layers' SDPA within bf16 rounding, and the same in float32."""
    from plainsd.runtime import use_plain_attention, use_runtime_attention
    from plainsd.runtime.attention import _amx
    folder, *_ = tiny
    pixels = preprocess(pictures(2), 32)
    ids = torch.tensor([[len(TINY_VOCAB), 11, 17, 14, 19]] * 2)
    for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 0.1)):
        model = BlipCaptioner.from_folder(folder, dtype=dtype).model
        with torch.no_grad():
            runtime = model(pixels, ids).float()
            assert use_plain_attention(model) == 2 + 2 * 2  # 2 ViT layers; self and cross in 2 decoder layers
            plain = model(pixels, ids).float()
            use_runtime_attention(model)
        assert (runtime - plain).abs().max() <= tolerance * plain.abs().max()
        if dtype == torch.bfloat16 and not _amx():
            assert not torch.equal(runtime, plain)  # the oneDNN path did run


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_folders_that_are_not_blip_captioners_are_refused(tiny, tmp_path):
    folder, *_ = tiny
    with pytest.raises(CheckpointError, match="no config.json"):
        load_blip(tmp_path)
    bad = _copy(folder, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["BlipForQuestionAnswering"]}))
    with pytest.raises(CheckpointError, match="not a BLIP captioning model"):
        load_blip(bad)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    with pytest.raises(CheckpointError, match="not a BLIP captioning model"):
        load_blip(bad)
    (bad / "config.json").write_text(json.dumps({**config, "text_config": {**config["text_config"], "hidden_size": 64}}))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_blip(bad)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="no vocab.txt"):
        load_blip(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_blip(bad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(beams=0), "beams"), (dict(beams=2.0), "beams"), (dict(max_length=1), "max_length"),
    (dict(max_length=65), "max_length"), (dict(min_length=40, max_length=30), "min_length"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(prompt="a picture of", max_length=4), "max_length"),
])
def test_bad_settings_get_one_sentence(tiny, kwargs, message):
    *_, captioner = tiny
    with pytest.raises(ValueError, match=message):
        captioner.caption(pictures(1), **kwargs)


def test_non_images_are_refused(tiny):
    *_, captioner = tiny
    with pytest.raises(ValueError, match="PIL images"):
        captioner.caption(["cat.png"])
