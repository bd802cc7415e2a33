"""The registry of A1111 scripts: names as A1111 matches them, per tab, and a new script as one entry."""

import pytest

from plainsd import scripts
from plainsd.request import GenerationRequest


def test_names_match_as_a1111_matches_them():
    assert scripts.names("txt2img") == ["x/y/z plot"]
    assert scripts.names("img2img") == ["x/y/z plot", "poor man's outpainting", "sd upscale"]  # img2img only, as in A1111
    assert scripts.find("X/Y/Z Plot", "img2img") is scripts.SCRIPTS["x/y/z plot"]
    with pytest.raises(ValueError, match=r"unknown script 'loopback' for img2img; plainsd runs 'x/y/z plot', \"poor man's outpainting\", 'sd upscale'"):
        scripts.find("loopback", "img2img")


def test_a_script_is_one_entry(monkeypatch):
    calls = []
    entry = scripts.Script("loopback", ("img2img",), lambda kind: [scripts.ScriptArg("Loops", 4, 1, 32, 1)],
                           prepare=lambda request, args, kind, context: (request, args),
                           run=lambda engine, plan, context, **controls: calls.append((engine, plan, controls)))
    monkeypatch.setitem(scripts.SCRIPTS, entry.name, entry)
    assert scripts.names("img2img") == ["x/y/z plot", "poor man's outpainting", "sd upscale", "loopback"] and scripts.names("txt2img") == ["x/y/z plot"]
    request = GenerationRequest("a")
    prepared = scripts.prepare("Loopback", "img2img", request, [2])
    prepared("engine", interrupt=None)
    assert calls == [("engine", (request, [2]), {"interrupt": None})]
    assert scripts.script_info()[-1] == {"name": "loopback", "is_alwayson": False, "is_img2img": True, "args": [
        {"label": "Loops", "value": 4, "minimum": 1, "maximum": 32, "step": 1, "choices": None}]}
    with pytest.raises(ValueError, match="unknown script 'loopback' for txt2img"):
        scripts.prepare("loopback", "txt2img", request, [])
