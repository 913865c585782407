"""The data benchmark runs end to end (a smoke test: it measures nothing, it must only not break)."""

from __future__ import annotations

import json

from evamim.bench.data import benchmark, make_benchmark_images
from evamim.cli import main


def test_benchmark_images_and_a_tiny_run(tmp_path, capsys):
    paths = make_benchmark_images(tmp_path / "img", count=4, size=(120, 90))
    assert len({p.read_bytes() for p in paths}) == 4
    result = benchmark(str(tmp_path / "img"), workers=[0], batches=2, batch_size=3, image_size=32, repeats=2, pipelines=["ours", "baseline"])
    rows = {row["pipeline"]: row for row in result["results"]}
    assert set(rows) == {"ours", "baseline"} and all(row["images_per_s"] > 0 and len(row["runs_s"]) == 2 for row in rows.values())
    assert result["environment"]["torch"] and result["images"]["first_size"] == "120x90"
    assert main(["bench", "data", "--source", str(tmp_path / "img"), "--workers", "0", "--batches", "1", "--batch-size", "2",
                 "--image-size", "32", "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 2
