"""Checkpoint files: atomic writes, keep-last-k, discovery of the newest good one, RNG state."""

import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from evamim.engine.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    ShardedCheckpointer,
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_shard_index,
    restore_rng_state,
    save_checkpoint,
)
from test_engine_toys import make_trainer


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4, 4), value)}, "config": {"lr": value, "betas": (0.9, 0.98)}}


def _steps(directory):
    return [step for step, _ in list_checkpoints(directory)]


def test_roundtrip_with_weights_only(tmp_path):
    state = _state(1.5) | {"rng": capture_rng_state()}
    path = save_checkpoint(state, tmp_path, step=7, keep_last=3)
    assert path.name == "step-000000007.pt"
    loaded = torch.load(path, weights_only=True)  # plain types and tensors only
    assert loaded["step"] == 7 and loaded["config"] == {"lr": 1.5, "betas": (0.9, 0.98)}
    assert torch.equal(load_checkpoint(path)["model"]["w"], state["model"]["w"])


def test_rejects_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\.data\.order is a numpy\.ndarray"):
        save_checkpoint({"data": {"order": np.arange(3)}}, tmp_path, step=1, keep_last=1)
    with pytest.raises(TypeError, match=r"checkpoint\.config\.lr is a numpy\.float64"):
        save_checkpoint({"config": {"lr": np.float64(0.1)}}, tmp_path, step=1, keep_last=1)
    assert not any(tmp_path.iterdir())


def test_trainer_checks_config_before_training(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.config = {"optim": {"lr": np.float32(1e-3)}}
    with pytest.raises(TypeError, match=r"config\.optim\.lr is a numpy\.float32"):
        trainer.train()
    assert trainer.step == 0


def test_keep_last_deletes_only_older_ones(tmp_path):
    for step in range(1, 6):
        save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert _steps(tmp_path) == [4, 5]
    # A higher-step checkpoint from an abandoned run is not counted against, nor is the new one deleted.
    save_checkpoint(_state(9), tmp_path, 9, keep_last=1)
    save_checkpoint(_state(6), tmp_path, 6, keep_last=1)
    assert _steps(tmp_path) == [6, 9]


def test_rng_state_roundtrip():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1.0), tmp_path, 1, keep_last=1)

    def write_half_then_fail(obj, handle):
        handle.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_state(2.0), tmp_path, 2, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001.pt"]  # temp file removed
    path, state = find_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and state["model"]["w"][0, 0] == 1.0


def test_process_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import io, os, signal, torch
        from evamim.engine.checkpoint import save_checkpoint
        directory = {str(tmp_path)!r}
        save_checkpoint({{"model": {{"w": torch.ones(8)}}}}, directory, 1, keep_last=1)
        real_save = torch.save
        def save_and_die(obj, handle):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_and_die
        save_checkpoint({{"model": {{"w": torch.zeros(1 << 20)}}}}, directory, 2, keep_last=1)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-000000002.")
    path, state = find_latest_checkpoint(tmp_path)
    assert path.name == "step-000000001.pt" and torch.equal(state["model"]["w"], torch.ones(8))
    save_checkpoint(_state(3.0), tmp_path, 3, keep_last=1)  # the next save clears the torn temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000003.pt"]


def test_truncated_latest_is_reported_and_previous_used(tmp_path, caplog):
    save_checkpoint(_state(1.0), tmp_path, 1, keep_last=3)
    latest = save_checkpoint(_state(2.0), tmp_path, 2, keep_last=3)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="evamim.engine.checkpoint"):
        path, state = find_latest_checkpoint(tmp_path)
    assert path.name == "step-000000001.pt" and state["step"] == 1
    assert "step-000000002.pt" in caplog.text and "does not load" in caplog.text
    with pytest.raises(CheckpointError, match="step-000000002.pt"):
        load_checkpoint(latest)


def test_all_checkpoints_corrupt_is_an_error(tmp_path):
    (tmp_path / "step-000000004.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        find_latest_checkpoint(tmp_path)
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "step-000000001.pt")
    with pytest.raises(CheckpointError, match="not an evamim training checkpoint"):
        load_checkpoint(tmp_path / "step-000000001.pt")


def test_trainer_resumes_from_previous_when_latest_is_truncated(tmp_path, caplog):
    make_trainer(tmp_path, total_steps=4, checkpoint=CheckpointConfig(every=2, keep_last=3)).train()
    latest = tmp_path / "checkpoints" / "step-000000004.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    trainer = make_trainer(tmp_path, total_steps=4, checkpoint=CheckpointConfig(every=2, keep_last=3))
    with caplog.at_level(logging.WARNING):
        assert trainer.resume().name == "step-000000002.pt"
    assert trainer.step == 2 and "step-000000004.pt" in caplog.text
    result = trainer.train()  # resume() again inside train() is harmless: same checkpoint
    assert result.step == 4 and load_checkpoint(latest)["step"] == 4


def test_resume_modes(tmp_path):
    make_trainer(tmp_path, total_steps=2).train()
    with pytest.raises(FileExistsError, match="resume=never"):
        make_trainer(tmp_path, total_steps=2, checkpoint=CheckpointConfig(resume="never")).train()
    explicit = make_trainer(tmp_path / "other", total_steps=4,
                            checkpoint=CheckpointConfig(resume=str(tmp_path / "checkpoints" / "step-000000002.pt")))
    explicit.resume()
    assert explicit.step == 2


def test_file_permissions_follow_umask(tmp_path):
    path = save_checkpoint(_state(1.0), tmp_path, 1, keep_last=1)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("values, message", [
    ({"every": -1}, "checkpoint.every must be >= 0"),
    ({"keep_last": 0}, "checkpoint.keep_last must be >= 1"),
    ({"resume": ""}, "checkpoint.resume must be"),
])
def test_bad_checkpoint_settings_are_refused_when_the_config_is_built(values, message):
    with pytest.raises(ValueError, match=message):
        CheckpointConfig(**values)


# ------------------------------------------------------------------------------------------- integrity


def _flip_a_tensor_byte(path) -> None:
    """Flip one byte inside the first tensor record of a torch.save archive: the zip stays readable."""
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 8)
    data = bytearray(path.read_bytes())
    header = record.header_offset
    name_length, extra_length = (int.from_bytes(data[header + at:header + at + 2], "little") for at in (26, 28))
    data[header + 30 + name_length + extra_length + record.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_and_the_previous_checkpoint_used(tmp_path, caplog):
    make_trainer(tmp_path, total_steps=4, checkpoint=CheckpointConfig(every=2, keep_last=3)).train()
    latest = tmp_path / "checkpoints" / "step-000000004.pt"
    _flip_a_tensor_byte(latest)
    assert torch.load(latest, weights_only=True)["step"] == 4  # torch alone would load it silently
    with pytest.raises(CheckpointError, match="corrupt: the bytes of .* do not match the checksum"):
        load_checkpoint(latest)
    trainer = make_trainer(tmp_path, total_steps=4, checkpoint=CheckpointConfig(every=2, keep_last=3))
    with caplog.at_level(logging.WARNING):
        assert trainer.resume().name == "step-000000002.pt"
    assert "step-000000004.pt" in caplog.text and "corrupt" in caplog.text


def test_checkpoints_carry_checksums_even_when_torch_is_told_not_to_write_them(tmp_path):
    torch.serialization.set_crc32_options(False)
    try:
        path = save_checkpoint(_state(1.0), tmp_path, 1, keep_last=1)
    finally:
        torch.serialization.set_crc32_options(True)
    _flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def _sharded_trainer(out_dir, **kwargs):
    trainer = make_trainer(out_dir, total_steps=4, checkpoint=CheckpointConfig(every=2, keep_last=3), **kwargs)
    trainer.checkpointer = ShardedCheckpointer(trainer.model, trainer.optimizer)
    return trainer


def test_a_corrupt_shard_is_caught_and_the_previous_sharded_checkpoint_used(tmp_path, caplog):
    _sharded_trainer(tmp_path).train()
    shard = next((tmp_path / "checkpoints" / "step-000000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    trainer = _sharded_trainer(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume().name == "step-000000002"
    assert f"the bytes of {shard.name} do not match the checksum" in caplog.text


def _plant_index(checkpoint_dir, payload) -> None:
    with open(checkpoint_dir / ".metadata", "wb") as handle:
        pickle.dump(payload, handle)


class _RunsCode:
    """A pickle that would create a file when unpickled by pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_shard_index_is_refused_without_running_its_code(tmp_path, caplog):
    _sharded_trainer(tmp_path).train()
    marker = tmp_path / "code-ran"
    _plant_index(tmp_path / "checkpoints" / "step-000000004", _RunsCode(marker))
    with pytest.raises(CheckpointError, match="refused the shard index .*references io.open"):
        read_shard_index(tmp_path / "checkpoints" / "step-000000004")
    trainer = _sharded_trainer(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume().name == "step-000000002"
    assert not marker.exists()


def test_a_shard_index_declaring_non_tensor_entries_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    _sharded_trainer(tmp_path).train()
    directory = tmp_path / "checkpoints" / "step-000000004"
    metadata = read_shard_index(directory)
    key = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[key] = BytesStorageMetadata()  # would be read with torch.load(weights_only=False)
    _plant_index(directory, metadata)
    with pytest.raises(CheckpointError, match="refused the shard index .*BytesStorageMetadata"):
        read_shard_index(directory)


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    """A run pointed at an output_dir that holds another architecture's checkpoints: one line saying so and
    what to do, not torch's list of size mismatches."""
    from evamim.engine.checkpoint import CheckpointError
    from evamim.engine.checkpoint.file import FileCheckpointer

    def parts(width):
        module = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 2))
        return module, torch.optim.AdamW(module.parameters())

    FileCheckpointer(*parts(8)).save(tmp_path, 10, keep_last=2, extra={})
    with pytest.raises(CheckpointError) as error:
        FileCheckpointer(*parts(16)).load_latest(tmp_path)
    message = str(error.value)
    assert "step-000000010.pt was written for another model (size mismatch for 0.weight" in message
    assert "and 2 more" in message and "choose a new output_dir, or checkpoint.resume=never" in message
    assert "\n" not in message
