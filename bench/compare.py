#!/usr/bin/env python3
"""Two poproxy source trees against each other, interleaved: did a change make it cheaper?

Each round starts poproxy from one tree, then from the other (the order
alternates), with the same harness, backend, certificates and workloads as
bench/run.py, and reports every round's value and the median ratio
candidate ÷ base. A tree is any directory holding the `poproxy` package, for
example a `git worktree` or a `git archive` of the commit before a change:

    git archive HEAD~1 poproxy | tar -x -C /tmp/base
    .venv/bin/python bench/compare.py /tmp/base --workloads full,hello

On a shared VM single rounds vary by ±10-20%; the median over six or more
rounds of a few thousand sessions separates changes of about 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("full", "resumed", "stls", "hello", "hello-resumed", "idle")


def launcher(directory: Path, tree: Path) -> Path:
    """A `poproxy` command that runs the package found in `tree`."""
    script = directory / f"poproxy-{len(list(directory.iterdir()))}"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={tree} exec {sys.executable} -m poproxy "$@"\n')
    script.chmod(0o755)
    return script


async def compare(
    trees: dict[str, Path], rounds: int, sessions: int, workloads: list[str], idle: int
) -> dict[tuple[str, str], list[float]]:
    _, options = run.parse(["--quick"])
    plan = options.plan
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="poproxy-compare-") as name:
        workdir = Path(name)
        commands = workdir / "bin"
        commands.mkdir()
        launchers = {label: launcher(commands, tree) for label, tree in trees.items()}
        certificates = run.make_certificates(workdir)
        expected = run.Expected(
            run.make_message(run.SMALL_SIZE, "small"), run.make_message(run.BIG_SIZE, "big")
        )
        backend = await asyncio.to_thread(run.start_mailbox_backend, workdir)
        setup = run.Setup(workdir, certificates, backend.port, 0, plan.concurrency + idle + 256)
        bench = run.Bench(plan, expected, certificates)
        try:
            for round_ in range(rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for label in order:
                    run.POPROXY = launchers[label]
                    target = await asyncio.to_thread(run.start_poproxy, setup, "info", 1)
                    try:
                        await bench.sessions(target, "full", round_, plan.warmup, 30.0)
                        for workload in workloads:
                            if workload == "idle":
                                m = await bench.idle(target, round_, idle)
                            else:
                                m = await bench.sessions(target, workload, round_, sessions, 20.0)
                            if m.errors:
                                raise SystemExit(f"{label} {workload}: {m.first_error}")
                            values[label, workload].append(m.value)
                            print(f"round {round_ + 1} {label:9} {workload:13} {m.value:.3f}",
                                  file=sys.stderr, flush=True)  # fmt: skip
                    finally:
                        await asyncio.to_thread(target.stop)
        finally:
            await asyncio.to_thread(backend.stop)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path, help="a directory holding the base `poproxy` package")
    parser.add_argument("--candidate", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=3000, help="per window, at most")
    parser.add_argument("--workloads", default="full", help=f"from {','.join(WORKLOADS)}")
    parser.add_argument("--idle", type=int, default=2000, help="idle sessions held")
    args = parser.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    trees = {"base": args.base.resolve(), "candidate": args.candidate.resolve()}
    for label, tree in trees.items():
        if not (tree / "poproxy" / "__init__.py").exists():
            parser.error(f"{label}: no poproxy package in {tree}")
    if (os.cpu_count() or 0) < 2:
        raise SystemExit("needs 2 CPUs: the load on CPU 0, poproxy on CPU 1")
    os.sched_setaffinity(0, {run.LOAD_CPU})
    run.raise_file_limit(2 * args.idle + 384)
    values = uvloop.run(compare(trees, args.rounds, args.sessions, workloads, args.idle))
    print("| workload | base (median) | candidate (median) | candidate ÷ base |")
    print("| --- | ---: | ---: | ---: |")
    for workload in workloads:
        base = statistics.median(values["base", workload])
        candidate = statistics.median(values["candidate", workload])
        print(f"| {workload} | {base:.3f} | {candidate:.3f} | {candidate / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
