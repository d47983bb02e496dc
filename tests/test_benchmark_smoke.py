"""The benchmark scripts still run end to end (tiny iteration counts: this checks them, it measures nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    from . import servers
except ImportError:
    import servers  # type: ignore[no-redef]

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 240) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def test_serializers_benchmark_writes_its_tables_chart_and_figures(tmp_path):
    (tmp_path / "performance.md").write_text("# Performance\n\nHand-written notes stay.\n")
    stdout = run_script("serializers.py", "--quick", "--out-dir", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert "ratio to kombu json" in stdout
    figures = json.loads((tmp_path / "r.json").read_text())
    for size in ("200", "1024"):
        assert figures["systems"]["envelope"][size]["encode_us"] > 0
        assert figures["ratios_envelope_to_json"][size]["decode"] > 0
        overhead = figures["envelope_overhead"][size]
        assert overhead["added"] <= overhead["wrapped"] + 40
    doc = (tmp_path / "performance.md").read_text()
    assert "Hand-written notes stay." in doc
    assert doc.count("<!-- BEGIN GENERATED: serializers -->") == 1
    assert "| envelope |" in doc
    assert (tmp_path / "performance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run replaces its section instead of appending another.
    run_script("serializers.py", "--quick", "--sizes", "200", "--out-dir", str(tmp_path))
    assert (tmp_path / "performance.md").read_text().count("<!-- BEGIN GENERATED: serializers -->") == 1


def test_end_to_end_benchmark_runs_tasks_through_redis_and_prefork_workers(tmp_path, redis_server_url):
    stdout = run_script(
        "end_to_end.py",
        "--tasks", "20",
        "--rounds", "1",
        "--concurrency", "1",
        "--redis-url", redis_server_url,
        "--db", str(servers.redis_test_db()),
        "--out-dir", str(tmp_path),
    )
    assert "envelope / json:" in stdout
    doc = (tmp_path / "performance.md").read_text()
    assert "<!-- BEGIN GENERATED: end_to_end -->" in doc
    assert "| envelope |" in doc
