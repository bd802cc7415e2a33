"""VAE files and A1111's VAE selection: the layouts, a swapped VAE decoding as that VAE does, the infotext,
the API's listing, options and refresh routes."""

import hashlib
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import plainsd
from plainsd import pipeline, runtime, vaes, weights
from plainsd.cli import main
from plainsd.pnginfo import parse_infotext
from plainsd.request import GenerationRequest
from plainsd.server import create_app
from tests.reference import build_diffusers, max_diff

from tests.server.test_api import decode


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """models/ (alpha, beta and alpha.vae.safetensors beside them) and VAE/ (other.safetensors: beta's VAE)."""
    root = tmp_path_factory.mktemp("vaes")
    (root / "models").mkdir()
    (root / "VAE").mkdir()
    plainsd.save(plainsd.build("tiny", seed=0), root / "models" / "alpha.safetensors")
    beta = plainsd.build("tiny", seed=1)
    plainsd.save(beta, root / "models" / "beta.safetensors")
    weights.save_vae(plainsd.build("tiny", seed=2).vae, root / "models" / "alpha.vae.safetensors")
    weights.save_vae(beta.vae, root / "VAE" / "other.safetensors")
    return root


def test_vae_layouts_load_alike_and_decode_as_diffusers(folder, tmp_path):
    config = plainsd.preset("tiny")
    _, theirs, _ = build_diffusers(config, seed=7)
    theirs.save_pretrained(tmp_path / "vae-folder")             # diffusers' own folder
    save_file(theirs.state_dict(), str(tmp_path / "diffusers-names.safetensors"))   # its names in one file
    from_folder = weights.load_vae(tmp_path / "vae-folder")
    from_file = weights.load_vae(tmp_path / "diffusers-names.safetensors")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = theirs.decode(z).sample
        assert max_diff(from_folder.decode(z), reference) < 1e-4
        assert torch.equal(from_file.decode(z), from_folder.decode(z))
    # the original layout without a prefix, and a whole checkpoint's VAE under first_stage_model.
    bare = weights.load_vae(folder / "VAE" / "other.safetensors")
    whole = weights.load_vae(folder / "models" / "beta.safetensors")
    for (k, v), w in zip(bare.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(v, w), k
    assert bare.name == "other.safetensors"
    assert bare.hash == hashlib.sha256((folder / "VAE" / "other.safetensors").read_bytes()).hexdigest()[:10]
    with pytest.raises(weights.CheckpointError, match="is not a VAE: it has no encoder.conv_in"):
        weights.load_vae(_lora_file(tmp_path))


def _lora_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    return path


def test_a_swapped_vae_decodes_as_that_vae_and_is_named_in_the_infotext(folder):
    alpha = plainsd.load(folder / "models" / "alpha.safetensors")
    engine = runtime.Engine(alpha)
    request = GenerationRequest(prompt="a red circle", steps=3, seed=4, width=64, height=64)
    own = pipeline.generate(engine, request)
    engine.use_vae(weights.load_vae(folder / "VAE" / "other.safetensors"))
    swapped = pipeline.generate(engine, request)
    # the same model with beta's VAE put in by hand draws the same pixels
    by_hand = plainsd.load(folder / "models" / "alpha.safetensors")
    by_hand.vae.load_state_dict(plainsd.load(folder / "models" / "beta.safetensors").vae.state_dict())
    expected = pipeline.generate(by_hand, request)
    assert swapped.images[0].tobytes() == expected.images[0].tobytes() != own.images[0].tobytes()
    fields = parse_infotext(swapped.infotexts[0])
    sha = hashlib.sha256((folder / "VAE" / "other.safetensors").read_bytes()).hexdigest()
    assert fields["VAE"] == "other.safetensors" and fields["VAE hash"] == sha[:10]
    assert swapped.infotexts[0].index("Model:") < swapped.infotexts[0].index("VAE hash:") < swapped.infotexts[0].index("VAE:")
    engine.use_vae(None)  # the model's own again
    again = pipeline.generate(engine, request)
    assert again.images[0].tobytes() == own.images[0].tobytes() and "VAE" not in parse_infotext(again.infotexts[0])


def test_a1111_resolution_of_the_sd_vae_setting(folder):
    found = vaes.find_vaes(folder / "VAE", folder / "models")
    assert list(found) == ["alpha.vae.safetensors", "other.safetensors"]
    alpha, beta = folder / "models" / "alpha.safetensors", folder / "models" / "beta.safetensors"
    assert vaes.resolve("Automatic", alpha, found) == folder / "models" / "alpha.vae.safetensors"  # named after it
    assert vaes.resolve("Automatic", beta, found) is None        # none named after it: its own
    assert vaes.resolve("None", alpha, found) is None
    assert vaes.resolve("other.safetensors", alpha, found) == folder / "VAE" / "other.safetensors"
    with pytest.raises(ValueError, match="unknown VAE 'nope'; sd_vae takes Automatic, None, alpha.vae.safetensors, "
                                         "other.safetensors"):
        vaes.resolve("nope", alpha, found)


def test_api_lists_vaes_takes_sd_vae_and_refreshes(folder, tmp_path):
    models = shutil.copytree(folder / "models", tmp_path / "models")
    vae_dir = shutil.copytree(folder / "VAE", tmp_path / "VAE")
    app = create_app(models_dir=models, vae_dir=vae_dir)
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
    with TestClient(app) as client:
        listed = client.get("/sdapi/v1/sd-vae").json()
        assert listed == [{"model_name": "alpha.vae.safetensors", "filename": str(models / "alpha.vae.safetensors")},
                          {"model_name": "other.safetensors", "filename": str(vae_dir / "other.safetensors")}]
        assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["alpha", "beta"]
        auto = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert auto["sd_vae_name"] == "alpha.vae.safetensors"   # Automatic: the VAE named after alpha
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "other.safetensors"}})
        info = json.loads(r.json()["info"])
        assert info["sd_vae_name"] == "other.safetensors" and len(info["sd_vae_hash"]) == 10
        assert parse_infotext(decode(r.json()["images"][0]).info["parameters"])["VAE"] == "other.safetensors"
        # the options round trip; a name that is not listed is refused
        assert client.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "None"
        assert json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])["sd_vae_name"] is None
        r = client.post("/sdapi/v1/options", json={"sd_vae": "later.safetensors"})
        assert r.status_code == 422 and "unknown VAE 'later.safetensors'" in r.json()["detail"]
        # files added after the start are listed after a refresh, not before (A1111 lists them once)
        weights.save_vae(plainsd.build("tiny", seed=5).vae, vae_dir / "later.safetensors")
        plainsd.save(plainsd.build("tiny", seed=6), models / "gamma.safetensors")
        assert "later.safetensors" not in [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()]
        assert "gamma" not in [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert client.post("/sdapi/v1/refresh-vae").status_code == 200
        assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        assert "later.safetensors" in [v["model_name"] for v in client.get("/sdapi/v1/sd-vae").json()]
        gamma = [m for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "gamma"]
        sha = hashlib.sha256((models / "gamma.safetensors").read_bytes()).hexdigest()
        assert gamma[0]["hash"] == sha[:10] and gamma[0]["title"] == f"gamma.safetensors [{sha[:10]}]"
        assert client.post("/sdapi/v1/options", json={"sd_vae": "later.safetensors"}).status_code == 200


def test_cli_vae_file_and_folder(folder, tmp_path):
    out = tmp_path / "x.png"
    model = str(folder / "models" / "beta.safetensors")
    args = ["txt2img", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "--quiet",
            "--model", model, "-o", str(out)]
    assert main(args + ["--vae", str(folder / "VAE" / "other.safetensors")]) == 0
    from PIL import Image
    fields = parse_infotext(Image.open(out).info["parameters"])
    assert fields["VAE"] == "other.safetensors"
    assert fields["Model hash"] == hashlib.sha256((folder / "models" / "beta.safetensors").read_bytes()).hexdigest()[:10]
    assert main(args + ["--vae", "other.safetensors", "--vae-dir", str(folder / "VAE")]) == 0
    assert parse_infotext(Image.open(out).info["parameters"])["VAE"] == "other.safetensors"
    assert main(args + ["--vae", "nope", "--vae-dir", str(folder / "VAE")]) == 2


def test_cli_automatic_finds_the_vae_beside_the_model(folder, tmp_path):
    """A1111's default sd_vae, Automatic: NAME.vae.safetensors beside the model, as if named with --vae."""
    from PIL import Image

    models = folder / "models"
    args = ["txt2img", "a red circle", "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--quiet",
            "--model", str(models / "alpha.safetensors")]
    drawn = {}
    for name, extra in [("auto", []), ("file", ["--vae", str(models / "alpha.vae.safetensors")]),
                        ("name", ["--vae", "alpha.vae.safetensors"]), ("none", ["--vae", "None"])]:
        assert main(args + extra + ["-o", str(tmp_path / f"{name}.png")]) == 0
        drawn[name] = Image.open(tmp_path / f"{name}.png")
    assert drawn["auto"].tobytes() == drawn["file"].tobytes() == drawn["name"].tobytes() != drawn["none"].tobytes()
    assert parse_infotext(drawn["auto"].info["parameters"])["VAE"] == "alpha.vae.safetensors"
    assert vaes.beside(models / "alpha.safetensors") == {"alpha.vae.safetensors": models / "alpha.vae.safetensors"}
    assert main(args + ["--vae", "other.safetensors"]) == 2  # a name that is neither beside it nor given a folder


@pytest.fixture(scope="module")
def refiner_folder(folder, tmp_path_factory):
    """beta with alpha.vae's weights for its own VAE: what beta refines to when it decodes with alpha.vae."""
    root = tmp_path_factory.mktemp("refiner")
    baked = plainsd.load(folder / "models" / "beta.safetensors")
    baked.vae.load_state_dict(weights.load_vae(folder / "models" / "alpha.vae.safetensors").state_dict())
    plainsd.save(baked, root / "baked.safetensors")
    return root


def _refined(tmp_path, name, model, refiner, *extra):
    from PIL import Image

    out = tmp_path / f"{name}.png"
    assert main(["txt2img", "a red circle", "--steps", "4", "--width", "32", "--height", "32", "--seed", "1",
                 "--quiet", "--model", str(model), "--refiner", str(refiner), "--refiner-switch-at", "0.5",
                 *extra, "-o", str(out)]) == 0
    return Image.open(out)


def test_the_refiner_decodes_with_the_vae_sd_vae_gives_its_checkpoint(folder, refiner_folder, tmp_path):
    """As A1111 loads the sd_vae setting's VAE with the refiner: a named or given VAE for it too, Automatic the one
    named after the refiner (not the base's), None its own; the infotext names the VAE that decoded."""
    models = folder / "models"
    alpha, beta, baked = models / "alpha.safetensors", models / "beta.safetensors", refiner_folder / "baked.safetensors"
    expected = _refined(tmp_path, "expected", alpha, baked, "--vae", "None")
    own = _refined(tmp_path, "own", alpha, beta, "--vae", "None")
    assert expected.tobytes() != own.tobytes()
    for name, extra in [("file", ["--vae", str(models / "alpha.vae.safetensors")]),
                        ("name", ["--vae", "alpha.vae.safetensors", "--vae-dir", str(folder / "VAE")])]:
        picture = _refined(tmp_path, name, alpha, beta, *extra)
        assert picture.tobytes() == expected.tobytes(), name
        fields = parse_infotext(picture.info["parameters"])
        sha = hashlib.sha256((models / "alpha.vae.safetensors").read_bytes()).hexdigest()
        assert fields["VAE"] == "alpha.vae.safetensors" and fields["VAE hash"] == sha[:10]
        assert fields["Refiner"].startswith("beta")
    # a name listed beside --model gives the refiner of another folder that VAE too (A1111's one list)
    elsewhere = _refined(tmp_path, "elsewhere", alpha, baked, "--vae", "alpha.vae.safetensors")
    assert elsewhere.tobytes() == expected.tobytes()
    automatic = _refined(tmp_path, "automatic", alpha, beta)  # alpha.vae for alpha, nothing named after beta
    assert automatic.tobytes() == own.tobytes() and "VAE" not in parse_infotext(automatic.info["parameters"])
    # the API alike: sd_vae resolved for the refiner's checkpoint
    served = shutil.copytree(models, tmp_path / "models")
    shutil.copy(baked, served / "baked.safetensors")
    body = {"prompt": "a red circle", "steps": 4, "width": 32, "height": 32, "seed": 1, "refiner_switch_at": 0.5}
    with TestClient(create_app(models_dir=served, vae_dir=folder / "VAE")) as client:
        drawn = {}
        for setting, refiner in [("None", "baked"), ("None", "beta"), ("Automatic", "beta"),
                                 ("alpha.vae.safetensors", "beta")]:
            r = client.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": refiner,
                                                        "override_settings": {"sd_vae": setting}})
            drawn[setting, refiner] = decode(r.json()["images"][0]).tobytes(), json.loads(r.json()["info"])
    assert drawn["alpha.vae.safetensors", "beta"][0] == drawn["None", "baked"][0] != drawn["None", "beta"][0]
    assert drawn["Automatic", "beta"][0] == drawn["None", "beta"][0]
    assert [drawn[key][1]["sd_vae_name"] for key in drawn] == [None, None, None, "alpha.vae.safetensors"]


def test_the_xyz_vae_axis_with_a_refiner(folder, tmp_path):
    """Each cell's VAE decodes the refined picture, as txt2img --vae X --refiner draws it."""
    from PIL import Image

    models = folder / "models"
    common = ["a red circle", "--steps", "4", "--width", "32", "--height", "32", "--seed", "1", "--quiet",
              "--model", str(models / "alpha.safetensors"), "--refiner", str(models / "beta.safetensors"),
              "--refiner-switch-at", "0.5", "--vae-dir", str(folder / "VAE")]
    assert main(["xyz", *common, "--x-type", "VAE", "--x-values", "None, alpha.vae", "--include-lone-images",
                 "-o", str(tmp_path / "g.png")]) == 0
    for i, setting in [(1, "None"), (2, "alpha.vae.safetensors")]:
        assert main(["txt2img", *common, "--vae", setting, "-o", str(tmp_path / "alone.png")]) == 0
        assert Image.open(tmp_path / f"g-{i}.png").tobytes() == Image.open(tmp_path / "alone.png").tobytes()
    assert Image.open(tmp_path / "g-1.png").tobytes() != Image.open(tmp_path / "g-2.png").tobytes()


def test_vae_axis_values_are_found_as_a1111_finds_them(folder):
    found = vaes.find_vaes(folder / "VAE", folder / "models")
    assert [vaes.find_setting(v, found) for v in ("auto", "AUTOMATIC", " none ", "OTHER", "safetensors")] == [
        "Automatic", "Automatic", "None", "other.safetensors", "other.safetensors"]  # the shortest containing it
    with pytest.raises(ValueError, match="no VAE is named like 'nope'; there are Automatic, None, "
                                         "alpha.vae.safetensors, other.safetensors"):
        vaes.find_setting("nope", found)


def test_the_xyz_vae_axis_draws_each_cell_with_its_vae(folder, tmp_path, capsys):
    from PIL import Image

    model, vae_dir = str(folder / "models" / "alpha.safetensors"), str(folder / "VAE")
    common = ["a red circle", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "--quiet",
              "--model", model, "--vae-dir", vae_dir]
    grid = tmp_path / "grid.png"
    assert main(["xyz", *common, "--x-type", "VAE", "--x-values", "None, other", "--no-legend",
                 "--include-lone-images", "-o", str(grid)]) == 0
    cells = [Image.open(tmp_path / f"grid-{i}.png") for i in (1, 2)]
    for cell, setting in zip(cells, ("None", "other.safetensors")):  # each the picture txt2img draws with it
        assert main(["txt2img", *common, "--vae", setting, "-o", str(tmp_path / "alone.png")]) == 0
        assert cell.tobytes() == Image.open(tmp_path / "alone.png").tobytes()
    assert cells[0].tobytes() != cells[1].tobytes()
    assert [parse_infotext(c.info["parameters"]).get("VAE") for c in cells] == [None, "other.safetensors"]
    assert main(["xyz", *common, "--x-type", "VAE", "--x-values", "other, nope"]) == 2
    assert "no VAE is named like 'nope'" in capsys.readouterr().err


def test_the_xyz_vae_axis_leaves_the_engine_as_it_found_it(folder):
    from plainsd import xyz

    engine = runtime.Engine(plainsd.load(folder / "models" / "alpha.safetensors"))
    own = engine.sd.vae
    found = vaes.find_vaes(folder / "VAE", folder / "models")
    checkpoints = xyz.Checkpoints(find=None, load=None, vaes=lambda: found, use_vae=lambda e, setting, key: e.use_vae(
        weights.load_vae(found[setting]) if setting in found else None))
    request = GenerationRequest(prompt="a red circle", steps=1, seed=4, width=32, height=32)
    plot = xyz.plan(request, xyz.XYZSettings("VAE", "other"), checkpoints=checkpoints)
    xyz.run(engine, plot, checkpoints)
    assert engine.sd.vae is own
    swapped = weights.load_vae(found["alpha.vae.safetensors"])
    engine.use_vae(swapped)  # one put in before the plot is there after it
    xyz.run(engine, xyz.plan(request, xyz.XYZSettings("VAE", "None, other"), checkpoints=checkpoints), checkpoints)
    assert engine.sd.vae is swapped and engine.base_vae is own
    with pytest.raises(ValueError, match="the VAE axis has no VAEs to choose among here"):
        xyz.plan(request, xyz.XYZSettings("VAE", "other"))
    rule = engine.vae_for = lambda checkpoint: None  # the refiner's rule comes back too
    xyz.run(engine, plot, xyz.Checkpoints(find=None, load=None, vaes=lambda: found, use_vae=lambda e, setting, key: (
        setattr(e, "vae_for", lambda checkpoint: found[setting]), e.use_vae(weights.load_vae(found[setting])))))
    assert engine.vae_for is rule and engine.sd.vae is swapped


def test_the_xyz_vae_axis_with_the_checkpoint_axis(folder, tmp_path):
    """Automatic per model: beta's a VAE named after it in --vae-dir, alpha's the one named after it beside it."""
    from PIL import Image

    models, vae_dir = folder / "models", tmp_path / "VAE"
    vae_dir.mkdir()
    shutil.copy(models / "alpha.vae.safetensors", vae_dir / "beta.x.safetensors")
    shutil.copy(folder / "VAE" / "other.safetensors", vae_dir / "other.safetensors")
    common = ["a red circle", "--steps", "2", "--width", "32", "--height", "32", "--seed", "1", "--quiet",
              "--vae-dir", str(vae_dir)]
    assert main(["xyz", *common, "--model", str(models / "alpha.safetensors"), "--x-type", "Checkpoint name",
                 "--x-values", f"{models / 'alpha.safetensors'}, {models / 'beta.safetensors'}", "--y-type", "VAE",
                 "--y-values", "Automatic, other", "--include-lone-images", "-o", str(tmp_path / "g.png")]) == 0
    alone = []
    for name, vae in [("alpha", "Automatic"), ("beta", "Automatic"), ("alpha", "other"), ("beta", "other"),
                      ("beta", "None")]:
        assert main(["txt2img", *common, "--model", str(models / f"{name}.safetensors"), "--vae",
                     "other.safetensors" if vae == "other" else vae, "-o", str(tmp_path / "alone.png")]) == 0
        alone.append(Image.open(tmp_path / "alone.png").tobytes())
    assert [Image.open(tmp_path / f"g-{i}.png").tobytes() for i in range(1, 5)] == alone[:4]
    assert alone[1] != alone[4]  # beta's Automatic is the VAE named after it, not its own


def test_reading_the_servers_model_leaves_its_vae(folder):
    from plainsd.server.models import ModelStore

    store = ModelStore(models_dir=folder / "models", vae_dir=folder / "VAE")
    engine = store.get(None, store.vae_for("other.safetensors"))
    assert store.model() is engine and engine.sd.vae.name == "other.safetensors"


def test_the_api_xyz_vae_axis(folder, tmp_path):
    from plainsd import xyz

    app = create_app(models_dir=folder / "models", vae_dir=folder / "VAE")
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
    axis = xyz.axis_labels("txt2img").index("VAE")
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={**body, "script_name": "x/y/z plot", "script_args": [
            axis, "", ["Automatic", "other.safetensors"], 0, "", None, 0, "", None, False, True]})
        assert r.status_code == 200, r.text
        cells = [decode(b) for b in r.json()["images"]][1:]
        assert [parse_infotext(c.info["parameters"])["VAE"] for c in cells] == ["alpha.vae.safetensors",
                                                                                "other.safetensors"]
        alone = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "other.safetensors"}})
        assert cells[1].tobytes() == decode(alone.json()["images"][0]).tobytes()
        after = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert after["sd_vae_name"] == "alpha.vae.safetensors"  # the setting's again
        r = client.post("/sdapi/v1/txt2img", json={**body, "script_name": "x/y/z plot",
                                                    "script_args": [axis, "nope"]})
        assert r.status_code == 422 and "no VAE is named like 'nope'" in r.json()["detail"]
