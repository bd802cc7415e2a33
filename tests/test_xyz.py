"""A1111's X/Y/Z plot: value syntax, axis types by label and index, cells equal to their own pictures, the grid's
arithmetic, and the command line."""

import numpy as np
import pytest
from PIL import Image

import plainsd
from plainsd import pipeline, xyz
from plainsd.cli import main
from plainsd.pnginfo import parse_infotext, read_parameters
from plainsd.request import GenerationRequest, HiresFix
from plainsd.xyz import XYZSettings, draw_legend, image_grid, parse_values, split_values


@pytest.mark.parametrize("text, kind, values", [
    ("1-5", int, [1, 2, 3, 4, 5]),                      # A1111's examples (its X/Y/Z plot help)
    ("1-5 (+2)", int, [1, 3, 5]),
    ("10-5 (-3)", int, [10, 7]),
    ("1-10 [5]", int, [1, 3, 5, 7, 10]),                # np.linspace, truncated
    ("1, 2,3 , 8-9", int, [1, 2, 3, 8, 9]),
    ("1-3 (+0.5)", float, [1.0, 1.5, 2.0, 2.5, 3.0]),
    ("0.0-1.0 [3]", float, [0.0, 0.5, 1.0]),
    ("7, 7.5", float, [7.0, 7.5]),
    ('"a, b", c ,d', str, ["a, b", "c", "d"]),          # csv quoting keeps a comma inside a value
])
def test_values_as_a1111_reads_them(text, kind, values):
    assert parse_values(split_values(text), kind) == values


def test_bad_values_are_one_sentence():
    with pytest.raises(ValueError, match=r"takes whole numbers or ranges such as 1-5, 1-5 \(\+2\), 1-10 \[5\], got 'x'"):
        parse_values(["x"], int)
    with pytest.raises(ValueError, match=r"the X axis \(Steps\) takes whole numbers"):
        xyz.plan(GenerationRequest("a"), XYZSettings(x_type="Steps", x_values="1-5 (2)"))


def test_axis_types_by_a1111_index_per_tab():
    assert xyz.axis_labels("txt2img")[6] == "CFG Scale" and xyz.axis_labels("img2img")[5] == "CFG Scale"
    assert xyz.axis_labels("txt2img")[11] == "Checkpoint name" and xyz.axis_labels("img2img")[10] == "Checkpoint name"
    plot = xyz.plan(GenerationRequest("a", seed=1), XYZSettings(x_type=6, x_values="3, 5", y_type=4, y_values="2"))
    assert [c.request.cfg_scale for c in plot.cells] == [3.0, 5.0] and plot.cells[0].request.steps == 2
    assert xyz.axis_labels("txt2img")[12:17] == ["Negative Guidance minimum sigma", "Sigma Churn", "Sigma min",
                                                 "Sigma max", "Sigma noise"]
    with pytest.raises(ValueError, match=r"the X/Y/Z plot axis 'Face restore' is not drawn by "
                                         r"plainsd for txt2img; it draws Nothing, Seed, Var. seed, Var. strength, "
                                         r"Steps"):
        xyz.plan(GenerationRequest("a"), XYZSettings(x_type=32, x_values="1"))
    with pytest.raises(ValueError, match="x_type 99 is not an axis"):
        xyz.plan(GenerationRequest("a"), XYZSettings(x_type=99, x_values="1"))
    with pytest.raises(ValueError, match="'Hires steps' is not drawn by plainsd for img2img"):
        xyz.plan(GenerationRequest("a"), XYZSettings(x_type="Hires steps", x_values="1"), "img2img")


def test_prompt_sr_prompt_order_and_axis_rules():
    req = GenerationRequest("a red circle, big", "red blur", seed=1)
    plot = xyz.plan(req, XYZSettings(x_type="Prompt S/R", x_values="red, blue, green"))
    assert [(c.request.prompt, c.request.negative_prompt) for c in plot.cells] == [
        ("a red circle, big", "red blur"), ("a blue circle, big", "blue blur"), ("a green circle, big", "green blur")]
    with pytest.raises(ValueError, match="Prompt S/R did not find 'purple' in the prompt or the negative prompt"):
        xyz.plan(req, XYZSettings(x_type="Prompt S/R", x_values="purple, red"))
    plot = xyz.plan(GenerationRequest("a, b, c"), XYZSettings(x_type="Prompt order", x_values="a, c"))
    assert [c.request.prompt for c in plot.cells] == ["a, b, c", "c, b, a"]
    with pytest.raises(ValueError, match=r"the X axis \(Hires steps\) value 3: the Hires steps axis needs the hires fix"):
        xyz.plan(req, XYZSettings(x_type="Hires steps", x_values="3"))
    plot = xyz.plan(req.replace(hires=HiresFix()), XYZSettings(x_type="Hires steps", x_values="3",
                                                                y_type="Denoising", y_values="0.25"))
    assert (plot.cells[0].request.hires.steps, plot.cells[0].request.hires.strength) == (3, 0.25)
    with pytest.raises(ValueError, match=r"the X/Y/Z plot cell Steps 0: steps must be between 1 and 1000"):
        xyz.plan(req, XYZSettings(x_type="Steps", x_values="0"))
    with pytest.raises(ValueError, match="takes up to 18 script_args"):
        XYZSettings.from_script_args([1] * 19)


def test_seeds_are_fixed_once_and_varied_along_an_axis():
    plot = xyz.plan(GenerationRequest("a", seed=-1), XYZSettings(x_type="Steps", x_values="1, 2", y_type="CFG Scale",
                                                                  y_values="3, 4", vary_seeds_y=True))
    seeds = [c.request.seed for c in plot.cells]
    # A1111's offsets: an X axis that does not vary the seeds counts as one column, so the second row gets + 1
    assert seeds[0] >= 0 and seeds == [seeds[0], seeds[0], seeds[0] + 1, seeds[0] + 1]
    plot = xyz.plan(GenerationRequest("a", seed=100), XYZSettings(x_type="Steps", x_values="1, 2", y_type="CFG Scale",
                                                                   y_values="3, 4", vary_seeds_x=True, vary_seeds_y=True))
    assert [c.request.seed for c in plot.cells] == [100, 101, 102, 103]  # both: + column + row x columns
    plot = xyz.plan(GenerationRequest("a", seed=-1), XYZSettings(x_type="Steps", x_values="1", no_fixed_seeds=True))
    assert plot.cells[0].request.seed == -1


def test_the_costliest_axis_changes_least_often():
    plot = xyz.plan(GenerationRequest("a", seed=1), XYZSettings(x_type="Steps", x_values="1, 2", y_type="CFG Scale",
                                                                 y_values="3, 4"))
    assert plot.order == [0, 1, 2, 3]  # A1111: Z, then Y, then X innermost
    checkpoints = xyz.Checkpoints(find=lambda name: name, load=None)
    plot = xyz.plan(GenerationRequest("a", seed=1), XYZSettings(x_type="Checkpoint name", x_values="m1, m2",
                                                                 y_type="Seed", y_values="1, 2"), checkpoints=checkpoints)
    assert plot.order == [0, 2, 1, 3] and [c.checkpoint for c in plot.cells] == ["m1", "m2", "m1", "m2"]


def _squares(n, size=(32, 32)):
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 100)) for i in range(n)]


def test_grid_arithmetic_and_legend_placement():
    cells = _squares(6)
    grid = image_grid(cells, rows=2)
    assert grid.size == (96, 64)
    assert np.array_equal(np.asarray(grid.crop((64, 32, 96, 64))), np.asarray(cells[5]))
    labelled = draw_legend(grid, 32, 32, ["a", "b", "c"], ["row one", "row two"], margin=4)
    pad_left = labelled.width - 3 * 32 - 2 * 4
    pad_top = labelled.height - 2 * 32 - 4
    assert pad_left >= 32 * 3 // 4 and pad_top > 0  # a band for the left labels, one for the top ones
    for i, cell in enumerate(cells):
        col, row = i % 3, i // 3
        x, y = pad_left + 36 * col, pad_top + 36 * row
        assert np.array_equal(np.asarray(labelled.crop((x, y, x + 32, y + 32))), np.asarray(cell))
    assert draw_legend(grid, 32, 32, ["", "", ""], ["", ""]).size == (96, 64)  # nothing to write: no bands
    small = image_grid([Image.new("RGB", (16, 8), "red")] + _squares(1), rows=1)  # smaller ones centred
    assert small.getpixel((8, 2)) == (255, 255, 255) and small.getpixel((8, 16)) == (255, 0, 0)


def test_cells_are_the_pictures_their_requests_draw(tiny):
    req = GenerationRequest("a red circle", "blue", steps=2, width=32, height=32, seed=5)
    settings = XYZSettings(x_type="Seed", x_values="7, 8", y_type="CFG Scale", y_values="2, 6",
                           include_lone_images=True, draw_legend=False)
    result = xyz.run(tiny, xyz.plan(req, settings))
    alone = [pipeline.generate(tiny, req.replace(seed=s, cfg_scale=c)) for c in (2.0, 6.0) for s in (7, 8)]
    assert len(result.images) == 5 and result.seeds == [7, 7, 8, 7, 8]
    for cell, own in zip(result.images[1:], alone):
        assert cell.tobytes() == own.images[0].tobytes()
    assert result.images[0].tobytes() == image_grid([a.images[0] for a in alone], rows=2).tobytes()
    assert result.images[1].tobytes() != result.images[2].tobytes()
    assert result.infotexts[1:] == [a.infotexts[0] for a in alone]
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Script"], fields["X Type"], fields["X Values"], fields["Fixed X Values"]) == (
        "X/Y/Z plot", "Seed", "7, 8", "7, 8")
    assert (fields["Y Type"], fields["Y Values"], fields["Seed"]) == ("CFG Scale", "2, 6", "7")


def test_z_axis_sub_grids_and_batches(tiny):
    req = GenerationRequest("a", steps=1, width=16, height=16, seed=1, batch_size=2)
    settings = XYZSettings(x_type="Steps", x_values="1, 2", z_type="Seed", z_values="3, 4", include_sub_grids=True,
                           draw_legend=False)
    result = xyz.run(tiny, xyz.plan(req, settings))
    # each cell is its batch's grid (2 images side by side); each Z value a 2x1 grid of them; the whole a row of Zs
    assert [im.size for im in result.images] == [(128, 16), (64, 16), (64, 16)]
    assert result.images[0].tobytes() == image_grid(result.images[1:], rows=1).tobytes()


def test_variation_and_sigma_axes_set_their_fields():
    req = GenerationRequest("a", seed=1, subseed=-1)
    settings = XYZSettings(x_type="Var. seed", x_values="-1, 5", y_type="Var. strength", y_values="0.25")
    plot = xyz.plan(req, settings)
    subseeds = [c.request.subseed for c in plot.cells]
    assert subseeds[0] >= 0 and subseeds[1] == 5 and plot.cells[0].request.subseed_strength == 0.25  # -1 fixed
    plot = xyz.plan(req, XYZSettings(x_type="Var. strength", x_values="0, 1"))
    first = plot.cells[0].request.subseed
    assert first >= 0 and [c.request.subseed for c in plot.cells] == [first, first]  # one variation seed for all
    sigmas = [("Sigma Churn", "s_churn"), ("Sigma min", "s_tmin"), ("Sigma max", "s_tmax"), ("Sigma noise", "s_noise")]
    for label, name in sigmas:
        plot = xyz.plan(req.replace(sampler="Euler"), XYZSettings(x_type=label, x_values="0.5, 1.5"))
        assert [getattr(c.request, name) for c in plot.cells] == [0.5, 1.5]
    with pytest.raises(ValueError, match=r"cell Sigma Churn 1.0: s_churn is for the samplers"):
        xyz.plan(req.replace(sampler="DDIM"), XYZSettings(x_type="Sigma Churn", x_values="1"))


@pytest.mark.parametrize("request_fields, x_type, x_values, field", [
    ({"subseed": 9}, "Var. strength", "0.3, 0.8", "subseed_strength"),
    ({"sampler": "Euler"}, "Sigma Churn", "0.5, 2", "s_churn"),
])
def test_variation_and_sigma_cells_are_their_own_pictures(tiny, request_fields, x_type, x_values, field):
    req = GenerationRequest("a red circle", steps=3, width=32, height=32, seed=5, **request_fields)
    settings = XYZSettings(x_type=x_type, x_values=x_values, include_lone_images=True, draw_legend=False)
    result = xyz.run(tiny, xyz.plan(req, settings))
    alone = [pipeline.generate(tiny, req.replace(**{field: float(v)})) for v in x_values.split(",")]
    assert len(result.images) == 3
    for cell, own in zip(result.images[1:], alone):
        assert cell.tobytes() == own.images[0].tobytes()
    assert result.images[1].tobytes() != result.images[2].tobytes()  # the axis changes the picture
    assert result.infotexts[1:] == [a.infotexts[0] for a in alone]


def test_rng_source_cells_are_their_own_pictures(tiny):
    req = GenerationRequest("a red circle", steps=3, width=32, height=32, seed=5, sampler="Euler a")
    settings = XYZSettings(x_type="RNG source", x_values="GPU, NV", include_lone_images=True, draw_legend=False)
    result = xyz.run(tiny, xyz.plan(req, settings))
    alone = [pipeline.generate(tiny, req.replace(randn_source=v)) for v in ("GPU", "NV")]
    assert [c.tobytes() for c in result.images[1:]] == [a.images[0].tobytes() for a in alone]
    assert result.images[1].tobytes() != result.images[2].tobytes()
    assert parse_infotext(result.infotexts[2])["RNG"] == "NV"
    with pytest.raises(ValueError, match="cell RNG source cuda: randn_source .* must be one of GPU, CPU, NV"):
        xyz.plan(req, XYZSettings(x_type="RNG source", x_values="cuda"))


def test_cli_xyz_writes_the_grid_and_its_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["xyz", "a red circle", "--x-type", "Seed", "--x-values", "1, 2", "--y-type", "Steps", "--y-values", "1-2",
            "--width", "32", "--height", "32", "--quiet", "--no-legend", "--include-lone-images", "-o", "grid.png"]
    assert main(args) == 0
    grid, cells = Image.open("grid.png"), [Image.open(f"grid-{i}.png") for i in range(1, 5)]
    assert grid.size == (64, 64) and grid.tobytes() == image_grid(cells, rows=2).tobytes()
    assert parse_infotext(read_parameters("grid.png"))["X Type"] == "Seed"
    assert [parse_infotext(read_parameters(f"grid-{i}.png"))["Steps"] for i in range(1, 5)] == ["1", "1", "2", "2"]
    assert main(["xyz", "a", "--x-type", "Schedule rho", "--x-values", "1"]) == 2
    assert "'Schedule rho' is not drawn by plainsd" in capsys.readouterr().err
    plainsd.save(plainsd.build("tiny", seed=1), tmp_path / "other.safetensors")
    assert main(["xyz", "a", "--x-type", "Checkpoint name", "--x-values", "other.safetensors, missing.safetensors"]) == 2
    assert "no such model file or folder: missing.safetensors" in capsys.readouterr().err
    assert main(["xyz", "a", "--backend", "openvino", "--x-type", "Refiner checkpoint", "--x-values",
                 "None, other.safetensors"]) == 2  # every cell checked on the run's backend before one is drawn
    assert "the openvino backend and a refiner do not run together yet" in capsys.readouterr().err


def test_refiner_axes_pick_the_refiner_and_its_switch(tmp_path):
    """A1111's Refiner checkpoint axis (a model by name, or None: no refiner, whatever switch the cell has) and
    Refiner switch at; the refiner's axis loads a model, so it changes least often."""
    sd = plainsd.build("tiny-sdxl", seed=0)
    plainsd.save(plainsd.build("tiny-sdxl-refiner", seed=1), tmp_path / "refiner.safetensors")
    names = {"xl_refiner": str(tmp_path / "refiner.safetensors")}
    checkpoints = xyz.Checkpoints(find=lambda name: names[name], load=None)
    req = GenerationRequest("a red circle", steps=2, width=64, height=64, seed=5, sampler="Euler")
    settings = XYZSettings(x_type="Refiner switch at", x_values="0.5, 0.8", y_type="Refiner checkpoint",
                           y_values="None, xl_refiner", draw_legend=False, include_lone_images=True)
    plot = xyz.plan(req, settings, checkpoints=checkpoints)
    assert [(c.request.refiner_checkpoint, c.request.refiner_switch_at) for c in plot.cells] == [
        (None, None), (None, None), (names["xl_refiner"], 0.5), (names["xl_refiner"], 0.8)]
    assert xyz.plan(req, XYZSettings(x_type="Refiner checkpoint", x_values="xl_refiner, None", y_type="Seed",
                                     y_values="1, 2"), checkpoints=checkpoints).order == [0, 2, 1, 3]
    result = xyz.run(sd, plot)
    for picture, cell in zip(result.images[1:], plot.cells):
        assert picture.tobytes() == pipeline.generate(sd, cell.request).images[0].tobytes()
    assert parse_infotext(result.infotexts[3])["Refiner switch at"] == "0.5"
    with pytest.raises(ValueError, match="the Y axis \\(Refiner checkpoint\\) value 'xl_refiner': the Refiner "
                                         "checkpoint axis has no models to choose among here"):
        xyz.plan(req, settings)


def test_initial_noise_multiplier_axis_is_img2imgs():
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    req = GenerationRequest("a", steps=2, width=32, height=32, seed=1, init_image=picture, strength=0.5)
    plot = xyz.plan(req, XYZSettings(x_type="Initial noise multiplier", x_values="0.9, 1.1"), "img2img")
    assert [c.request.initial_noise_multiplier for c in plot.cells] == [0.9, 1.1]
    with pytest.raises(ValueError, match="initial_noise_multiplier scales img2img's starting noise: it needs an "
                                         "init image"):
        xyz.plan(req.replace(init_image=None), XYZSettings(x_type="Initial noise multiplier", x_values="0.9"))
