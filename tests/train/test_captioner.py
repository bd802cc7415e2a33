"""The captioner recipe: the full captions, their token ids, a short training whose loss falls and that resumes,
and the exported file read back."""

import json

import pytest
import torch
from safetensors import safe_open

from plainsd.captioning import read_captioner
from plainsd.eval.captions import read_caption
from plainsd.eval.metrics import held_out_scenes
from plainsd.models.captioner import BOS, EOS, PAD, Captioner
from plainsd.train.captioner import (WORDS, CaptionerSettings, captioner_config, full_caption, join_words, render_pool,
                                     split_words, to_input, token_ids, train_captioner)
from plainsd.train.data import ShapesDataset
from plainsd.train.loop import TrainConfig
from plainsd.train.recipes import settings

TINY = {"channels": [8, 16, 16], "width": 32, "layers": 1, "heads": 2}


def test_full_captions_state_everything_in_reading_order():
    scenes = held_out_scenes(50, 1) + held_out_scenes(50, 2)
    for scene in scenes:
        text = full_caption(scene)
        objects, background = read_caption(text)
        assert background == scene.background
        order = {"left": 0, "top": 0, "centre": 0, "right": 1, "bottom": 1}
        assert objects == sorted(scene.objects, key=lambda o: order[o.position]), text
        assert all(w in WORDS for w in split_words(text)) and join_words(split_words(text)) == text
    two = next(s for s in scenes if len(s.objects) == 2 and s.objects[0].position in ("right", "bottom"))
    assert full_caption(two).startswith(f"a {two.objects[1].size} {two.objects[1].colour} {two.objects[1].shape}")


def test_token_ids_round_trip():
    net = Captioner(captioner_config(TrainConfig(network="captioner", model=TINY)))
    captions = ["a large red circle on the left, gray background",
                "a small blue heart at the top and a large white star at the bottom, black background"]
    ids = token_ids(net, captions)
    assert ids.shape == (2, net.config.max_length)
    assert ids[0, 0] == BOS and ids[0, 11] == EOS and (ids[0, 12:] == PAD).all()  # 10 words and the comma
    words = [[net.config.words[i - 3] for i in row.tolist() if i >= 3] for row in ids]
    assert [join_words(w) for w in words] == captions
    with pytest.raises(KeyError):
        token_ids(net, ["a mauve circle"])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="vae_share"):
        CaptionerSettings.from_extra({"vae_share": 1.5})
    with pytest.raises(ValueError, match="no setting 'scene'"):
        settings(TrainConfig(network="captioner", extra={"scene": 8}))
    with pytest.raises(ValueError, match="has no setting 'depth'"):
        captioner_config(TrainConfig(network="captioner", model={"depth": 3}))
    with pytest.raises(ValueError, match="shapes data"):
        train_captioner(TrainConfig(network="captioner", data={"kind": "folder", "path": "."}, out="/nonexistent"),
                        progress=False)


def test_the_pool_goes_through_the_vae_for_its_last_share():
    scenes = [ShapesDataset(seed=3).scene(i) for i in range(4)]
    plain = render_pool(scenes, 64)

    class Halve:  # a stand-in VAE whose "round trip" halves the picture: the rows it touched are known
        dtype = torch.float32

        def encode(self, x):
            class Posterior:
                mean, std = x, torch.zeros_like(x)
            return Posterior()

        def decode(self, z):
            return (z + 1) / 2 - 1

    mixed = render_pool(scenes, 64, Halve(), 0.5)
    assert torch.equal(mixed[:2], plain[:2]) and not torch.equal(mixed[2:], plain[2:])
    assert (to_input(mixed[2:]) - ((to_input(plain[2:]) + 1) / 2 - 1)).abs().max() < 0.01


def test_training_loss_falls_resumes_and_the_file_loads(tmp_path):
    cfg = dict(network="captioner", batch_size=16, lr=3e-3, checkpoint_every=10, out=str(tmp_path / "run"),
               model=TINY, data={"kind": "shapes", "seed": 0, "shapes": "all"}, sample_every=20,
               extra={"scenes": 16, "vae_share": 0.0, "validation": 4})
    first = train_captioner(TrainConfig(steps=20, **cfg), progress=False)
    resumed = train_captioner(TrainConfig(steps=40, **cfg), resume=True, progress=False)
    assert resumed["losses"][:20] == first["losses"] and len(resumed["losses"]) == 40
    losses = resumed["losses"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    path = tmp_path / "run" / "captioner.safetensors"
    f = safe_open(str(path), framework="pt")
    assert json.loads(f.metadata()["plainsd.captioner_config"])["width"] == 32 and f.metadata()["plainsd.steps"] == "40"
    assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    net = read_captioner(path)
    weights = resumed["weights"]
    assert all(torch.equal(v, weights[k].half().float()) for k, v in net.state_dict().items())
    assert (tmp_path / "run" / "samples" / "captioner-000040.txt").read_text().startswith("step 40: ")
