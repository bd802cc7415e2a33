"""Inpainting's A1111 options on tiny random models: masked content, "only masked", mask rounding, the noise
multiplier, latent_mask, their infotext, and outpainting."""

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import images as imgs
from plainsd import pipeline
from plainsd.pipeline import GenerationRequest
from plainsd.pnginfo import parse_infotext


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


def _arr(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _picture(size=(64, 64), seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def _start_latents(monkeypatch, sd, **fields):
    """The latents a run starts from (the sampler's x0, handed straight to the decoder instead of sampled), and
    what the VAE encoder was given."""
    started, encoded = [], []
    encode = sd.vae.encode

    def no_sampling(model, p, x, start, *args):
        started.append(start)
        return start, True

    def seen_encode(images):
        encoded.append(images.clone())
        return encode(images)

    monkeypatch.setattr(pipeline, "_sample", no_sampling)
    monkeypatch.setattr(sd.vae, "encode", seen_encode)
    result = pipeline.inpaint(sd, _picture(), _mask((64, 64), (16, 16, 48, 48)), "x", steps=4, seed=5,
                              strength=0.0, mask_blur=0, **fields)
    monkeypatch.undo()
    return started[0], encoded[0], result


def test_masked_content_modes(monkeypatch, sd):
    inside = (slice(None), slice(None), slice(2, 6), slice(2, 6))    # latents 16..48 px of a 64 px picture
    outside = (slice(None), slice(None), slice(0, 1), slice(None))
    original, seen_original, r = _start_latents(monkeypatch, sd, inpainting_fill="original")
    assert "Masked content" not in parse_infotext(r.infotexts[0])
    filled, seen_filled, r = _start_latents(monkeypatch, sd, inpainting_fill="fill")
    expected = imgs.to_tensor(imgs.fill(_picture(), _mask((64, 64), (16, 16, 48, 48))))
    assert torch.equal(seen_filled, expected) and not torch.equal(seen_original, expected)
    assert torch.equal(seen_filled[..., :16, :], seen_original[..., :16, :])  # filled only in the mask
    assert parse_infotext(r.infotexts[0])["Masked content"] == "fill"
    assert not torch.equal(filled[inside], original[inside])
    # the latent modes start from the filled image too (A1111 fills for every mode but "original")
    nothing, _, r = _start_latents(monkeypatch, sd, inpainting_fill="latent nothing")
    assert (nothing[inside] == 0).all() and torch.equal(nothing[outside], filled[outside])
    assert parse_infotext(r.infotexts[0])["Masked content"] == "latent nothing"
    noise, _, r = _start_latents(monkeypatch, sd, inpainting_fill=2)  # A1111's number
    seed_noise = torch.randn(original.shape[1:], generator=torch.Generator().manual_seed(5))[None]
    assert torch.equal(noise[inside], seed_noise[inside]) and torch.equal(noise[outside], filled[outside])
    assert parse_infotext(r.infotexts[0])["Masked content"] == "latent noise"


def test_only_masked_keeps_everything_outside_the_padded_box(sd):
    init, mask = _picture((96, 80), seed=2), _mask((96, 80), (60, 20, 70, 30))
    r = pipeline.inpaint(sd, init, mask, "x", steps=3, seed=1, width=32, height=32, strength=1.0, mask_blur=2,
                         inpaint_full_res=True, inpaint_full_res_padding=6)
    out, src = _arr(r.images[0]), _arr(init)
    assert out.shape == src.shape  # the original's size, not the drawing's
    box = imgs.expand_crop_region(imgs.crop_region(imgs.blur_mask(mask, 2), 6), 32, 32, 96, 80)
    x1, y1, x2, y2 = box
    assert (x2 - x1) * (y2 - y1) < 96 * 80 / 4  # a small part of the picture
    outside = np.ones(src.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], src[outside])
    assert not np.array_equal(out[22:28, 62:68], src[22:28, 62:68])  # the masked area is drawn again
    fields = parse_infotext(r.infotexts[0])
    assert (fields["Inpaint area"], fields["Masked area padding"], fields["Mask blur"]) == ("Only masked", "6", "2")
    assert fields["Size"] == "32x32"
    blank = pipeline.inpaint(sd, init, Image.new("L", (96, 80), 0), "x", steps=2, seed=1, width=32, height=32,
                             inpaint_full_res=True)  # nothing masked: A1111 draws plain img2img
    assert blank.images[0].size == (32, 32) and "Inpaint area" not in blank.infotexts[0]


def test_mask_round_noise_multiplier_and_latent_mask(monkeypatch, sd):
    request = GenerationRequest(prompt="x", steps=4, init_image=_picture(), mask=_mask((64, 64), (16, 16, 48, 48)),
                                mask_blur=6, width=64, height=64)
    request, _, run = pipeline._settings(pipeline.as_engine(sd), request)
    rounded = pipeline._start(sd, request, run).keep
    soft = pipeline._start(sd, request.replace(mask_round=False), run).keep
    assert set(rounded.unique().tolist()) == {0.0, 1.0} and ((soft > 0.05) & (soft < 0.95)).any()
    other = request.replace(latent_mask=_mask((64, 64), (0, 0, 16, 64)))
    keep = pipeline._start(sd, other, run).keep
    assert (keep[..., :, :2] == 0).all() and (keep[..., :, 2:] == 1).all()  # the latent mask, not the mask
    starts = []
    sample = pipeline._sample

    def seen_sample(sd_, p, x, start, *args):
        starts.append((x, start, p.sigmas[0]))
        return sample(sd_, p, x, start, *args)

    monkeypatch.setattr(pipeline, "_sample", seen_sample)
    r = pipeline.img2img(sd, _picture(), "x", steps=4, seed=3, initial_noise_multiplier=0.5)
    x, x0, sigma = starts[0]
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(3))[None]
    assert torch.allclose(x, x0 + noise * 0.5 * sigma)
    assert parse_infotext(r.infotexts[0])["Noise multiplier"] == "0.5"


@pytest.mark.parametrize("fields, words", [
    ({"inpainting_fill": "blur"}, "unknown masked content"),
    ({"inpainting_fill": 4}, "unknown masked content"),
    ({"inpaint_full_res_padding": -1}, "from 0 to 256"),
    ({"initial_noise_multiplier": 2.0}, "between 0 and 1.5"),
    ({"mask": None, "inpaint_full_res": True}, "inpaint_full_res need a mask"),
    ({"mask": None, "inpainting_fill": "fill"}, "inpainting_fill need a mask"),
    ({"init_image": None, "mask": None, "initial_noise_multiplier": 0.9}, "needs an init image"),
    ({"latent_mask": Image.new("L", (8, 8)), "inpaint_full_res": True}, "latent_mask cannot be used"),
])
def test_bad_inpainting_options_are_refused(fields, words):
    request = GenerationRequest(prompt="x", init_image=_picture(), mask=_mask((64, 64), (0, 0, 8, 8)))
    with pytest.raises(ValueError, match=words):
        request.replace(**fields).check()


def test_outpaint_keeps_the_picture_and_draws_the_new_area(sd):
    init = _picture((64, 48), seed=4)
    r = pipeline.outpaint(sd, init, "x", left=16, right=16, top=8, steps=4, seed=2, mask_blur=2)
    out = _arr(r.images[0])
    assert out.shape == (64, 128, 3)  # 96 wide -> 128 (16 + 48 extra on the left in proportion: 32), 56 -> 64
    canvas, mask, latent_mask = imgs.outpaint_canvas(init, 16, 16, 8, 0, 2)
    assert (canvas.size, canvas.crop((32, 16, 96, 64)).tobytes()) == ((128, 64), init.tobytes())
    kept = np.asarray(imgs.blur_mask(mask, 4)) == 0  # A1111 blurs outpainting's mask twice as much
    assert kept.sum() > 1000 and np.array_equal(out[kept], _arr(canvas)[kept])
    filled = _arr(imgs.fill(canvas, latent_mask))
    assert np.abs(out[:, :24] - filled[:, :24]).mean() > 5  # the new area is drawn, not left as the fill
    fields = parse_infotext(r.infotexts[0])
    assert (fields["Size"], fields["Mask blur"], fields["Masked content"]) == ("128x64", "4", "fill")
    with pytest.raises(ValueError, match="at least one side"):
        pipeline.outpaint(sd, init, "x")
    with pytest.raises(TypeError, match="no width"):
        pipeline.outpaint(sd, init, "x", left=8, width=64)
