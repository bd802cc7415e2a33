"""A1111's prompt styles: named prompt and negative-prompt texts kept in styles.csv, applied to a request's prompts.

    styles = read_styles("styles.csv")            # or a folder of .csv files, or a wildcard such as "styles/*.csv"
    prompt, negative = apply_styles(styles, ["cinematic"], "a red circle", "blurry")

A file has the columns name, prompt and negative_prompt (A1111's oldest files: name, text). A style's text with
{prompt} in it has the prompt put there; any other text is appended after ", ". Several styles apply in the
order given, each to the result of the one before; the negative prompt likewise with the negative texts.
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path
from typing import NamedTuple


class Style(NamedTuple):
    name: str
    prompt: str
    negative_prompt: str


def merge_prompts(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt, as A1111 does it."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(styles: dict[str, Style], names: list[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order; an unknown name is an error (A1111
    would skip it without a word)."""
    for name in names:
        if name not in styles:
            known = ", ".join(repr(n) for n in styles) or "none"
            raise ValueError(f"unknown style {name!r}; the styles file has {known}")
        prompt = merge_prompts(styles[name].prompt, prompt)
        negative_prompt = merge_prompts(styles[name].negative_prompt, negative_prompt)
    return prompt, negative_prompt


def style_files(path: str | Path) -> list[Path]:
    """The csv files a path names: the file itself, a folder's *.csv files by name, or a wildcard's matches."""
    text = str(path)
    if any(c in Path(text).name for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
    path = Path(text)
    if path.is_dir():
        return sorted(p for p in path.glob("*.csv") if p.is_file())
    if not path.is_file():
        raise ValueError(f"styles file {path} does not exist")
    return [path]


def read_styles(path: str | Path) -> dict[str, Style]:
    """All styles of the files a path names (style_files); a later file's style replaces an earlier one's of the
    same name. Rows without a name and rows whose name starts with # are skipped, as in A1111."""
    styles: dict[str, Style] = {}
    for file in style_files(path):
        styles.update(_read_file(file))
    return styles


def _read_file(path: Path) -> dict[str, Style]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "name" not in columns or not {"prompt", "text"} & set(columns):
                raise ValueError(f"{path} is not a styles file: its first line must name the columns name, prompt "
                                 f"and negative_prompt, got {', '.join(columns) or 'nothing'}")
            reader.fieldnames = columns
            styles = {}
            for row in reader:
                name = (row.get("name") or "").strip()
                if not name or name.startswith("#"):
                    continue
                text = row["prompt"] if "prompt" in row else row["text"]
                styles[name] = Style(name, text or "", row.get("negative_prompt") or "")
            return styles
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable styles file: {e}") from None
