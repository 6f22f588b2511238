"""tools/gpu_check.py --dry-run: every section runs on CPU at toy sizes and the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_writes_all_sections(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for key in ("kernels", "train", "tests", "device", "date", "dry_run"):
        assert key in report, key
    assert report["dry_run"] is True
    assert "returncode" in report["tests"] and "skipped" in report["tests"], report["tests"]
    assert report["kernels"].get("cpu_smoke", {}).get("ok") is True, report["kernels"]
    rows = report["train"]["rows"]
    by_trainer = {r["trainer"]: r for r in rows}
    assert set(by_trainer) == {"engine", "transformers"}, rows
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["steps_timed"] == 2 and r["peak_mem_mib"] > 0
    assert set(by_trainer["engine"]["phase_ms"]) == {"pack", "vit_fwd", "llm_fwd", "loss_fwd", "backward", "optimizer"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## tests" in md and "## kernels" in md and "## train" in md
