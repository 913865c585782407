"""Console progress of the loop: plain lines without a terminal, the tqdm bar with one, one line per evaluation."""

import json
import logging
import math
import re

from evamim.engine import progress
from evamim.engine.progress import Progress, format_duration, format_eval_line, format_number, format_progress_line
from test_engine_toys import make_trainer

LINE = re.compile(r"^step (\d+)/(\d+) \((\d+\.\d)%\)  epoch (\d+)  loss (\S+)  lr (\S+)  img/s (\d+\.\d)  "
                  r"ETA (\d+:\d\d:\d\d)$")


def _progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "evamim.engine.progress"]


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_without_a_terminal_a_line_every_log_every_steps(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="evamim.engine"):
        make_trainer(tmp_path, total_steps=7, log_every=3, progress_bar=True).train()
    lines = _progress_lines(caplog)
    # Every log_every steps, and at the last step.
    assert [int(LINE.match(line).group(1)) for line in lines] == [3, 6, 7], lines
    records = {r["step"]: r for r in _records(tmp_path) if "loss" in r}
    for line in lines:
        step, total, percent, epoch, loss, lr, img_per_s, eta = LINE.match(line).groups()
        record = records[int(step)]
        assert int(total) == 7 and percent == f"{100 * int(step) / 7:.1f}"
        assert int(epoch) == record["epoch"]
        assert loss == f"{record['loss']:.4g}" and lr == f"{record['lr']:.2e}"
        assert float(img_per_s) > 0
    assert lines[-1].endswith("ETA 0:00:00")  # nothing left at the last step


def test_no_lines_without_progress_or_on_other_processes(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="evamim.engine"):
        make_trainer(tmp_path / "off", total_steps=4, progress_bar=False).train()
        make_trainer(tmp_path / "rank1", total_steps=4, progress_bar=True,
                     trainer_kwargs={"is_main_process": False}).train()
    assert _progress_lines(caplog) == []


def test_with_a_terminal_the_bar_and_no_lines(tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="evamim.engine"):
        make_trainer(tmp_path, total_steps=4, log_every=2, progress_bar=True).train()
    assert _progress_lines(caplog) == []
    assert "4/4" in capsys.readouterr().err  # tqdm's bar, drawn on stderr


def test_progress_modes():
    assert Progress(enabled=True, total_steps=3, terminal=False).mode == "lines"
    bar = Progress(enabled=True, total_steps=3, terminal=True)
    assert bar.mode == "bar"
    bar.close()
    assert Progress(enabled=False, total_steps=3, terminal=True).mode is None


def test_evaluation_reaches_the_console_as_one_line(tmp_path, caplog):
    trainer = make_trainer(tmp_path, total_steps=6, eval_every=3)
    trainer.eval_fn = lambda model: {"top1": 81.2, "top5": 95.1, "loss": 0.8123}
    with caplog.at_level(logging.INFO, logger="evamim.engine"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval step")]
    epochs = {r["step"]: r["eval/epoch"] for r in _records(tmp_path) if "eval/top1" in r}
    assert lines == [f"eval step {step} (epoch {epochs[step]}): top1 81.20  top5 95.10  loss 0.8123" for step in (3, 6)]


def test_evaluation_line_only_on_the_main_process(tmp_path, caplog):
    trainer = make_trainer(tmp_path, total_steps=2, trainer_kwargs={"is_main_process": False})
    trainer.eval_fn = lambda model: {"top1": 50.0}
    with caplog.at_level(logging.INFO, logger="evamim.engine"):
        trainer.train()
    assert not [r for r in caplog.records if r.getMessage().startswith("eval step")]


def test_formatting():
    assert format_eval_line(500, {"top1": 81.2, "top5": 95.1, "loss": 0.812}) == \
        "eval step 500: top1 81.20  top5 95.10  loss 0.812"
    assert format_eval_line(5, {}, epoch=1) == "eval step 5 (epoch 1): no metrics"
    assert [format_number(v) for v in (3, 0.000123456, -12.345, math.nan)] == ["3", "0.0001235", "-12.35", "nan"]
    assert format_duration(3723.4) == "1:02:03" and format_duration(2 * 86400 + 5) == "2d 0:00:05"
    assert format_duration(math.nan) == "?"
    # An interval whose steps were all skipped has no loss: the line leaves it out.
    assert format_progress_line(5, 10, {"epoch": 0, "lr": 1e-3, "img_per_s": 12.0}, math.nan) == \
        "step 5/10 (50.0%)  epoch 0  lr 1.00e-03  img/s 12.0  ETA ?"


def test_eta_extrapolates_the_pace_of_this_attempt(monkeypatch, caplog):
    clock = iter([100.0, 110.0, 120.0])  # resumed at step 20 at t=100; 5 steps in 10 s: 2 s per step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    reporter = Progress(enabled=True, total_steps=30, start_step=20, terminal=False)
    with caplog.at_level(logging.INFO, logger="evamim.engine.progress"):
        reporter.report(25, {"loss": 1.0})
        reporter.report(30, {"loss": 1.0})
    assert [line.split("ETA ")[1] for line in _progress_lines(caplog)] == ["0:00:10", "0:00:00"]
