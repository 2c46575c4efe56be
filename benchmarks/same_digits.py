"""Whether two finished run folders computed the same thing: their metrics (times left out), their
per-epoch history, and every file they keep (weights, encoding, config) byte for byte.

A code change that should change nothing (a move, a rename) is checked by training the same run
before and after it on one machine and comparing the two folders::

    git checkout OLD && flipctr train --dataset ml-1m --model dcnv2 --set train.seed=1 --run-dir /tmp/before
    git checkout NEW && flipctr train --dataset ml-1m --model dcnv2 --set train.seed=1 --run-dir /tmp/after
    python benchmarks/same_digits.py /tmp/before /tmp/after --name refactor_guard --note "OLD -> NEW"

Writes ``benchmarks/results/NAME.{json,md}``; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from flipctr.runtime.folder import ENCODING_FILES, RunFolder

RESULTS = Path(__file__).resolve().parent / "results"
TIMES = {"wall_seconds", "fit_seconds", "train_samples_per_second", "seconds", "samples_per_second"}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _kept(run: RunFolder) -> list[Path]:
    """The files a finished training run keeps."""
    return [run.model, run.selected_model, run.config, run.inference_config, *(run.path / f for f in ENCODING_FILES)]


def compare(before: Path, after: Path) -> dict:
    runs = RunFolder(before), RunFolder(after)
    a, b = (_untimed(run.read_metrics()) for run in runs)
    files = {x.name: {"before": _sha256(x), "after": _sha256(y)} for x, y in zip(*map(_kept, runs), strict=True)}
    return {
        "metrics_equal": a == b,
        "metrics_differ": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)),
        "files": {name: {**sums, "equal": sums["before"] == sums["after"]} for name, sums in files.items()},
        "valid_auc": [a["valid"]["auc"] if a.get("valid") else None, b["valid"]["auc"] if b.get("valid") else None],
        "test_auc": [a["test"]["auc"], b["test"]["auc"]], "test_logloss": [a["test"]["logloss"], b["test"]["logloss"]],
        "environment": [json.loads(run.environment.read_text()).get("arithmetic", {}).get("cpu_model")
                        for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--name", default="same_digits")
    parser.add_argument("--note", default="", help="what changed between the two runs")
    args = parser.parse_args()
    result = {"before": str(args.before), "after": str(args.after), "note": args.note, **compare(args.before, args.after)}
    same = result["metrics_equal"] and all(f["equal"] for f in result["files"].values())
    result["same"] = same
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Same digits: {'yes' if same else '**no**'}", "", args.note, "",
             f"`python benchmarks/same_digits.py {args.before} {args.after} --name {args.name}`", "",
             "| | before | after |", "|---|---|---|",
             f"| valid AUC | {result['valid_auc'][0]!r} | {result['valid_auc'][1]!r} |",
             f"| test AUC | {result['test_auc'][0]!r} | {result['test_auc'][1]!r} |",
             f"| test Logloss | {result['test_logloss'][0]!r} | {result['test_logloss'][1]!r} |",
             f"| CPU | {result['environment'][0]} | {result['environment'][1]} |", "",
             f"metrics.json without times (history included): {'equal' if result['metrics_equal'] else 'differ in ' + ', '.join(result['metrics_differ'])}", "",
             "| file | sha256 equal |", "|---|---|"]
    lines += [f"| {name} | {'yes' if f['equal'] else '**no**'} |" for name, f in result["files"].items()]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
