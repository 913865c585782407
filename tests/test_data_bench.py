"""The data benchmark runs end to end (a smoke test: it measures nothing, it must only not break)."""

from __future__ import annotations

import json

from evamim.bench.data import benchmark, make_benchmark_images
from evamim.cli import main


def test_benchmark_images_and_a_tiny_run(tmp_path, capsys):
    paths = make_benchmark_images(tmp_path / "img", count=4, size=(120, 90))
    assert len({p.read_bytes() for p in paths}) == 4
    result = benchmark(str(tmp_path / "img"), workers=[0], batches=2, batch_size=3, image_size=32, repeats=2, pipelines=["ours", "ours-float", "baseline"])
    rows = {row["pipeline"]: row for row in result["results"]}
    assert set(rows) == {"ours", "ours-float", "baseline"} and all(row["images_per_s"] > 0 and len(row["runs_s"]) == 2 for row in rows.values())
    assert result["environment"]["torch"] and result["images"]["first_size"] == "120x90"
    assert main(["bench", "data", "--source", str(tmp_path / "img"), "--workers", "0", "--batches", "1", "--batch-size", "2",
                 "--image-size", "32", "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 2


def test_gpu_decode_refuses_in_one_line_without_cuda(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu-decode may run")
    make_benchmark_images(tmp_path / "img", count=2, size=(64, 48))
    code = main(["bench", "data", "--source", str(tmp_path / "img"), "--pipelines", "gpu-decode", "baseline"])
    out = capsys.readouterr().out
    assert code == 2 and out.count("\n") == 1 and "gpu-decode needs a CUDA GPU" in out
    with pytest.raises(ValueError, match="gpu-decode needs a CUDA GPU"):
        benchmark(str(tmp_path / "img"), workers=[0], pipelines=["gpu-decode"])
