"""``evamim demo [--quick] [--output DIR] [--seed N] [--teacher SPEC]``: EVA's whole story on a CPU.

On synthetic captioned scenes, with nothing to download: a small CLIP teacher, EVA students (clip_mim against
it, pixel_mim and feature_distill for the paper's comparison), kNN and linear probes of every model against
random init, EVA-CLIP from the student vs from scratch, then (full budget) detection on synthetic instances with
the student's backbone vs a random one; ``report.md``, ``results.json`` and figures at the end. Every stage is an ordinary evamim run (the same task functions as the CLI, so the same code paths as a
multi-GPU run) in its own folder; re-running the command reuses finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEMO_OUTPUT = "runs/demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the same pipeline with a fraction of the steps (under two minutes; for tests)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help=f"where the stages and the report go (default {DEMO_OUTPUT}, {DEMO_OUTPUT}-quick with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every stage (data order, init, masks)")
    parser.add_argument("--teacher", default=None, metavar="SPEC",
                        help="use this teacher instead of training one, e.g. open_clip:ViT-B-16/openai (downloads)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print every stage as the evamim command that runs it, and exit")


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process would run every stage and write the same folders; the stages' own commands take torchrun.
        print("evamim demo runs on one process: start it without torchrun (`evamim demo --print-commands` lists "
              "the stages' commands, which run on several)", file=sys.stderr)
        return 2
    if args.print_commands:
        print(stage_commands(args))
        return 0
    try:
        import matplotlib  # noqa: F401  (the report's figures)
    except ModuleNotFoundError:
        print("evamim demo: the report's figures need matplotlib: pip install 'evamim[demo]'", file=sys.stderr)
        return 2
    from evamim.config import ConfigError
    from evamim.data.scenes import SCENE_TEMPLATES
    from evamim.demo.plan import FULL, QUICK, demo_stages
    from evamim.demo.report import write_report
    from evamim.demo.stages import headline, run_stage

    budget = QUICK if args.quick else FULL
    output = output_dir(args).resolve()
    templates = output / "zeroshot_templates.txt"
    try:
        output.mkdir(parents=True, exist_ok=True)
        templates.write_text("\n".join(SCENE_TEMPLATES) + "\n")
        if budget.detection_steps:
            _write_instances(output, args.seed)
    except OSError as error:
        print(f"evamim demo: cannot write into --output {output}: {error.strerror or error}", file=sys.stderr)
        return 2
    _console_logging()
    stages = demo_stages(output, budget, seed=args.seed, teacher_spec=args.teacher, templates=templates)
    log_file = output / "demo.log"
    print(f"evamim demo ({budget.name}): {len(stages)} stages into {output} (details in {log_file.name})", flush=True)
    records = {}
    start = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        print(f"[{index:>2}/{len(stages)}] {stage.title} ...", flush=True)
        try:
            record = run_stage(stage, log_file)
        except ConfigError as error:
            print(f"evamim demo: stage {stage.name}: {error}", file=sys.stderr)
            return 2
        records[stage.name] = record
        how = "reused" if record["reused"] else f"{record['seconds']:.0f} s"
        print(f"        {headline(stage, record.get('result'))} ({how})", flush=True)
    results = write_report(output, stages, records, budget, seed=args.seed, teacher_spec=args.teacher)
    print()
    print(summary_table(results))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; report: {output / 'report.md'}")
    return 0


def _write_instances(output: Path, seed: int) -> None:
    """Stage 5's dataset (drawn again each time: the same files, a fraction of a second)."""
    from evamim.data.instances import remove_split, write_instances
    from evamim.demo.plan import INSTANCES, instances_dir

    for split in ("train", "val"):
        remove_split(instances_dir(output), split)
    write_instances(instances_dir(output), seed=seed, **INSTANCES)


def instances_command(output: Path, seed: int) -> str:
    """``_write_instances`` as the command line that does the same."""
    import shlex

    from evamim.demo.plan import INSTANCES, instances_dir

    low, high = INSTANCES["radius_range"]
    return (f"evamim data make-instances {shlex.quote(str(instances_dir(output)))} --train {INSTANCES['train']} "
            f"--val {INSTANCES['val']} --resolution {INSTANCES['resolution']} --max-objects "
            f"{INSTANCES['max_objects']} --min-radius {low} --max-radius {high} --seed {seed} --overwrite")


def output_dir(args: argparse.Namespace) -> Path:
    """``--output``, or the default folder of the budget (as given: relative paths stay relative)."""
    return Path(args.output or (DEMO_OUTPUT + ("-quick" if args.quick else "")))


def stage_commands(args: argparse.Namespace) -> str:
    """Each stage as a shell command line (what the demo runs in-process), in order, after the ones that write
    the zero-shot prompt file the CLIP stages read and (full budget) the detection stages' instances."""
    import shlex

    from evamim.demo.plan import FULL, QUICK, demo_stages

    output = output_dir(args)
    budget = QUICK if args.quick else FULL
    stages = demo_stages(output, budget, seed=args.seed, teacher_spec=args.teacher,
                         templates=output / "zeroshot_templates.txt")
    templates = str(output / "zeroshot_templates.txt")
    write_templates = (f"mkdir -p {shlex.quote(str(output))} && python -c "
                       + shlex.quote("import sys; from evamim.data.scenes import SCENE_TEMPLATES; "
                                     "open(sys.argv[1], 'w').write(chr(10).join(SCENE_TEMPLATES) + chr(10))")
                       + f" {shlex.quote(templates)}")
    lines = [write_templates] + ([instances_command(output, args.seed)] if budget.detection_steps else [])
    lines += [f"evamim {stage.command} " + " ".join(shlex.quote(o) for o in stage.overrides) for stage in stages]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """The console's closing table: probes per model, then the EVA-CLIP and detection comparisons."""
    from evamim.demo.report import one_decimal
    from evamim.tasks.common import format_table

    rows = [{"model": model.replace("_", " "), "kNN top-1": entry.get("knn_top1"),
             "linear probe top-1": entry.get("linprobe_top1")} for model, entry in results["probes"].items()]
    eva = results["eva_clip"]
    lines = [format_table(rows, ["model", "kNN top-1", "linear probe top-1"]), "",
             f"EVA-CLIP zero-shot top-1: from the EVA student {_value(eva['clip_from_eva']['final'])}, "
             f"from scratch {_value(eva['clip_from_scratch']['final'])}"]
    if "teacher_zeroshot" in results:
        lines.append(f"teacher CLIP zero-shot top-1: {_value(results['teacher_zeroshot']['final'])}")
    detection = results.get("detection") or {}
    if detection:
        lines.append("detection box / mask AP: " + ", ".join(
            f"backbone from {name.replace('_', ' ')} {one_decimal(entry.get('bbox_AP'))} / "
            f"{one_decimal(entry.get('segm_AP'))}"
            for name, entry in detection.items()))
    return "\n".join(lines)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _console_logging() -> None:
    """Warnings and errors on the console; each stage sends its INFO lines to demo.log (see stages.py)."""
    root = logging.getLogger()
    if not any(getattr(h, "_evamim_demo", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._evamim_demo = True
        root.addHandler(handler)
