"""Summarise benchmark result lines (``perf/runner.py``'s JSON lines) as one JSON and one Markdown
table: op, shape, dtype, impl, median time, GB/s or TFLOP/s, the fraction of peak bandwidth and
the speed-up over the baseline.

    python perf/summarize.py RESULTS.jsonl --json SUMMARY.json --markdown SUMMARY.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("op", "shape", "dtype", "impl", "median_ms", "gb_per_s", "fraction_of_peak_bw",
           "tflop_per_s", "baseline", "speedup")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            raise ValueError(f"{path}:{number} is not a JSON line: {error}") from None
    return rows


def summary_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        entry = {key: row.get(key) for key in COLUMNS}
        entry["shape"] = str(entry["shape"])
        if isinstance(entry["baseline"], dict):
            entry["baseline"] = entry["baseline"].get("name")
        out.append(entry)
    return out


def markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key]) for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"summarize: {args.results}: no such file", file=sys.stderr)
        return 2
    rows = summary_rows(read_rows(args.results))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
