"""One command-line grammar for every command: ``--config NAME|FILE`` from any directory, ``--print-config``,
``--dry-run``, ``evamim list KIND``, refusals in one line on stderr (exit code 2), and flags that are spelled
alike and checked alike in ``convert``, ``bench`` and ``data``."""

import argparse
import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest
import yaml

from evamim import recipes
from evamim.cli import COMMANDS, main
from evamim.config import ConfigError, load_config, to_yaml


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------- a toy config command
@dataclass
class ToyData:
    path: str = ""
    workers: int = 2


@dataclass
class ToyConfig:
    data: ToyData = field(default_factory=ToyData)
    steps: int = 10
    output_dir: str = "runs/toy"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@pytest.fixture
def toy(monkeypatch):
    """``evamim toy``: a config-driven command built like the real ones, whose run and dry run are recorded.
    ``toy.dry_run`` is its dry-run function (None: the command has none)."""
    from evamim.tasks.command import add_config_arguments, run_config_command

    module = types.ModuleType("evamim_toy_command")
    module.calls = []
    module.dry_run = lambda config: f"would run {config.steps} steps into {config.output_dir}"

    def run_toy(config):
        module.calls.append(config)
        return {"steps": config.steps}

    def run(args):
        code, config, result, _ = run_config_command("toy", ToyConfig, run_toy, args, dry_run_fn=module.dry_run)
        if code == 0:
            print(f"done: {result['steps']} steps")
        return code

    module.add_arguments = lambda parser: add_config_arguments(parser, "toy.yaml", "steps=3")
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "toy", (module.__name__, "a toy command"))
    return module


def test_print_config_prints_the_resolved_config_as_yaml_and_runs_nothing(toy, tmp_path, capsys):
    (tmp_path / "toy.yaml").write_text("steps: 5\ndata:\n  workers: 4\n")
    code = main(["toy", "--config", str(tmp_path / "toy.yaml"), "data.path=/images", "--print-config"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "" and toy.calls == []
    printed = yaml.safe_load(captured.out)
    assert printed == {"data": {"path": "/images", "workers": 4}, "steps": 5, "output_dir": "runs/toy"}
    # What it prints is a recipe again: loading it gives the same config.
    (tmp_path / "printed.yaml").write_text(captured.out)
    assert load_config(ToyConfig, tmp_path / "printed.yaml") == load_config(
        ToyConfig, tmp_path / "toy.yaml", ["data.path=/images"])


@pytest.mark.parametrize("overrides, names", [
    (["data.pth=/images"], ["data.pth", "valid keys under data: path, workers"]),
    (["steps=many"], ["steps", "many"]),
    (["steps=0"], ["steps must be >= 1"]),
    (["steps"], ["key=value"]),
])
def test_print_config_refuses_what_the_schema_refuses(overrides, names, toy, capsys):
    code = main(["toy", "--print-config", *overrides])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and toy.calls == []
    assert captured.err.startswith("evamim toy: ") and len(captured.err.splitlines()) <= 2, captured.err
    for name in names:
        assert name in captured.err


def test_dry_run_prints_the_report_and_runs_nothing(toy, capsys):
    code = main(["toy", "--dry-run", "steps=3"])
    captured = capsys.readouterr()
    assert code == 0 and toy.calls == [] and captured.err == ""
    assert captured.out.strip() == "would run 3 steps into runs/toy"


@pytest.mark.parametrize("error, exit_code", [(ConfigError("data.path: /nowhere does not exist"), 2),
                                              (FileNotFoundError("data.path: /nowhere does not exist"), 2)])
def test_a_refusal_from_the_dry_run_is_one_line_on_stderr(error, exit_code, toy, capsys):
    def refuse(config):
        raise error

    toy.dry_run = refuse
    code = main(["toy", "--dry-run"])
    captured = capsys.readouterr()
    assert code == exit_code and captured.out == "" and toy.calls == []
    assert one_line(captured.err) == "evamim toy: data.path: /nowhere does not exist"


def test_dry_run_on_a_command_without_one_is_refused_before_the_config_is_read(toy, capsys):
    toy.dry_run = None
    code = main(["toy", "--dry-run", "no.such.key=1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and toy.calls == []
    line = one_line(captured.err)
    assert line.startswith("evamim toy: --dry-run is not available") and "--print-config" in line


def test_print_config_and_dry_run_together_are_refused(toy, capsys):
    code = main(["toy", "--dry-run", "--print-config"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and toy.calls == []
    assert "--print-config" in one_line(captured.err) and "--dry-run" in captured.err


def test_a_run_prints_its_summary_and_refusals_go_to_stderr(toy, capsys):
    assert main(["toy", "steps=2"]) == 0
    assert capsys.readouterr().out.strip() == "done: 2 steps"
    assert main(["toy", "stpes=2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("evamim toy: override 'stpes=2'")


def test_without_recipes_the_help_shows_the_given_example(toy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "e.g. toy.yaml" in out and "--print-config" in out and "--dry-run" in out


# ------------------------------------------------------------------------------- --config NAME | FILE
def test_every_recipe_resolves_by_name_to_its_packaged_file():
    assert set(recipes.commands()) == {"pretrain", "finetune", "segment", "detect", "knn", "linprobe", "clip"}
    for command in recipes.commands():
        for name in recipes.names(command):
            path = recipes.resolve(command, name)
            assert path.is_file() and path.parent.name == command and path.stem == name
            assert isinstance(yaml.safe_load(path.read_text()), dict)
            assert recipes.summary(command, name), f"{command}/{name} starts with no comment line"


def test_a_recipe_by_name_works_from_any_directory(tmp_path, monkeypatch, capsys):
    from evamim.tasks.pretrain import PretrainConfig

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "eva_b16_in1k", "data.path=/data/in1k", "--print-config"]) == 0
    captured = capsys.readouterr()
    expected = load_config(PretrainConfig, recipes.path("pretrain", "eva_b16_in1k"), ["data.path=/data/in1k"])
    assert captured.out == to_yaml(expected) and captured.err == ""


def test_a_file_next_to_a_recipe_name_is_read_as_a_file(toy, tmp_path, monkeypatch, capsys):
    """A value that exists, has a directory part or a .yaml suffix is a path, as before."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("steps: 7\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.yml").write_text("steps: 8\n")
    for value, steps in [("mine", 7), ("sub/other.yml", 8), (str(tmp_path / "mine"), 7)]:
        assert main(["toy", "--config", value, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["steps"] == steps


def test_a_typo_in_a_recipe_name_lists_the_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["pretrain", "--config", "eva_b16_in1kk", "--print-config"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    line = one_line(captured.err)
    assert line.startswith("evamim pretrain: --config eva_b16_in1kk: no such recipe")
    assert "did you mean eva_b16_in1k?" in line and "eva_g14_merged30m" in line and "path to a YAML file" in line


def test_a_recipe_name_with_its_suffix_points_at_the_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "eva_b16_in1k.yaml", "--print-config"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "config file not found: eva_b16_in1k.yaml" in line and "--config eva_b16_in1k" in line


def test_config_that_is_a_missing_file_or_a_run_directory(toy, tmp_path, capsys):
    assert main(["toy", "--config", str(tmp_path / "nope.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and one_line(captured.err) == f"evamim toy: config file not found: {tmp_path / 'nope.yaml'}"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("steps: 3\n")
    assert main(["toy", "--config", str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "is a directory" in line and str(tmp_path / "run" / "config.yaml") in line
    assert toy.calls == []


def test_a_name_for_a_command_without_recipes_asks_for_a_path(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "--config", "eva_b16_in1k"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "evamim toy ships no recipes" in line and "path to a YAML file" in line


def test_the_help_of_a_command_with_recipes_names_them(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "eva_b16_in1k, eva_g14_merged30m" in out and "configs/" not in out


def test_print_config_of_a_real_command_refuses_a_bad_key_on_stderr(capsys):
    code = main(["pretrain", "--config", "eva_b16_in1k", "--print-config", "optim.lrr=1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("evamim pretrain: override 'optim.lrr=1'") and "valid keys under optim" in captured.err


# --------------------------------------------------------------------------------------- evamim list
def test_list_models_shows_every_preset_with_its_size(capsys):
    import evamim

    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split() == ["model", "params", "patch", "image", "width", "depth", "heads"]
    assert [row.split()[0] for row in rows] == evamim.list_models()
    giant = next(row.split() for row in rows if row.startswith("eva_giant_p14 "))
    assert giant[1].endswith("M") and 1000 < float(giant[1][:-1]) < 1020 and giant[2:] == ["14", "224", "1408", "40", "16"]


def test_list_teachers_shows_every_backend_and_its_spec(capsys):
    from evamim.teachers.factory import BACKENDS

    assert main(["list", "teachers"]) == 0
    out = capsys.readouterr().out
    for backend, (_, example) in BACKENDS.items():
        assert f"{backend}:" in out and example in out
    assert "teacher.spec" in out


def test_list_objectives_shows_every_objective_with_a_description(capsys):
    from evamim.pretrain.objectives import list_objectives

    assert main(["list", "objectives"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == list_objectives()
    assert all(len(row.split()) > 2 for row in rows)


def test_list_recipes_shows_every_recipe_with_its_summary(capsys):
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    for command in recipes.commands():
        for name in recipes.names(command):
            assert any(line.split()[:2] == [command, name] and recipes.summary(command, name) in line
                       for line in out.splitlines())


@pytest.mark.parametrize("argv, hint", [(["list"], "say what to list"), (["list", "modles"], "did you mean models?"),
                                        (["list", "everything"], "unknown kind 'everything'")])
def test_list_without_a_valid_kind_is_refused_with_the_kinds(argv, hint, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line(captured.err)
    assert line.startswith("evamim list: ") and hint in line and "models, teachers, objectives" in line


def test_list_recipes_imports_no_model_code(tmp_path):
    """``evamim list recipes`` reads the packaged YAML files: no model, teacher or objective code is imported."""
    script = ("import sys, evamim; before = set(sys.modules); from evamim.cli import main; main(['list', 'recipes']); "
              "print(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.splitlines()[-1].split()
    heavy = [m for m in loaded if m.split(".")[0] in ("timm", "open_clip", "transformers", "omegaconf")
             or m.startswith(("evamim.models", "evamim.teachers", "evamim.pretrain", "evamim.engine", "evamim.data"))]
    assert heavy == []


# ---------------------------------------------------------------------- flags of convert, bench and data
def flag_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the flag-based commands and their sub-commands, by program name."""
    parsers = {}

    def collect(parser):
        parsers[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    for name in ("convert", "bench", "data"):
        parser = argparse.ArgumentParser(prog=f"evamim {name}")
        __import__(COMMANDS[name][0], fromlist=["add_arguments"]).add_arguments(parser)
        collect(parser)
    return parsers


def visible_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions if action.help != argparse.SUPPRESS
            for flag in action.option_strings}


def test_flags_are_kebab_case():
    for prog, parser in flag_parsers().items():
        for flag in visible_flags(parser):
            assert flag == flag.lower() and "_" not in flag, f"{prog} {flag}"


def test_one_spelling_for_one_thing():
    """--precision for autocast, --image-size, --device checked against this machine, in every command."""
    from evamim.flags import PRECISIONS, device

    for prog, parser in flag_parsers().items():
        flags = visible_flags(parser)
        assert "--img-size" not in flags and "--dtype" not in flags, f"{prog}: use --image-size / --precision"
        if "--precision" in flags:
            assert tuple(flags["--precision"].choices) == PRECISIONS, prog
        if "--device" in flags:
            assert flags["--device"].type is device, prog


def run_refused(argv: list[str], capsys) -> str:
    """argparse's refusal: exit code 2 and its message on stderr (the line after the usage)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, names", [
    (["data", "make-shards", "src", "out", "--shard-size", "0"], ["--shard-size", "integer >= 1", "'0'"]),
    (["data", "make-shards", "src", "out", "--quality", "101"], ["--quality", "[1, 100]"]),
    (["data", "make-shards", "src", "out", "--workers", "two"], ["--workers", "integer >= 1", "'two'"]),
    (["data", "make-shards", "src", "out", "--seed", "-1"], ["--seed", "integer >= 0"]),
    (["data", "inspect", "src", "--limit", "-1"], ["--limit", "integer >= 0"]),
    (["data", "inspect", "src", "--max-image-pixels", "0"], ["--max-image-pixels", "integer >= 1"]),
    (["data", "shard"], ["invalid choice", "make-shards", "inspect"]),
    (["convert", "a.pt", "out", "--to", "onnx"], ["--to", "'onnx'", "evamim", "timm", "open_clip"]),
    (["convert", "a.pt", "out", "--qkv", "split"], ["--qkv", "fused", "separate"]),
    (["convert", "a.pt", "out", "--num-heads", "0"], ["--num-heads", "integer >= 1"]),
    (["convert", "a.pt", "out", "--model", "eva_tiny"], ["--model", "eva_tiny_p16"]),
    (["bench", "modle"], ["invalid choice", "model", "data", "pretrain"]),
])
def test_a_bad_flag_value_is_refused_with_the_valid_ones(argv, names, capsys):
    line = run_refused(argv, capsys)
    assert line.startswith(f"evamim {argv[0]}"), line
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"


@pytest.mark.parametrize("item, names", [("img_size", ["KEY=VALUE", "'img_size'"]),
                                         ("rope_ref_grid=[16,", ["--set rope_ref_grid=[16,", "not valid YAML"])])
def test_convert_refuses_a_malformed_set_in_one_line(item, names, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--set", item]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("evamim convert: --set") and all(name in line for name in names)
    assert not (tmp_path / "out").exists()


def test_device_and_precision_flags(monkeypatch):
    import torch

    from evamim.flags import add_device_argument, add_precision_argument, device

    parser = argparse.ArgumentParser(prog="evamim bench toy", exit_on_error=False)
    add_device_argument(parser, default="cpu")
    add_precision_argument(parser, default="bf16")
    assert vars(parser.parse_args([])) == {"device": "cpu", "precision": "bf16"}
    assert parser.parse_args(["--precision", "fp16"]).precision == "fp16"
    assert parser.parse_args(["--dtype", "fp32"]).precision == "fp32"  # the old spelling, hidden
    assert "--dtype" not in parser.format_help()
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'fp8'.*fp32.*bf16.*fp16"):
        parser.parse_args(["--precision", "fp8"])
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'gpu'; valid: cpu, cuda, cuda:N, mps"):
        device("gpu")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device"):
        device("cpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device; use --device cpu"):
        device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device("cuda:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match="2 CUDA device.*cuda:0 to cuda:1"):
        device("cuda:2")
