"""Run the whole test suite (spawning tests included) many times in a row and stop at the first failure.

    python tools/stress_test.py --runs 30            # or: make stress-test RUNS=30

Flaky failures of multi-process tests (a worker killed by a signal at exit, a hang) show up in one run out of
several, never in one run: this is how a change to process start-up or shutdown is checked. Each run's
outcome and duration is printed and appended to the log (default stress-test.log); the output of a failed run
is kept in full there. Exit code 0 when every run passed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# Signs of the failures this hunts for, reported even when pytest itself says "passed" (what torch.multiprocessing,
# torchrun, libstdc++ and CPython print when a process aborts or is killed by a signal).
ALARMS = ("terminated with signal", "exitcode  : -", "terminate called without an active exception",
          "Fatal Python error", "core dumped")


def run_suite(pytest_args: list[str], timeout: float) -> tuple[bool, float, str, str]:
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], capture_output=True, text=True,
                              timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = f"timed out after {timeout:.0f} s\n" + (expired.stdout or b"").decode(errors="replace")
        code = -1
    elapsed = time.monotonic() - start
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"passed|failed|error", line)), "")
    alarms = [alarm for alarm in ALARMS if alarm in output]
    ok = code == 0 and not alarms
    return ok, elapsed, summary.strip("= ") + (f" [alarms: {', '.join(alarms)}]" if alarms else ""), output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run of the suite")
    parser.add_argument("--log", default="stress-test.log")
    parser.add_argument("pytest_args", nargs="*", default=["-n", "2", "-q", "-p", "no:cacheprovider"])
    args = parser.parse_args()
    log = Path(args.log)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with log.open("a") as handle:
        handle.write(f"# {stamp}: up to {args.runs} runs of pytest {' '.join(args.pytest_args)}\n")
    for index in range(1, args.runs + 1):
        ok, elapsed, summary, output = run_suite(args.pytest_args, args.timeout)
        line = f"run {index}/{args.runs}: {'ok' if ok else 'FAILED'} in {elapsed:.0f} s: {summary}"
        print(line, flush=True)
        with log.open("a") as handle:
            handle.write(line + "\n" + ("" if ok else output + "\n"))
        if not ok:
            print(f"stopped at the first failure; its full output is in {log}", file=sys.stderr)
            return 1
    with log.open("a") as handle:
        handle.write(f"all {args.runs} runs passed\n")
    print(f"all {args.runs} runs passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
