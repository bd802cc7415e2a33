"""Each recipe's extra settings: read into its dataclass, a misspelt or unknown key refused with the allowed ones."""

from pathlib import Path

import pytest

import plainsd
from plainsd.cli import main
from plainsd.train import finetune, recipes
from plainsd.train.loop import TrainConfig

RECIPES = Path(plainsd.__file__).parent / "data" / "recipes"


def test_every_shipped_recipe_parses_into_its_settings_and_keeps_its_values():
    paths = sorted(RECIPES.glob("*.json"))
    assert len(paths) >= 10
    for path in paths:
        cfg = TrainConfig.from_file(path)
        module = finetune if path.name.startswith("finetune-") else recipes
        s = module.settings(cfg)
        assert type(s) is module.SETTINGS[cfg.network], path.name
        for key, value in cfg.extra.items():  # what the JSON says is what the recipe reads
            got = getattr(s, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (path.name, key)


def test_a_misspelt_recipe_setting_is_refused_with_the_allowed_ones(tmp_path, capsys):
    extra = {"vae": "runs/vae/vae.safetensors", "clip": "runs/clip/clip.safetensors", "snr_gama": 5}
    cfg = TrainConfig(network="unet", out=str(tmp_path / "unet"), extra=extra)
    allowed = "allowed: vae, clip, init, empty_caption, latent_cache, object_weight, snr_gamma, fp16"
    with pytest.raises(ValueError, match=r"the unet recipe has no setting 'snr_gama' in extra \(did you mean "
                                         rf"snr_gamma\?\); {allowed}$"):
        recipes.train_unet(cfg, progress=False)  # before any file is read
    assert not (tmp_path / "unet").exists()
    # and from the command line, in one sentence
    bad = tmp_path / "bad.json"
    bad.write_text('{"network": "vae", "extra": {"kl_wieght": 0.1}}')
    assert main(["train", "vae", "--config", str(bad), "--out", str(tmp_path / "vae"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the vae recipe has no setting 'kl_wieght' in extra (did you mean kl_weight?); allowed: kl_weight, object_weight" in err
    assert not (tmp_path / "vae").exists()


def test_a_misspelt_or_foreign_finetune_setting_is_refused_with_the_allowed_ones(tmp_path):
    cfg = TrainConfig(network="lora", out=str(tmp_path / "lora"), extra={"rnak": 2})
    with pytest.raises(ValueError, match=r"the lora recipe has no setting 'rnak' in extra \(did you mean rank\?\); "
                                         r"allowed: model, instance_prompt, .*, rank, alpha, train_text_encoder$"):
        finetune.finetune(cfg, progress=False)
    # a setting of another method is not silently ignored either
    cfg = TrainConfig(network="dreambooth", out=str(tmp_path / "db"), extra={"rank": 2})
    with pytest.raises(ValueError, match=r"the dreambooth recipe has no setting 'rank' in extra; allowed: .*class_prompts"):
        finetune.finetune(cfg, progress=False)


def test_values_are_checked_for_their_kind():
    with pytest.raises(ValueError, match=r"extra.object_weight of the vae recipe must be a number, got 'ten'"):
        recipes.VAESettings.from_extra({"object_weight": "ten"})
    with pytest.raises(ValueError, match=r"extra.latent_cache of the unet recipe must be a whole number, got 2.5"):
        recipes.UNetSettings.from_extra({"vae": "v", "clip": "c", "latent_cache": 2.5})
    with pytest.raises(ValueError, match=r"extra.snr_gamma of the unet recipe must be a number or null, got True"):
        recipes.UNetSettings.from_extra({"vae": "v", "clip": "c", "snr_gamma": True})
    s = recipes.CLIPSettings.from_extra({"hard_negatives": 1, "vary": ["shape", "shape", "size"]})
    assert s.hard_negatives == 1.0 and type(s.hard_negatives) is float and s.vary == ("shape", "shape", "size")
    assert finetune.settings(TrainConfig(network="dreambooth", extra={"class_prompts": "a circle"})).class_prompts == "a circle"
    with pytest.raises(ValueError, match="unknown fine-tuning method 'vae'"):
        finetune.settings(TrainConfig(network="vae"))
