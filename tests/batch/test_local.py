"""A batch drawn in this process and in worker processes: the same pictures as the pipeline draws, the
manifest, resuming, and a rerun that does nothing."""

import json

import pytest

import plainsd
from plainsd import pipeline, runtime
from plainsd.batch import run_batch
from plainsd.batch.jobs import model_sha256
from plainsd.cli import main
from plainsd.pnginfo import read_parameters, save_png
from plainsd.request import GenerationRequest

from .conftest import LINES, manifest, pictures, write_requests


def _direct(model_file, tmp_path) -> dict:
    """The eight requests drawn by plain pipeline calls (GenerationRequests written by hand) and saved as the
    command line saves pictures: name -> PNG bytes, named as the batch names them (line order)."""
    sd = plainsd.load(model_file)
    sd.hash = model_sha256(model_file)[:10]
    engine = runtime.prepare(sd)
    out = {}
    for number, line in enumerate(LINES, 1):
        request = GenerationRequest(prompt=line["prompt"], negative_prompt=line.get("negative_prompt", ""),
                                    steps=line["steps"], sampler=line["sampler_name"],
                                    schedule=line.get("scheduler", "automatic"), cfg_scale=line.get("cfg_scale", 7.0),
                                    seed=line["seed"], width=64, height=64, batch_size=line.get("batch_size", 1))
        result = pipeline.generate(engine, request)
        for i, (image, text) in enumerate(zip(result.images, result.infotexts)):
            path = save_png(image, tmp_path / f"{number}-{i}.png", text)
            out[(number, i)] = path.read_bytes()
    return out


def test_the_batch_draws_what_the_pipeline_draws(model_file, requests_file, tmp_path, one_thread):
    out = tmp_path / "out"
    summary = run_batch(requests_file, out, model=model_file, precision="fp32", threads=1, progress=False)
    assert (summary.requests, summary.drawn, summary.pictures, summary.failed) == (8, 8, 9, [])
    entries = manifest(out)
    assert [e["line"] for e in entries] == list(range(1, 9)) and len({e["key"] for e in entries}) == 8
    direct = _direct(model_file, tmp_path)
    for entry in entries:
        assert entry["seeds"] == [LINES[entry["line"] - 1]["seed"] + i for i in range(len(entry["files"]))]
        for i, (name, text) in enumerate(zip(entry["files"], entry["infotexts"])):
            data = (out / name).read_bytes()
            assert data == direct[(entry["line"], i)], name  # byte for byte, the parameters chunk included
            assert read_parameters(out / name) == text
            assert f"Seed: {entry['seeds'][i]}," in text and "Model hash: " in text
    assert sorted(pictures(out)) == sorted(name for e in entries for name in e["files"])


def test_a_rerun_does_no_work_and_a_stopped_batch_goes_on(model_file, requests_file, tmp_path, one_thread):
    out = tmp_path / "out"
    run_batch(requests_file, out, model=model_file, precision="fp32", threads=1, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    text, drawn = (out / "manifest.jsonl").read_bytes(), pictures(out)
    summary = run_batch(requests_file, out, model=model_file, precision="fp32", threads=1, progress=False)
    assert (summary.skipped, summary.drawn) == (8, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "manifest.jsonl").read_bytes() == text

    # as if stopped: the last manifest line (line 8's) half written, and line 3's picture never renamed into place
    entries = manifest(out)
    lines = text.decode().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])
    (out / entries[2]["files"][0]).unlink()
    redrawn = {entries[2]["files"][0], entries[7]["files"][0]}
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name not in redrawn}
    summary = run_batch(requests_file, out, model=model_file, precision="fp32", threads=1, progress=False)
    assert summary.drawn == 2 and summary.skipped == 6  # lines 3 and 8 again, nothing else
    assert pictures(out) == drawn
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name not in redrawn} == kept
    after = (out / "manifest.jsonl").read_text().splitlines()
    assert after[:8] == [line.rstrip("\n") for line in lines[:-1]] + [lines[-1][:40]]  # the torn line ended
    assert [json.loads(line)["line"] for line in after[8:]] == [3, 8]


def test_a_line_the_pipeline_refuses_is_reported_and_tried_again(model_file, tmp_path, capsys, one_thread):
    requests = write_requests(tmp_path / "r.jsonl", [LINES[0], {**LINES[1], "tiny_decoder": True}, LINES[2]])
    out = tmp_path / "out"
    args = ["batch", str(requests), "-o", str(out), "--model", str(model_file), "--precision", "fp32",
            "--threads", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 2: this model has no tiny decoder" in err and "1 request(s) could not be drawn" in err
    assert [e["line"] for e in manifest(out)] == [1, 3]
    assert main(args) == 2  # the rerun tries line 2 alone again
    assert [e["line"] for e in manifest(out)] == [1, 3]
    assert "0 skipped" not in capsys.readouterr().out


@pytest.mark.slow
def test_two_worker_processes_draw_the_same_pictures(model_file, requests_file, tmp_path, capsys, one_thread):
    here, there = tmp_path / "here", tmp_path / "there"
    run_batch(requests_file, here, model=model_file, precision="fp32", threads=1, progress=False)
    args = ["batch", str(requests_file), "-o", str(there), "--model", str(model_file), "--precision", "fp32",
            "--workers", "2", "--threads", "1", "--quiet"]
    assert main(args) == 0
    assert "drew 8 request(s), 9 picture(s)" in capsys.readouterr().out
    assert pictures(there) == pictures(here) and len(pictures(here)) == 9
    assert sorted(e["key"] for e in manifest(there)) == sorted(e["key"] for e in manifest(here))
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
