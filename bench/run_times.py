"""Where a Snakemake run's time went: per rule, the jobs, summed wall and CPU seconds and the largest RSS, read from
the run's ``benchmarks/**/*.tsv`` (every rule has a ``benchmark:`` file). Prints a markdown table, largest CPU
first. Wall seconds of jobs that ran side by side add up to more than the run's wall time; CPU seconds (user +
system of the job's processes) are the load-independent part.

    python bench/run_times.py /path/to/run > bench/results/default_run_cpu.md
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run folder (holding benchmarks/)")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    for f in sorted((args.run / "benchmarks").rglob("*.tsv")):
        rule = f.relative_to(args.run / "benchmarks").parts[0]
        with open(f) as fh:
            last = list(csv.DictReader(fh, delimiter="\t"))[-1]  # a rerun appends a row
        r = rows.setdefault(rule, [0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += float(last["s"])
        r[2] += float(last.get("cpu_time") or 0.0)
        r[3] = max(r[3], float(last.get("max_rss") or 0.0))
    total = [sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())]
    print("| rule | jobs | wall s (summed) | CPU s (summed) | max RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for rule, (n, wall, cpu, rss) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        print(f"| {rule} | {n} | {wall:.0f} | {cpu:.0f} | {rss:.0f} |")
    print(f"| **all** | **{total[0]}** | **{total[1]:.0f}** | **{total[2]:.0f}** | |")


if __name__ == "__main__":
    main()
