"""A batch on a Ray instance started here (two one-CPU actors on loopback): the same pictures as a local run,
nothing lost when an actor is killed mid-batch, and a rerun that does no work."""

import shutil
import tempfile
from pathlib import Path

import pytest

import plainsd
from plainsd.batch import run_batch

from .conftest import manifest, pictures

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A Ray instance for this module only; its workers import this plainsd (its source folder on their path)."""
    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # (short: Ray's socket paths must stay under ~100 bytes)
    source = str(Path(plainsd.__file__).parents[1])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=100 * 2**20,
             logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": source}})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_run(model_file, tmp_path_factory):
    """The eight requests drawn in this process with one thread: what every other run must equal, byte for byte."""
    import torch

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("local") / "out"
    requests = _requests(tmp_path_factory.mktemp("requests"))
    run_batch(requests, out, model=model_file, precision="fp32", threads=1, progress=False)
    torch.set_num_threads(before)
    return out


def _requests(folder):
    from .conftest import write_requests
    return write_requests(folder / "requests.jsonl")


def test_two_actors_draw_what_a_local_run_draws_and_a_rerun_does_nothing(cluster, model_file, local_run, tmp_path):
    out = tmp_path / "out"
    requests = _requests(tmp_path)
    summary = run_batch(requests, out, model=model_file, precision="fp32", ray="auto", workers=2, threads=1,
                        progress=False)
    assert (summary.drawn, summary.pictures, summary.failed, summary.resent) == (8, 9, [], 0)
    assert pictures(out) == pictures(local_run) and len(pictures(out)) == 9
    assert sorted(e["key"] for e in manifest(out)) == sorted(e["key"] for e in manifest(local_run))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    text = (out / "manifest.jsonl").read_bytes()
    summary = run_batch(requests, out, model=model_file, precision="fp32", ray="auto", workers=2, threads=1,
                        progress=False)
    assert (summary.drawn, summary.skipped) == (0, 8)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "manifest.jsonl").read_bytes() == text


def test_an_actor_killed_mid_batch_loses_nothing(cluster, model_file, local_run, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_first_actor(entry):
        """After the second request is written, kill slot 0's actor from outside (as a lost machine would)."""
        if len(manifest(out)) == 2 and not killed:
            [name] = [n for n in ray.util.list_named_actors() if n.startswith("plainsd-batch-") and n.endswith("-0.0")]
            ray.kill(ray.get_actor(name))
            killed.append(name)

    summary = run_batch(_requests(tmp_path), out, model=model_file, precision="fp32", ray="auto", workers=2,
                        threads=1, progress=False, on_drawn=kill_first_actor)
    assert killed and summary.resent >= 1  # the kill took jobs with it, and they were sent again
    assert (summary.drawn, summary.pictures, summary.failed) == (8, 9, [])
    assert pictures(out) == pictures(local_run)
    assert sorted(e["line"] for e in manifest(out)) == list(range(1, 9))  # each request once
