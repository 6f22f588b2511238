"""tools/bench_data.py: runs on a tiny synthetic set, reports each rank's share; bad arguments fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from tools.make_synthetic_data import generate

    out = tmp_path_factory.mktemp("benchdata")
    generate(str(out), num_samples=64, seed=0)
    return str(out)


def bench(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_data.py"), "--config", CONFIG, *args],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("world,rank,extra", [(1, 0, []), (4, 1, ["parallel.llm.tp=2"])])
def test_reports_each_worker_count_and_this_ranks_share(data, tmp_path, world, rank, extra):
    proc = bench(["--world", str(world), "--rank", str(rank), *tiny_overrides(data, str(tmp_path)), *extra,
                  "--steps", "2", "--rounds", "2", "--workers", "0", "1", "--json"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert (res["world"], res["rank"], res["steps"]) == (world, rank, 2)
    assert res["index_seconds"] >= 0 and res["step_time"] > 0 and "cost model" in res["step_time_source"]
    assert [r["workers"] for r in res["runs"]] == [0, 1] and set(res["speedup"]) == {"0", "1"}
    assert res["rounds"] == 2 and all(len(r["rounds"]) == 2 for r in res["runs"])
    counts = {(r["samples_tokenised"], r["images_decoded"], r["tiles_decoded"]) for r in res["runs"]}
    assert len(counts) == 1, res["runs"]  # loading is deterministic, whatever the worker count
    for r in res["runs"]:
        assert r["samples_per_s"] > 0 and r["tiles_per_s"] > 0
        assert r["loader_seconds_max"] >= r["loader_seconds_mean"] > 0
        for key in ("samples", "images", "tiles"):
            if world == 1:
                assert r["share"][key] == 1.0
            else:
                assert 0 < r["share"][key] < 1


def test_step_time_option_and_table(data, tmp_path):
    proc = bench([*tiny_overrides(data, str(tmp_path)), "--steps", "1", "--rounds", "1", "--workers", "0",
                  "--step-time", "2.5"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step time: 2.5 s (--step-time)" in proc.stdout and "| workers |" in proc.stdout


def test_bad_arguments_exit_non_zero_with_a_message(data, tmp_path):
    proc = bench(["--world", "4", "--rank", "4", *tiny_overrides(data, str(tmp_path)), "--steps", "1"])
    assert proc.returncode != 0 and "--rank" in proc.stderr, proc.stderr
    proc = bench(["--world", "3", *tiny_overrides(data, str(tmp_path)), "parallel.llm.tp=2", "--steps", "1"])
    assert proc.returncode != 0 and "world size 3" in proc.stderr, proc.stderr
