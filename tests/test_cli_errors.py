"""The command line under attack: every user mistake is refused with a short message that names the cause,
exit code 2, before any model, teacher or data loader is built, and without touching what is on disk.

Most cases drive ``evamim.cli.main`` in-process; two run ``python -m evamim`` end to end. The fixture
``nothing_built`` makes building an EvaViT, a teacher or a data loader fail the test, so "refused before
any work" is checked directly, not inferred from timing.
"""

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evamim
from evamim.cli import main
from evamim.config import load_config
from test_pretrain import teacher_dir  # noqa: F401  (pytest fixture)

SLOW = 15.0  # seconds; generous for a loaded 2-core machine: a refusal takes well under one


def pretrain_args(teacher_dir: Path, output_dir: Path, steps: int = 2) -> list[str]:
    return [
        "model.name=eva_tiny_p16",
        "model.options={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        f"teacher.spec=local:{teacher_dir}",
        "masking.min_num_patches=2",
        "data.source=synthetic",
        "data.image_size=32",
        "data.synthetic_resolution=40",
        "data.synthetic_size=32",
        "data.num_workers=0",
        "data.pin_memory=false",
        "optim.warmup_steps=1",
        f"loop.total_steps={steps}",
        "loop.epochs=null",
        "loop.progress_bar=false",
        "loop.tensorboard=false",
        "checkpoint.every=1000",
        "batch_size=8",
        "device=cpu",
        f"output_dir={output_dir}",
    ]


BACKBONE = ["model.name=eva_tiny_p16", "model.options={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
            "device=cpu"]
SYNTHETIC = ["data.source=synthetic", "data.image_size=32"]


def task_args(command: str, output_dir: Path, root: Path) -> list[str]:
    """A config of ``command`` that validates: each case adds one mistake to it."""
    return BACKBONE + [f"output_dir={output_dir}"] + {
        "finetune": SYNTHETIC + ["eval.enabled=false", "loop.epochs=null", "loop.total_steps=4",
                                 "optim.warmup_epochs=0", "optim.warmup_steps=1", "batch_size=8"],
        "segment": [f"data.root={root}", "data.crop_size=32", "data.num_classes=3", "loop.total_steps=4",
                    "optim.warmup_steps=1", "batch_size=4"],
        "linprobe": SYNTHETIC + ["val_data.holdout=0.2"],
        "knn": SYNTHETIC + ["val_data.holdout=0.2"],
        "embed": SYNTHETIC,
    }[command]


@pytest.fixture
def nothing_built(monkeypatch):
    """Building a model, a teacher or a data loader fails the test: every refusal here must come first."""
    from evamim.models.vit import EvaViT

    def forbid(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was built before the mistake was refused")
        return fail

    monkeypatch.setattr(EvaViT, "__init__", forbid("an EvaViT"))
    monkeypatch.setattr("evamim.teachers.factory._build_encoder", forbid("a teacher"))
    monkeypatch.setattr("evamim.data.loader.build_loader", forbid("a data loader"))
    monkeypatch.setattr("evamim.data.segmentation.build_seg_loader", forbid("a data loader"))


def run(argv: list[str], capsys, stream: str = "err") -> tuple[int, str]:
    """Exit code and what the command printed on ``stream`` (every command reports errors on stderr)."""
    start = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert elapsed < SLOW, f"took {elapsed:.1f} s: {captured.out}"
    assert "Traceback" not in captured.out + captured.err
    return code, getattr(captured, stream)


def assert_refused(code: int, out: str, *names: str, exit_code: int = 2, max_lines: int = 3) -> None:
    """Exit code, a short message (``evamim CMD: ...`` plus at most a line or two), every name in it."""
    assert code == exit_code, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, out
    assert lines[0].startswith("evamim "), out
    for name in names:
        assert name in out, f"{name!r} not in {out!r}"


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory``: (mtime_ns, contents)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------- pretrain
PRETRAIN_MISTAKES = {
    # override(s) -> what the message must name
    "warmup epochs > run": (["optim.warmup_steps=null", "optim.warmup_epochs=5", "loop.total_steps=null",
                             "loop.epochs=2"], ["optim.warmup_epochs", "loop.epochs"]),
    "warmup steps > run": (["optim.warmup_steps=50"], ["optim.warmup_steps", "loop.total_steps"]),
    "warmup steps and epochs": (["optim.warmup_epochs=1"], ["optim.warmup_steps", "optim.warmup_epochs"]),
    "negative lr": (["optim.lr=-1e-3"], ["optim.lr"]),
    "negative min_lr": (["optim.min_lr=-1e-6"], ["optim.min_lr"]),
    "negative weight decay": (["optim.weight_decay=-0.05"], ["optim.weight_decay"]),
    "unknown optimizer": (["optim.name=adam"], ["optim.name", "adamw", "lars", "sgd"]),
    "unknown schedule": (["optim.schedule=linear"], ["optim.schedule", "cosine", "poly"]),
    "beta2 of 1": (["optim.betas=[0.9, 1.0]"], ["optim.betas"]),
    "negative beta": (["optim.betas=[-0.1, 0.98]"], ["optim.betas"]),
    "mask ratio 0": (["masking.mask_ratio=0"], ["masking.mask_ratio"]),
    "mask ratio > 1": (["masking.mask_ratio=1.5"], ["masking.mask_ratio"]),
    "mask budget below a block": (["masking.min_num_patches=16"], ["min_num_patches"]),
    "unknown precision": (["loop.precision=fp8"], ["loop.precision", "bf16"]),
    "epochs and total_steps": (["loop.epochs=3"], ["loop.epochs", "loop.total_steps"]),
    "no run length": (["loop.total_steps=null"], ["loop.total_steps", "loop.epochs"]),
    "zero total steps": (["loop.total_steps=0"], ["loop.total_steps"]),
    "negative checkpoint.every": (["checkpoint.every=-1"], ["checkpoint.every"]),
    "keep no checkpoint": (["checkpoint.keep_last=0"], ["checkpoint.keep_last"]),
    "teacher option typo": (["teacher.options={layr: 1}"], ["layr", "'layer'"]),
    "teacher layer out of range": (["teacher.options={layer: 7}"], ["layer=7"]),
    "teacher spec without backend": (["teacher.spec=ViT-L-14-quickgelu/openai"], ["teacher.spec", "BACKEND:TARGET"]),
    "unknown open_clip model": (["teacher.spec=open_clip:ViT-L-14-quickgel/openai"],
                                ["ViT-L-14-quickgel", "ViT-L-14-quickgelu"]),
    "non-ViT timm teacher": (["teacher.spec=timm:resnet50"], ["resnet50", "not a ViT"]),
    "unknown timm teacher": (["teacher.spec=timm:vit_base_patch16_224x"], ["vit_base_patch16_224"]),
    "resume from a missing file": (["checkpoint.resume=/nowhere/step-000000001.pt"],
                                   ["checkpoint.resume", "/nowhere/step-000000001.pt", "does not exist"]),
    "missing initial weights": (["model.pretrained=/nowhere/model"], ["model.pretrained", "/nowhere/model"]),
    "a path next to the synthetic source": (["data.path=/tmp"], ["data.source=synthetic", "data.path=/tmp"]),
    "a data path that does not exist": (["data.source=auto", "data.path=/nowhere/images"],
                                        ["data.path", "/nowhere/images", "does not exist"]),
    "config key typo": (["optim.lrr=1"], ["optim.lrr", "valid keys under optim"]),
    "wrong type": (["batch_size=abc"], ["batch_size", "abc"]),
    "override without =": (["optim.lr"], ["optim.lr", "key=value"]),
}


@pytest.mark.parametrize("overrides, names", PRETRAIN_MISTAKES.values(), ids=PRETRAIN_MISTAKES.keys())
def test_pretrain_mistakes_are_refused_in_one_line_before_any_work(overrides, names, teacher_dir, tmp_path, capsys,
                                                                 nothing_built):
    output = tmp_path / "run"
    code, out = run(["pretrain", *pretrain_args(teacher_dir, output), *overrides], capsys)
    assert_refused(code, out, *names)
    assert not output.exists()  # nothing half-written


def test_the_pretrain_baseline_is_valid(teacher_dir, tmp_path):
    """The mistakes above are the only thing wrong with their configs."""
    from evamim.tasks.pretrain import PretrainConfig, validate

    validate(load_config(PretrainConfig, None, pretrain_args(teacher_dir, tmp_path / "run")))


# ------------------------------------------------------------------------------- the other commands
@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ade20k")  # validation does not read it


TASK_MISTAKES = [
    ("finetune", ["optim.lr=-1"], ["optim.lr"]),
    ("finetune", ["optim.name=lamb"], ["optim.name", "adamw"]),
    ("finetune", ["loop.precision=half"], ["loop.precision"]),
    ("finetune", ["loop.epochs=10"], ["loop.epochs", "loop.total_steps"]),
    ("finetune", ["optim.warmup_steps=null", "optim.warmup_epochs=20", "loop.total_steps=null", "loop.epochs=10"],
     ["optim.warmup_epochs", "loop.epochs"]),
    ("finetune", ["model.name=eva_tiny_p17"], ["unknown model", "eva_tiny_p17"]),
    ("segment", ["optim.warmup_steps=500"], ["optim.warmup_steps", "loop.total_steps"]),
    ("segment", ["optim.schedule=stepwise"], ["optim.schedule", "poly"]),
    ("segment", ["optim.betas=[0.9, 1.5]"], ["optim.betas"]),
    ("segment", ["loop.precision=fp64"], ["loop.precision"]),
    ("linprobe", ["model.name=eva_tiny"], ["model.name", "eva_tiny"]),
    ("linprobe", ["probe.optimizer=adam"], ["probe.optimizer"]),
    ("knn", ["ks=[0]"], ["ks"]),
    ("knn", ["precision=fp8"], ["precision"]),
    ("embed", ["format=parquet"], ["format"]),
    ("embed", ["featurs=cls"], ["featurs"]),
]


@pytest.mark.parametrize("command, overrides, names", TASK_MISTAKES,
                         ids=[f"{c}-{'-'.join(o)}" for c, o, _ in TASK_MISTAKES])
def test_task_mistakes_are_refused_in_one_line_before_any_work(command, overrides, names, tmp_path, seg_root,
                                                               capsys, nothing_built):
    output = tmp_path / "run"
    code, out = run([command, *task_args(command, output, seg_root), *overrides], capsys)
    assert_refused(code, out, *names)
    assert not output.exists()


@pytest.mark.parametrize("command", ["finetune", "segment", "linprobe", "knn", "embed"])
def test_the_task_baselines_are_valid(command, tmp_path, seg_root):
    from evamim.cli import COMMANDS

    module = __import__(COMMANDS[command][0], fromlist=["validate"])
    schema = {"finetune": "FinetuneConfig", "segment": "SegmentConfig", "linprobe": "LinearProbeConfig",
              "knn": "KnnConfig", "embed": "EmbedConfig"}[command]
    module.validate(load_config(getattr(module, schema), None, task_args(command, tmp_path / "run", seg_root)))


LAUNCHERS = {
    "torchrun": {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
    "srun": {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "7"},
}


@pytest.mark.parametrize("command", ["pretrain", "finetune", "knn"])
def test_a_half_set_launch_environment_is_one_line(command, teacher_dir, tmp_path, seg_root, monkeypatch, capsys,
                                                   nothing_built):
    for key in [*LAUNCHERS["torchrun"], *LAUNCHERS["srun"]]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")  # left over from another job: no WORLD_SIZE
    output = tmp_path / "run"
    args = pretrain_args(teacher_dir, output) if command == "pretrain" else task_args(command, output, seg_root)
    code, out = run([command, *args], capsys)
    assert_refused(code, out, "RANK=0", "WORLD_SIZE")
    assert not output.exists()


# ------------------------------------------------------------------------------------ the command line
def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pretrian" in err and "pretrain" in err and "Traceback" not in err and len(err.splitlines()) <= 3


def test_config_that_is_missing_or_a_directory(tmp_path, capsys, nothing_built):
    code, out = run(["pretrain", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert_refused(code, out, "config file not found", "nope.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("batch_size: 8\n")
    code, out = run(["pretrain", "--config", str(tmp_path / "run")], capsys)
    assert_refused(code, out, str(tmp_path / "run"), "is a directory", "config.yaml")


@pytest.mark.parametrize("command", ["pretrain", "finetune", "segment", "linprobe", "knn", "embed"])
def test_an_output_dir_below_a_file_is_refused(command, teacher_dir, tmp_path, seg_root, capsys, nothing_built):
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    output = blocker / "run"
    args = pretrain_args(teacher_dir, output) if command == "pretrain" else task_args(command, output, seg_root)
    code, out = run([command, *args], capsys)
    assert_refused(code, out, "output_dir", str(blocker), "not a directory")
    assert blocker.read_text() == "not a directory"


def test_a_read_only_output_dir_is_refused(teacher_dir, tmp_path, monkeypatch, capsys, nothing_built):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere but on a read-only mount, so the permission is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    code, out = run(["pretrain", *pretrain_args(teacher_dir, locked / "run")], capsys)
    assert_refused(code, out, "output_dir", str(locked), "choose a writable output_dir")
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------------------ an existing run on disk
@pytest.fixture(scope="module")
def finished_run(teacher_dir, tmp_path_factory) -> Path:
    """A tiny pre-training run of 2 steps with its checkpoint, config and exported model."""
    from evamim.tasks.pretrain import PretrainConfig, run_pretrain

    output = tmp_path_factory.mktemp("finished") / "run"
    run_pretrain(load_config(PretrainConfig, None, pretrain_args(teacher_dir, output)))
    assert list((output / "checkpoints").iterdir())
    return output


@pytest.mark.parametrize("overrides", [["optim.lr=-1"], ["loop.precision=fp8"], ["teacher.spec=timm:resnet50"],
                                       ["masking.mask_ratio=1"], ["optim.warmup_steps=9", "loop.total_steps=4"]])
def test_a_refused_rerun_leaves_the_existing_run_untouched(overrides, finished_run, teacher_dir, capsys,
                                                           nothing_built):
    before = snapshot(finished_run)
    code, out = run(["pretrain", *pretrain_args(teacher_dir, finished_run, steps=4), *overrides], capsys)
    assert_refused(code, out)
    assert snapshot(finished_run) == before


def test_a_full_disk_is_one_line_naming_the_output_dir_and_keeps_the_last_checkpoint(finished_run, teacher_dir,
                                                                                    tmp_path, monkeypatch, capsys):
    """The run resumes, trains, fails to write its next checkpoint: one line, no traceback, exit 1, and the
    previous checkpoint is intact (the temp file of the failed one is gone)."""
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    checkpoints = snapshot(output / "checkpoints")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    code, out = run(["pretrain", *pretrain_args(teacher_dir, output, steps=4)], capsys)
    assert_refused(code, out, "No space left on device", str(output), exit_code=1, max_lines=1)
    assert "During handling" not in out
    assert snapshot(output / "checkpoints") == checkpoints


# ------------------------------------------------------------------------------------------ end to end
def run_evamim(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCHERS["torchrun"] and not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "evamim", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**environ, **env}, timeout=120)


def test_end_to_end_a_directory_as_config(tmp_path):
    result = run_evamim(["pretrain", "--config", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip() == f"evamim pretrain: config file {tmp_path} is a directory; give a YAML file"


# --------------------------------------------------------------------------------- weights in and out
@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A saved 2-block, 64-wide EvaViT at 32 px (patch 8): an evamim model directory."""
    torch.manual_seed(0)
    model = evamim.create_model("eva_tiny_p16", patch_size=8, img_size=32, embed_dim=64, depth=2, num_heads=2)
    return evamim.save_pretrained(model, tmp_path_factory.mktemp("weights") / "model")


def test_convert_refuses_weights_of_another_shape_in_one_line_and_writes_nothing(small_model_dir, tmp_path, capsys):
    destination = tmp_path / "converted"
    code, out = run(["convert", str(small_model_dir), str(destination), "--model", "eva_tiny_p16"], capsys, "err")
    assert_refused(code, out, "of another shape", "left at initialisation", "--non-strict")
    assert not destination.exists()


@pytest.mark.parametrize("content, names", [(b"\x80\x02garbage that is no pickle", ["corrupt"]),
                                            (None, ["not found"])])
def test_convert_reports_a_corrupt_or_missing_source(content, names, tmp_path, capsys):
    source = tmp_path / "weights.pt"
    if content is not None:
        source.write_bytes(content)
    code, out = run(["convert", str(source), str(tmp_path / "out")], capsys, "err")
    assert_refused(code, out, str(source), *names)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_guess_rope_for_eva02_weights_without_tables(tmp_path, capsys):
    """timm / open_clip EVA-02 files hold no RoPE tables: whether the model uses RoPE cannot be read off them."""
    model = evamim.create_model("eva02_tiny_p14", depth=2, img_size=56)
    source = tmp_path / "eva02_timm.pt"
    torch.save(evamim.to_timm_state_dict(model), source)
    code, out = run(["convert", str(source), str(tmp_path / "out"), "--num-heads", "3"], capsys, "err")
    assert_refused(code, out, "RoPE", "--model", "use_rope")
    assert not (tmp_path / "out").exists()


def test_finetune_from_weights_of_another_shape_is_refused_not_trained_from_random_init(small_model_dir, tmp_path,
                                                                                      capsys):
    output = tmp_path / "run"
    args = [arg for arg in task_args("finetune", output, tmp_path) if not arg.startswith("model.")]
    code, out = run(["finetune", *args, f"model.pretrained={small_model_dir}", "model.name=eva_tiny_p16",
                     "model.options={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}", "data.num_workers=0"],
                    capsys)
    assert_refused(code, out, "do not match the model", "of another shape")
    assert not (output / "model").exists()


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_run_whose_only_checkpoint_is_corrupt_is_refused_in_one_line(finished_run, teacher_dir, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    (checkpoint,) = (output / "checkpoints").iterdir()
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    before = snapshot(output)
    code, out = run(["pretrain", *pretrain_args(teacher_dir, output, steps=4)], capsys)
    assert_refused(code, out, "none of the 1 checkpoints", "loads", "move them away")
    after = snapshot(output)
    after.pop("config.yaml"), before.pop("config.yaml")  # the attempt's resolved config (its output_dir moved)
    assert after == before  # the damaged file is kept for inspection; logs, model and summary are untouched


# ------------------------------------------------------------------------------ --print-config, --dry-run
def test_print_config_builds_nothing_and_writes_nothing(teacher_dir, tmp_path, capsys, nothing_built):
    import yaml

    output = tmp_path / "run"
    code = main(["pretrain", *pretrain_args(teacher_dir, output), "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and printed["output_dir"] == str(output) and printed["model"]["name"] == "eva_tiny_p16"
    assert not output.exists()


def test_print_config_refuses_a_mistake_the_schema_sees_before_any_work(teacher_dir, tmp_path, capsys,
                                                                        nothing_built):
    output = tmp_path / "run"
    code, err = run(["pretrain", *pretrain_args(teacher_dir, output), "optim.lrr=1", "--print-config"], capsys, "err")
    assert_refused(code, err, "optim.lrr", "valid keys under optim")
    assert not output.exists()
