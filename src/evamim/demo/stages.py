"""Run the demo's stages in this process through the same task functions as the CLI, reusing finished ones.

A stage is finished when its directory holds ``demo-stage.json`` written for the same overrides; then it is not
run again. An interrupted stage is simply run again: its run resumes from its newest checkpoint (training) or
reuses its cached features (probes), as any evamim run does. A stage whose directory holds a finished run with
other overrides (an older demo) starts over in an emptied directory: its checkpoints are another run's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from evamim import atomic
from evamim.demo.plan import Stage
from evamim.tasks.runner import json_default

MARKER = "demo-stage.json"
# command -> (module, config class, run function): the same pairs the CLI commands run.
TASKS = {
    "clip": ("evamim.tasks.clip", "ClipTrainConfig", "run_clip"),
    "pretrain": ("evamim.tasks.pretrain", "PretrainConfig", "run_pretrain"),
    "knn": ("evamim.tasks.knn", "KnnConfig", "run_knn"),
    "linprobe": ("evamim.tasks.linear_probe", "LinearProbeConfig", "run_linear_probe"),
    "detect": ("evamim.tasks.detection", "DetectConfig", "run_detection"),
}


def finished(stage: Stage) -> dict[str, Any] | None:
    """The record of a finished run of exactly this stage, or None."""
    path = stage.directory / MARKER
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("overrides") == list(stage.overrides) else None


def run_stage(stage: Stage, log_file: Path) -> dict[str, Any]:
    """Run (or reuse) one stage; returns ``{"overrides", "seconds", "result", "reused"}``. The task's own
    console output (tables, INFO lines) goes to ``log_file``; progress bars stay on the terminal."""
    record = finished(stage)
    if record is not None:
        return {**record, "reused": True}
    if (stage.directory / MARKER).exists():  # finished with other settings: nothing in it is this stage's
        shutil.rmtree(stage.directory)
    from evamim.config import load_config

    module_name, config_name, function_name = TASKS[stage.command]
    module = importlib.import_module(module_name)
    config = load_config(getattr(module, config_name), None, list(stage.overrides))
    run: Callable[[Any], Any] = getattr(module, function_name)
    start = time.perf_counter()
    with open(log_file, "a") as log, contextlib.redirect_stdout(log), _logging_to(log):
        print(f"==== {stage.name}: evamim {stage.command} {' '.join(stage.overrides)}", flush=True)
        result = run(config)
    # Through JSON and back, so that a fresh record is the same as one read from demo-stage.json later.
    as_json = json.loads(json.dumps(result, default=json_default))
    record = {"overrides": list(stage.overrides), "seconds": round(time.perf_counter() - start, 1), "result": as_json}
    stage.directory.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stage.directory / MARKER, record)
    return {**record, "reused": False}


@contextlib.contextmanager
def _logging_to(stream):
    """INFO and up of every evamim logger into ``stream`` for the duration; the console keeps WARNING and up."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def headline(stage: Stage, result: dict[str, Any]) -> str:
    """One line on what a stage reached."""
    result = result or {}
    if stage.command == "clip":
        validation = result.get("validation") or {}
        top1 = validation.get("zeroshot_top1")
        return f"zero-shot top-1 {top1:.1f}%" if top1 is not None else "trained"
    if stage.command == "pretrain":
        return f"{result.get('steps', '?')} steps"
    if stage.command == "detect":
        box, mask = result.get("bbox_AP"), result.get("segm_AP")
        return f"box AP {box:.1f}, mask AP {mask:.1f}" if box is not None and mask is not None else "trained"
    best = result.get("best") or {}
    if "top1" in best:
        return f"top-1 {best['top1']:.1f}% ({best.get('features', '?')})"
    return "done"
