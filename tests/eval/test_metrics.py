"""Evaluation numbers: held-out prompts, adherence through the judge, PSNR, retrieval, the eval command."""

import json

import pytest
import torch

import plainsd
from plainsd.cli import main
from plainsd.eval import metrics
from plainsd.train.data import ShapesDataset


def test_held_out_prompts_state_everything_and_differ_from_training():
    scenes = metrics.held_out_scenes(50)
    assert all(len(s.objects) == 1 and s.stated[0] == {"shape", "colour", "size", "position"} for s in scenes)
    train = {ShapesDataset(seed=s).scene(i).caption for s in (0, 1, 2) for i in range(200)}
    assert len({s.caption for s in scenes} & train) < 5
    assert all(len(s.objects) == 2 for s in metrics.held_out_scenes(10, objects=2))


class _Perfect:
    """A stand-in 'model' whose txt2img draws exactly the scene of the prompt."""


def test_adherence_of_a_perfect_painter(monkeypatch):
    from plainsd import pipeline
    from plainsd.train.data import render

    scenes = {s.caption: s for s in metrics.held_out_scenes(20) + metrics.held_out_scenes(10, 2)}

    class R:
        def __init__(self, image):
            self.images = [image]

    monkeypatch.setattr(pipeline, "txt2img", lambda sd, prompt, *a, **k: R(render(scenes[prompt])))
    assert metrics.adherence(None, 20) == {"colour_and_shape": 1.0, "position": 1.0, "size": 1.0, "all": 1.0}
    assert metrics.adherence(None, 10, objects=2)["all"] == 1.0


class _Codec:
    """A stand-in VAE: encode keeps the picture, decode applies `damage` to it."""

    dtype = torch.float32

    def __init__(self, damage):
        self.damage = damage

    def encode(self, x):
        class Posterior:
            def mode(_):
                return x
        return Posterior()

    def decode(self, z):
        return self.damage(z)


def test_vae_roundtrip_adherence_is_the_judge_on_round_trips():
    perfect = metrics.vae_roundtrip_adherence(_Codec(lambda z: z), n=40)
    assert perfect == {"colour_and_shape": 1.0, "position": 1.0, "size": 1.0, "all": 1.0}
    flat = metrics.vae_roundtrip_adherence(_Codec(torch.zeros_like), n=40)  # a grey picture: nothing to find
    assert flat == {"colour_and_shape": 0.0, "position": 0.0, "size": 0.0, "all": 0.0}
    def blurred(k):  # k x k averages: the coarser, the fewer shapes survive
        return metrics.vae_roundtrip_adherence(_Codec(lambda z: torch.nn.functional.interpolate(
            torch.nn.functional.avg_pool2d(z, k), scale_factor=k, mode="bilinear")), n=40)["colour_and_shape"]
    assert 1.0 > blurred(2) > blurred(4) > blurred(8)


def test_tiny_decoder_round_trip_decodes_the_scaled_latents():
    class Tiny:  # fast mode's decoder reads latents times the scale factor and returns [-1, 1] images
        def __init__(self, scale):
            self.scale = scale

        def decode(self, z):
            return z / self.scale

    right = metrics.vae_roundtrip_adherence(_Codec(torch.zeros_like), n=40, tiny_decoder=Tiny(0.2), scale_factor=0.2)
    assert right == {"colour_and_shape": 1.0, "position": 1.0, "size": 1.0, "all": 1.0}
    wrong = metrics.vae_roundtrip_adherence(_Codec(torch.zeros_like), n=40, tiny_decoder=Tiny(0.2), scale_factor=0.02)
    assert wrong["colour_and_shape"] < 0.5  # a washed-out picture: the colours are lost


def test_random_model_scores_low_and_metrics_are_numbers():
    sd = plainsd.build("tiny")
    score = metrics.adherence(sd, 5, steps=2)
    assert score["colour_and_shape"] <= 0.4
    psnr = metrics.vae_psnr(sd.vae, n=8)
    assert 0 < psnr < 20
    from plainsd.config import VisionConfig
    from plainsd.models.clip import CLIPVisionModel

    vision = CLIPVisionModel(VisionConfig(width=32, layers=1, heads=1, projection_dim=128))
    tiny_text = plainsd.build("tiny-sd2").text_encoder  # has a projection to 128
    r = metrics.clip_retrieval(tiny_text, vision, plainsd.build("tiny-sd2").tokenizer, n=20)
    assert 0 <= r <= 0.3


def test_eval_command_writes_json(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    plainsd.save(plainsd.build("tiny"), model)
    assert main(["eval", "--model", str(model), "--prompts", "2", "--two-object-prompts", "1", "--steps", "2",
                 "-o", str(tmp_path / "e.json")]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["single_object"]) == {"colour_and_shape", "position", "size", "all"} and "two_objects" in data


def test_eval_taesd_without_vae_is_refused(capsys):
    assert main(["eval", "--taesd", "t.safetensors", "--prompts", "0", "--two-object-prompts", "0"]) != 0
    assert "--taesd needs --vae" in capsys.readouterr().err


def test_eval_with_clip_reports_distribution_metrics(tmp_path, capsys):
    from plainsd.train.loop import TrainConfig
    from plainsd.train.recipes import train_clip

    cfg = TrainConfig(network="clip", steps=2, batch_size=4, out=str(tmp_path / "clip"), data={"kind": "shapes", "length": 8},
                      model={"text": {"width": 64, "layers": 1, "heads": 1, "projection_dim": 16},
                             "vision": {"width": 32, "layers": 1, "heads": 1, "projection_dim": 16}})
    train_clip(cfg, progress=False)
    model = tmp_path / "m.safetensors"
    plainsd.save(plainsd.build("tiny"), model)
    assert main(["eval", "--model", str(model), "--prompts", "3", "--two-object-prompts", "0", "--steps", "1",
                 "--clip", str(tmp_path / "clip" / "clip.safetensors"), "-o", str(tmp_path / "e.json")]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert {"fid_clip", "clip_score", "inception_score_judge"} <= set(data["single_object"])
    assert 0 <= data["clip_top1_retrieval"] <= 1


def test_checks_with_stand_in_painters(monkeypatch):
    from plainsd import pipeline
    from plainsd.train.data import Obj, Scene, render

    class R:
        def __init__(self, image):
            self.images = [image]

    def painter(sd, prompt, negative="", **k):  # draws a red circle unless told not to draw red
        colour = "blue" if "red" in negative else "red"
        shape = "star" if "sks" in prompt else "circle"
        return R(render(Scene([Obj(shape, colour, "large", "centre")], "white")))

    monkeypatch.setattr(pipeline, "txt2img", painter)
    effect = metrics.negative_prompt_effect(None, n=4)
    assert effect["red_without"] == 1.0 and effect["red_with"] == 0.0
    assert metrics.concept_rate(None, "a sks star", "star", n=3) == 1.0
    assert metrics.concept_rate(None, "a circle", "star", n=3) == 0.0
    monkeypatch.setattr(pipeline, "img2img", lambda sd, image, prompt, **k: R(image))  # keeps its input exactly
    assert metrics.img2img_keeps(plainsd.build("tiny"), n=6) == 1.0  # (the model gives the picture size only)


def test_scene_rate_reads_every_attribute_and_the_background(monkeypatch):
    from plainsd import pipeline
    from plainsd.train.data import Obj, Scene, render

    class R:
        def __init__(self, image):
            self.images = [image]

    concept = Obj("diamond", "orange", "small", "top")
    wrong = [{}, {"colour": "red"}, {"size": "large"}, {"position": "left"}, {"shape": "square"}, {"background": "blue"},
             {"second": True}]

    def painter(sd, prompt, seed=0, **k):  # seed i > 0 gets wrong[i] wrong; seeds past the list draw the concept
        change = wrong[seed] if seed < len(wrong) else {}
        obj = Obj(**{**vars(concept), **{a: v for a, v in change.items() if a in vars(concept)}})
        extra = [Obj("circle", "green", "small", "bottom")] if "second" in change else []
        return R(render(Scene([obj, *extra], change.get("background", "black"))))

    monkeypatch.setattr(pipeline, "txt2img", painter)
    shares = metrics.scene_rate(None, "a sks-thing", Scene([concept], "black"), n=10)
    assert shares == {"count": 0.9, "shape": 0.9, "colour": 0.9, "size": 0.9, "position": 0.9, "background": 0.9,
                      "all": 0.4}


def test_eval_checks_on_a_tiny_model(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    plainsd.save(plainsd.build("tiny"), model)
    assert main(["eval", "--model", str(model), "--prompts", "0", "--two-object-prompts", "0", "--steps", "1",
                 "--checks", "--concept-prompt", "a star", "--concept-images", "4", "-o", str(tmp_path / "e.json")]) == 0
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["cfg_sweep_colour_and_shape"]) == {"1.0", "2.0", "3.0", "5.0"}
    assert 0 <= data["img2img_0.3_keeps"] <= 1 and 0 <= data["concept"]["rate"] <= 1
    assert set(data["negative_prompt"]) == {"prompt", "negative_prompt", "red_without", "red_with"}
