"""The checkpoint merger against A1111's formulas, on random tiny weights."""

import hashlib
import json

import pytest
import torch

import plainsd
from plainsd import weights
from plainsd.cli import main
from plainsd.merge import merge, merge_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three tiny models of one kind (A, B, C), an inpainting one and an SD2 one, saved as files."""
    root = tmp_path_factory.mktemp("merge")
    out = {}
    for name, preset, seed in (("a", "tiny", 0), ("b", "tiny", 1), ("c", "tiny", 2), ("inpaint", "tiny-inpaint", 3),
                               ("sd2", "tiny-sd2", 4)):
        out[name] = plainsd.save(plainsd.build(preset, seed=seed), root / f"{name}.safetensors")
    return out


def _state(path):
    source = weights.read_tensors(path)
    return {k: source.get(k) for k in source.shapes}


def test_weighted_sum_and_add_difference_follow_the_formulas(files):
    a, b, c = (_state(files[k]) for k in "abc")
    ws = merge(a, b, method="weighted-sum", multiplier=0.3).tensors
    ad = merge(a, b, c, method="add-difference", multiplier=0.7).tensors
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    torch.testing.assert_close(ws[key], 0.7 * a[key] + 0.3 * b[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(ad[key], a[key] + 0.7 * (b[key] - c[key]), rtol=0, atol=1e-6)
    for k in a:  # every tensor (all have "model" in their keys here)
        torch.testing.assert_close(ws[k], 0.7 * a[k] + 0.3 * b[k], rtol=0, atol=1e-5)
    assert not torch.equal(ws[key], a[key])


def test_what_a1111_does_with_keys_missing_or_extra(files):
    a, b, c = (_state(files[k]) for k in "abc")
    key = "model.diffusion_model.out.2.weight"
    a["betas"] = torch.linspace(0, 1, 10)          # no "model" in it: A's, untouched
    b["betas"] = torch.zeros(10)
    b["model_ema.extra"] = torch.ones(3)           # B only: left out
    del c[key]                                     # C lacks it: B - C counts as zero, A stays
    out = merge(a, b, c, method="add-difference", multiplier=0.5)
    assert torch.equal(out.tensors["betas"], a["betas"])
    assert "model_ema.extra" not in out.tensors and out.left_out == 1
    assert torch.equal(out.tensors[key], a[key])
    position = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    a[position], b[position] = torch.arange(77)[None], torch.arange(77)[None] * 2
    assert torch.equal(merge(a, b, multiplier=0.5).tensors[position], a[position])  # A1111 skips it
    kept = merge(a, method="none", discard=r"final_layer_norm", half=True).tensors
    assert set(kept) == {k for k in a if "final_layer_norm" not in k} and len(kept) < len(a)
    assert kept[position].dtype == torch.int64 and kept[key].dtype == torch.float16  # only float32 is halved


def test_inpainting_a_with_ordinary_b_merges_the_first_four_channels(files, tmp_path):
    a, b = _state(files["inpaint"]), _state(files["b"])
    first = "model.diffusion_model.input_blocks.0.0.weight"
    out = merge(a, b, multiplier=0.4)
    assert out.inpainting and out.tensors[first].shape[1] == 9
    torch.testing.assert_close(out.tensors[first][:, :4], 0.6 * a[first][:, :4] + 0.4 * b[first], rtol=0, atol=1e-6)
    assert torch.equal(out.tensors[first][:, 4:], a[first][:, 4:])
    with pytest.raises(ValueError, match="A must be the inpainting model"):
        merge(b, a)
    path = merge_files(files["inpaint"], files["b"], output=tmp_path, multiplier=0.4)
    assert path.name == "0.6(inpaint) + 0.4(b).inpainting.safetensors"
    assert plainsd.load(path).config.unet.in_channels == 9  # A's config, not B's


def test_models_of_different_kinds_are_refused_in_one_sentence(files):
    with pytest.raises(ValueError, match=r"A and B differ in model\.diffusion_model\..*same architecture"):
        merge(_state(files["a"]), _state(files["sd2"]))
    lora_like = {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="model B has no tensor of A's"):
        merge(_state(files["a"]), lora_like)
    with pytest.raises(ValueError, match="Add difference needs a model C"):
        merge(_state(files["a"]), _state(files["b"]), method="add-difference")


def test_file_recipe_name_half_vae_and_discard(files, tmp_path):
    vae_file = weights.save_vae(plainsd.load(files["c"]).vae, tmp_path / "other.vae.safetensors")
    out = merge_files(files["a"], files["b"], output=tmp_path, multiplier=0.25, half=True, vae=vae_file, discard=r"^model_ema\.")
    assert out.name == "0.75(a) + 0.25(b).safetensors"
    source = weights.read_tensors(out)
    recipe = json.loads(source.metadata["sd_merge_recipe"])
    sha = {k: hashlib.sha256(files[k].read_bytes()).hexdigest() for k in "ab"}
    assert recipe == {"type": "webui", "primary_model_hash": sha["a"], "secondary_model_hash": sha["b"],
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.25,
                      "save_as_half": True, "custom_name": "", "config_source": 0, "bake_in_vae": "other.vae.safetensors",
                      "discard_weights": r"^model_ema\.", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(source.metadata["sd_merge_models"])
    assert models[sha["a"]] == {"name": "a.safetensors", "legacy_hash": weights.legacy_hash(files["a"]),
                                "sd_merge_recipe": None}
    assert source.metadata["format"] == "pt"
    assert {source.get(k).dtype for k in source.shapes} == {torch.float16}
    assert not any(k.startswith("model_ema.") for k in source.shapes)
    merged = plainsd.load(out, dtype=torch.float16)
    c_vae = plainsd.load(files["c"]).vae.state_dict()
    for k, v in merged.vae.state_dict().items():
        assert torch.equal(v, c_vae[k].half()), k
    # a merge of a merge keeps the first merge's models and recipe
    again = merge_files(out, files["c"], output=tmp_path / "again.safetensors", multiplier=0.5)
    models2 = json.loads(weights.read_tensors(again).metadata["sd_merge_models"])
    assert sha["a"] in models2 and models2[hashlib.sha256(out.read_bytes()).hexdigest()]["sd_merge_recipe"] == recipe
    assert json.loads(weights.read_tensors(again).metadata["sd_merge_recipe"])["custom_name"] == "again"


def test_cli_merge(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(files["a"]), str(files["b"]), str(files["c"]), "--method", "add-difference",
                 "-M", "1", "-o", str(out)]) == 0
    a, b, c, m = (_state(p) for p in (files["a"], files["b"], files["c"], out))
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(m[key], a[key] + b[key] - c[key], rtol=0, atol=1e-6)
    assert main(["merge", str(files["a"]), "--method", "weighted-sum", "-o", str(out)]) == 2
    assert "takes 2 model file(s) (A, B), got 1" in capsys.readouterr().err
    assert main(["merge", str(files["a"]), str(files["sd2"]), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
