"""The test suite's times before and after a change, from two pytest junit XML files (``--junitxml``): wall time,
per-file and per-test times, the slowest tests, and whether the same test ids ran with the same outcomes.

    python benchmarks/test_suite.py --before before.xml --after after.xml --label-before "main, serial"

Per-file times are the sum of their tests' times (setup, call and teardown); under pytest-xdist they add up to
more than the wall time. Writes benchmarks/results/test_suite.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_junit(path: str | Path) -> dict:
    """Test id -> (seconds, outcome) of a junit file, and the suite's wall time."""
    root = ElementTree.parse(path).getroot()
    tests = {}
    for case in root.iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        tests[test_id] = (float(case.get("time", 0.0)), outcome)
    wall = sum(float(suite.get("time", 0.0)) for suite in root.iter("testsuite"))
    return {"tests": tests, "wall_seconds": wall}


def per_file(tests: dict) -> dict[str, float]:
    totals = collections.Counter()
    for test_id, (seconds, _) in tests.items():
        totals[test_id.split("::")[0]] += seconds
    return dict(totals)


def summary(run: dict, slowest: int) -> dict:
    tests = run["tests"]
    return {"wall_seconds": round(run["wall_seconds"], 1), "num_tests": len(tests),
            "outcomes": dict(collections.Counter(outcome for _, outcome in tests.values())),
            "sum_of_test_seconds": round(sum(seconds for seconds, _ in tests.values()), 1),
            "slowest": [{"test": test_id, "seconds": round(seconds, 1)} for test_id, (seconds, _) in
                        sorted(tests.items(), key=lambda item: -item[1][0])[:slowest]]}


def compare(before: dict, after: dict, slowest: int = 25) -> dict:
    files_before, files_after = per_file(before["tests"]), per_file(after["tests"])
    files = sorted(files_before, key=lambda name: -files_before[name])
    changed = {test_id: [before["tests"][test_id][1], after["tests"][test_id][1]]
               for test_id in before["tests"].keys() & after["tests"].keys()
               if before["tests"][test_id][1] != after["tests"][test_id][1]}
    return {
        "before": summary(before, slowest), "after": summary(after, slowest),
        "wall_ratio_before_over_after": round(before["wall_seconds"] / max(after["wall_seconds"], 1e-9), 2),
        "ids_only_before": sorted(before["tests"].keys() - after["tests"].keys()),
        "ids_only_after": sorted(after["tests"].keys() - before["tests"].keys()),
        "outcomes_changed": changed,
        "per_file_seconds": [{"file": name, "before": round(files_before[name], 1),
                              "after": round(files_after.get(name, 0.0), 1)} for name in files],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="junit XML of the suite before the change")
    parser.add_argument("--after", required=True, help="junit XML of the suite after it")
    parser.add_argument("--label-before", default="before", help="how the before run was made (host, command)")
    parser.add_argument("--label-after", default="after")
    parser.add_argument("--slowest", type=int, default=25)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/test_suite.json"))
    args = parser.parse_args(argv)
    report = compare(read_junit(args.before), read_junit(args.after), args.slowest)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "labels": {"before": args.label_before, "after": args.label_after}, **report}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"before: {report['before']['num_tests']} tests, {report['before']['wall_seconds'] / 60:.1f} min; "
          f"after: {report['after']['num_tests']} tests, {report['after']['wall_seconds'] / 60:.1f} min "
          f"({report['wall_ratio_before_over_after']}x); ids only before: {len(report['ids_only_before'])}, "
          f"only after: {len(report['ids_only_after'])}, outcomes changed: {len(report['outcomes_changed'])}")
    print(f"{'file':<58}{'before s':>10}{'after s':>10}")
    for row in report["per_file_seconds"][:25]:
        print(f"{row['file']:<58}{row['before']:>10.1f}{row['after']:>10.1f}")
    return report


if __name__ == "__main__":
    main()
