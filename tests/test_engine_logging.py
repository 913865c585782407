"""metrics.jsonl, TensorBoard events and the metric averaging."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evamim.engine import CheckpointConfig, Hook
from evamim.engine.logging import MetricAverager, MetricsLogger, drop_records_after
from test_engine_toys import Recorder, make_trainer

TRAIN_KEYS = {"step", "epoch", "lr", "loss", "pred_std", "grad_norm", "img_per_s", "s_per_step",
              "nonfinite_skipped", "time"}


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(out_dir):
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_jsonl_and_tensorboard_have_every_metric(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, hooks=[recorder], total_steps=10, log_every=5, tensorboard=True,
                           progress_bar=True)
    trainer.eval_fn = lambda model: {"acc": 0.5}
    trainer.train()
    records = _records(tmp_path)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    assert all(set(r) == TRAIN_KEYS for r in train)
    # Averaged over the interval, not the last step's value.
    assert train[0]["loss"] == pytest.approx(sum(recorder.losses[:5]) / 5, rel=1e-6)
    assert train[1]["loss"] == pytest.approx(sum(recorder.losses[5:]) / 5, rel=1e-6)
    assert train[0]["img_per_s"] > 0 and train[1]["epoch"] == 2
    assert any(r.get("eval/acc") == 0.5 and r["step"] == 10 for r in records)

    scalars = _scalars(tmp_path)
    for key in TRAIN_KEYS - {"step", "time"}:
        assert [s for s, _ in scalars[f"train/{key}"]] == [5, 10], key
    assert scalars["train/loss"][0][1] == pytest.approx(train[0]["loss"], rel=1e-6)
    assert scalars["eval/acc"] == [(10, 0.5)]


def test_only_the_main_process_writes(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=4, tensorboard=True, trainer_kwargs={"is_main_process": False})
    result = trainer.train()
    assert result.step == 4
    assert list(tmp_path.iterdir()) == []


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    make_trainer(tmp_path, total_steps=8, log_every=2, tensorboard=True).train()
    # Pretend the run died after logging step 8 but before its checkpoint: only step 4's survives.
    (tmp_path / "checkpoints" / "step-000000008.pt").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "loss": 1.0')  # a torn last line
    make_trainer(tmp_path, total_steps=8, log_every=2, tensorboard=True).train()
    assert [r["step"] for r in _records(tmp_path)] == [2, 4, 6, 8]
    assert [s for s, _ in _scalars(tmp_path)["train/loss"]] == [2, 4, 6, 8]


class KilledAtStep(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics, skipped):
        if trainer.step == self.step:
            raise KeyboardInterrupt("killed")


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once_when_rerun(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, hooks=[KilledAtStep(3)], total_steps=6, log_every=1, tensorboard=True,
                     checkpoint=CheckpointConfig(every=100)).train()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    make_trainer(tmp_path, total_steps=6, log_every=1, tensorboard=True).train()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _scalars(tmp_path)["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_metric_averager():
    averager = MetricAverager()
    averager.add({"loss": torch.tensor(1.0), "acc": 0.5})
    averager.add({"loss": torch.tensor(3.0)})
    assert averager.compute() == {"loss": 2.0, "acc": 0.5}
    assert averager.compute() == {}


def test_logger_disabled_is_inert(tmp_path):
    logger = MetricsLogger(tmp_path / "x", is_main_process=False, total_steps=3)
    logger.log(1, {"loss": 1.0})
    logger.advance()
    logger.close()
    assert not (tmp_path / "x").exists()


def test_drop_records_after(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    drop_records_after(path, 2)
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
