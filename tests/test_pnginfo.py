"""The A1111 parameters chunk: written as A1111 writes it, read back, and read from A1111's own text."""

from PIL import Image

from plainsd.pnginfo import infotext, parse_infotext, read_parameters, save_png

A1111_TEXT = """masterpiece, a cat, (detailed:1.2)
Negative prompt: blurry, lowres
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, Version: v1.10.1"""


def test_format_matches_a1111():
    text = infotext("masterpiece, a cat, (detailed:1.2)", "blurry, lowres", **{
        "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1234,
        "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Denoising strength": 0.75,
        "Clip skip": 2, "Version": "v1.10.1"})
    assert text == A1111_TEXT


def test_empty_fields_are_left_out_and_values_quoted():
    text = infotext("p", "", Steps=5, Sampler="Euler a", **{"Model hash": None, "Model": "a, b"})
    assert text == 'p\nSteps: 5, Sampler: Euler a, Model: "a, b"'
    assert parse_infotext(text)["Model"] == "a, b"


def test_parse_a1111_text():
    fields = parse_infotext(A1111_TEXT)
    assert fields["Prompt"] == "masterpiece, a cat, (detailed:1.2)"
    assert fields["Negative prompt"] == "blurry, lowres"
    assert fields["Steps"] == "20" and fields["Schedule type"] == "Karras" and fields["Model hash"] == "6ce0161689"
    assert fields["Clip skip"] == "2" and fields["Size"] == "512x768"


def test_multiline_prompts_and_no_parameters():
    fields = parse_infotext("line one\nline two\nNegative prompt: bad\nworse\nSteps: 3, Sampler: Euler, Seed: 1")
    assert fields["Prompt"] == "line one\nline two" and fields["Negative prompt"] == "bad\nworse"
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"


def test_png_round_trip(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", A1111_TEXT)
    assert read_parameters(path) == A1111_TEXT
    assert not list(tmp_path.glob(".*tmp"))
    save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", None)
    assert read_parameters(tmp_path / "b.png") is None
