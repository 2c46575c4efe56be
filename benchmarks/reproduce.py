"""Re-run a committed result and say how far the new number is from it, in units of the seed-to-
seed spread the result itself records.

    python benchmarks/reproduce.py id_models --dataset ml-1m --model dcnv2 [--seeds 1] [--set key=value ...]

Reads ``benchmarks/results/NAME.json`` (a table of ``id_models.py`` or ``baselines.py``: one row per
dataset and model, each seed's run), re-runs each selected seed with the row's settings as
``flipctr train`` in a fresh process, and reports per seed: the committed and the new test AUC,
their difference, the row's seed-to-seed standard deviation and the difference in those units,
and whether the digits are the same. The new run folder records the arithmetic that produced
it (``environment.json``, "arithmetic"), to set beside the machine that made the committed one.
Writes ``benchmarks/results/reproduce_NAME.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def verdict(diff: float, std: float) -> str:
    if diff == 0:
        return "the same digits"
    if std == 0:
        return "different digits (no seed spread recorded)"
    units = abs(diff) / std
    return f"{units:.2f} seed std away: " + ("within the seed spread" if units <= 2 else "OUTSIDE the seed spread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a results file stem, e.g. id_models")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the row's first seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="more settings (e.g. train.deterministic=true), recorded in the report")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/reproduce"))
    args = parser.parse_args()
    committed = json.loads((RESULTS / f"{args.name}.json").read_text())
    row = next((r for r in committed["results"] if r["dataset"] == args.dataset and r["model"] == args.model), None)
    if row is None:
        sys.exit(f"{args.name}.json has no row for {args.dataset} / {args.model}")
    seeds = args.seeds or row["seeds"][:1]
    std = row.get("test_auc_std") or 0.0
    checks = []
    for seed in seeds:
        if seed not in row["seeds"]:
            sys.exit(f"{args.name}.json has no run of seed {seed} for {args.dataset} / {args.model}")
        before = row["runs"][row["seeds"].index(seed)]
        run_dir = args.runs / f"{args.name}-{args.dataset}-{args.model}-{seed}"
        settings = [*committed.get("overrides", []), f"train.seed={seed}", "train.progress=false", *args.overrides]
        command = [sys.executable, "-m", "flipctr.cli", "train", "--dataset", args.dataset, "--model", args.model,
                   "--run-dir", str(run_dir), *[x for s in settings for x in ("--set", s)]]
        if not (run_dir / "metrics.json").exists():
            subprocess.run(command, check=True)
        after = json.loads((run_dir / "metrics.json").read_text())
        diff = after["test"]["auc"] - before["test"]["auc"]
        checks.append({"seed": seed, "command": " ".join(command[1:]), "committed_test_auc": before["test"]["auc"],
                       "new_test_auc": after["test"]["auc"], "difference": diff, "seed_std": std,
                       "verdict": verdict(diff, std),
                       "arithmetic": json.loads((run_dir / "environment.json").read_text()).get("arithmetic")})
    report = {"result": args.name, "dataset": args.dataset, "model": args.model, "settings": args.overrides,
              "committed_environment": committed.get("environment"), "checks": checks}
    lines = [f"# Reproducing `{args.name}`: {args.model} on {args.dataset}", "",
             f"Command: `python benchmarks/reproduce.py {' '.join(sys.argv[1:])}`", "",
             "| seed | committed test AUC | new test AUC | difference | seed std | verdict | kernels | autocast |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        a = c["arithmetic"] or {}
        lines.append(f"| {c['seed']} | {c['committed_test_auc']!r} | {c['new_test_auc']!r} | {c['difference']:+.6f} | "
                     f"{c['seed_std']:.6f} | {c['verdict']} | {a.get('cpu_capability')} | {a.get('autocast')} |")
    (RESULTS / f"reproduce_{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"reproduce_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
