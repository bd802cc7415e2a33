"""A1111's styles: the {prompt} placeholder, appending, order, files and folders, and the request's use of them."""

import pytest

import plainsd
from plainsd import pipeline
from plainsd.pnginfo import parse_infotext
from plainsd.request import GenerationRequest, HiresFix
from plainsd.styles import Style, apply_styles, merge_prompts, read_styles

CSV = '''name,prompt,negative_prompt
wrap,"a picture of {prompt}, centred",blurry
shiny, glossy,"dull, {prompt}"
# a comment,ignored,ignored
,no name,ignored
'''


def test_merge_prompts_as_a1111():
    assert merge_prompts("oil painting", "a cat") == "a cat, oil painting"
    assert merge_prompts("  oil painting ", "  a cat ") == "a cat, oil painting"  # both stripped
    assert merge_prompts("oil painting", "") == "oil painting"
    assert merge_prompts("", "a cat") == "a cat"
    assert merge_prompts("best {prompt}, {prompt} again", "cat") == "best cat, cat again"  # every {prompt}


def test_styles_apply_in_order_to_both_prompts(tmp_path):
    (tmp_path / "styles.csv").write_text(CSV, encoding="utf-8-sig")  # A1111 writes a BOM
    styles = read_styles(tmp_path / "styles.csv")
    assert list(styles) == ["wrap", "shiny"]  # the comment row and the nameless row are skipped
    assert styles["shiny"] == Style("shiny", "glossy", "dull, {prompt}")  # skipinitialspace, as A1111
    assert apply_styles(styles, ["wrap", "shiny"], "a cat", "ugly") == (
        "a picture of a cat, centred, glossy", "dull, ugly, blurry")
    assert apply_styles(styles, ["shiny", "wrap"], "a cat", "") == ("a picture of a cat, glossy, centred", "dull,, blurry")
    with pytest.raises(ValueError, match=r"unknown style 'nope'; the styles file has 'wrap', 'shiny'"):
        apply_styles(styles, ["nope"], "x", "")


def test_folders_wildcards_old_columns_and_bad_files(tmp_path):
    (tmp_path / "a.csv").write_text("name,prompt,negative_prompt\nx,from a,\ny,only in a,\n")
    (tmp_path / "b.csv").write_text("name,text\nx,from b\n")  # A1111's oldest layout: name, text
    (tmp_path / "notes.txt").write_text("name,prompt\nz,not a csv file\n")
    styles = read_styles(tmp_path)
    assert styles["x"] == Style("x", "from b", "") and styles["y"].prompt == "only in a" and "z" not in styles
    assert set(read_styles(tmp_path / "a*.csv")) == {"x", "y"}
    (tmp_path / "bad.csv").write_text("title,words\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv is not a styles file: its first line must name the columns"):
        read_styles(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="styles file .*missing.csv does not exist"):
        read_styles(tmp_path / "missing.csv")


def test_request_styles_reach_the_infotext_and_the_hires_prompts(tmp_path):
    (tmp_path / "styles.csv").write_text(CSV)
    req = GenerationRequest("a cat", "ugly", styles=["wrap"], styles_file=str(tmp_path / "styles.csv"))
    styled = req.styled()
    assert (styled.prompt, styled.negative_prompt, styled.styles) == ("a picture of a cat, centred", "ugly, blurry", [])
    assert styled.styled() is styled  # applied once only
    hr = req.replace(hires=HiresFix(prompt="a dog")).styled().hires
    assert (hr.prompt, hr.negative_prompt) == ("a picture of a dog, centred", "ugly, blurry")
    assert req.replace(hires=HiresFix()).styled().hires.prompt is None  # the first pass's (styled) prompt
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        req.replace(styles=["nope"]).check()
    with pytest.raises(ValueError, match="need a styles file"):
        req.replace(styles_file=None).check()
    with pytest.raises(ValueError, match="hypernet"):  # the styled prompt is checked as any prompt
        (tmp_path / "styles.csv").write_text("name,prompt\nh,<hypernet:x:1>\n")
        req.replace(styles=["h"]).check()


def test_a_styled_request_draws_what_the_styled_prompt_draws(tmp_path, tiny):
    (tmp_path / "styles.csv").write_text(CSV)
    common = dict(steps=2, seed=3, width=32, height=32)
    styled = pipeline.generate(tiny, GenerationRequest("a cat", "ugly", styles=["wrap"],
                                                       styles_file=str(tmp_path / "styles.csv"), **common))
    plain = pipeline.generate(tiny, GenerationRequest("a picture of a cat, centred", "ugly, blurry", **common))
    other = pipeline.generate(tiny, GenerationRequest("a cat", "ugly", **common))
    assert styled.images[0].tobytes() == plain.images[0].tobytes() != other.images[0].tobytes()
    fields = parse_infotext(styled.infotexts[0])
    assert fields["Prompt"] == "a picture of a cat, centred" and fields["Negative prompt"] == "ugly, blurry"


def test_cli_styles_from_a_file_a_folder_or_styles_csv_here(tmp_path, monkeypatch, capsys):
    from plainsd.cli import main
    from plainsd.pnginfo import read_parameters

    monkeypatch.chdir(tmp_path)
    (tmp_path / "styles.csv").write_text(CSV)
    common = ["--steps", "1", "--width", "32", "--height", "32", "--seed", "1", "--quiet", "--sampler", "Euler"]
    assert main(["txt2img", "a cat", "--style", "wrap", "--style", "shiny", "-o", "a.png", *common]) == 0
    fields = parse_infotext(read_parameters("a.png"))
    assert fields["Prompt"] == "a picture of a cat, centred, glossy" and fields["Negative prompt"] == "dull, blurry"
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.csv").write_text("name,prompt\nsquare,a square\n")
    assert main(["txt2img", "", "--style", "square", "--styles-dir", "more", "-o", "b.png", *common]) == 0
    assert parse_infotext(read_parameters("b.png"))["Prompt"] == "a square"
    assert main(["txt2img", "a", "--style", "nope", "--styles-file", "styles.csv", *common]) == 2
    assert "unknown style 'nope'; the styles file has 'wrap', 'shiny'" in capsys.readouterr().err
