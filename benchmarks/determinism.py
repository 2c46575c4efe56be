"""Which digits hold where: DCNv2 on ML-1M (seed 1) with and without ``train.deterministic``,
each under two instruction-set caps of this machine (the nearest thing to two machines one
machine has), every run in its own process.

    python benchmarks/determinism.py [--dataset ml-1m] [--model dcnv2] [--seed 1] [--caps avx512 avx2]

A cap sets ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS`` for the
process ("machine": none, what this CPU offers). Writes ``benchmarks/results/determinism.{json,md}``: per run the test and
validation metrics, the validation AUC per epoch, the seconds and rows/s, and the arithmetic the
run folder recorded; per setting whether the caps gave the same digits, and the deterministic
setting's cost in speed. Raw data must have been fetched (``flipctr data get ml-1m``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# what a cap sets: ATen's kernels, oneDNN's and MKL's instruction sets (the deterministic setting
# overrides the first two with its own pins; MKL's cap it leaves: its COMPATIBLE branch ignores it)
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def run_once(args: argparse.Namespace, deterministic: bool, cap: str, runs: Path) -> dict:
    run_dir = runs / f"{'deterministic' if deterministic else 'default'}-{cap}"
    env = {k: v for k, v in os.environ.items() if k not in CAP_VARIABLES}
    if cap != "machine":
        env.update(ATEN_CPU_CAPABILITY=cap, ONEDNN_MAX_CPU_ISA=cap.upper(), MKL_ENABLE_INSTRUCTIONS=cap.upper())
    command = [sys.executable, "-m", "flipctr.cli", "train", "--dataset", args.dataset, "--model", args.model,
               "--run-dir", str(run_dir), "--set", f"train.seed={args.seed}", "--set", "train.progress=false",
               "--set", f"train.deterministic={str(deterministic).lower()}"]
    if not (run_dir / "metrics.json").exists():
        tick = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        print(f"[determinism] {run_dir.name}: {time.perf_counter() - tick:.0f} s", file=sys.stderr)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    arithmetic = json.loads((run_dir / "environment.json").read_text())["arithmetic"]
    return {"setting": "deterministic" if deterministic else "default", "cap": cap,
            "command": " ".join(command[1:]), "test": metrics["test"], "valid": metrics["valid"],
            "valid_auc_per_epoch": [e["auc"] for h in metrics["history"] for e in h["evals"]],
            "best_epoch": metrics["best_epoch"], "wall_seconds": metrics.get("wall_seconds"),
            "train_samples_per_second": metrics.get("train_samples_per_second"), "arithmetic": arithmetic}


def render(result: dict) -> str:
    lines = [f"# Which digits hold where: {result['model']} on {result['dataset']}, seed {result['seed']}", "",
             "Command: `" + result["command"] + "`", "",
             "| setting | cap | kernels (ATen) | autocast | MKL branch | test AUC | test Logloss | valid AUC per epoch "
             "| train rows/s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        a = r["arithmetic"]
        lines.append(f"| {r['setting']} | {r['cap']} | {a['cpu_capability']} | {a['autocast']} | {a['mkl_cbwr_branch']} "
                     f"| {r['test']['auc']!r} | {r['test']['logloss']!r} | "
                     f"{', '.join(f'{x:.6f}' for x in r['valid_auc_per_epoch'])} | "
                     f"{r['train_samples_per_second']:.0f} | {r['wall_seconds']} |")
    lines += [""]
    for setting, same in result["same_digits"].items():
        lines.append(f"- `{setting}`: the caps gave {'the SAME' if same else 'DIFFERENT'} digits.")
    if result.get("deterministic_cost") is not None:
        lines.append(f"- The deterministic setting's training speed: {result['deterministic_cost']:.2f}x the default's "
                     "(train rows/s, both at the machine's own cap).")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--model", default="dcnv2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--caps", nargs="+", default=["machine", "avx2"])
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/determinism"))
    parser.add_argument("--note", default="", help="what else the reader should know (load, machine)")
    args = parser.parse_args()
    runs = [run_once(args, deterministic, cap, args.runs) for deterministic in (False, True) for cap in args.caps]
    same = {}
    for setting in ("default", "deterministic"):
        mine = [r for r in runs if r["setting"] == setting]
        same[setting] = all((r["test"], r["valid_auc_per_epoch"]) == (mine[0]["test"], mine[0]["valid_auc_per_epoch"])
                            for r in mine)
    speed = {r["setting"]: r["train_samples_per_second"] for r in runs if r["cap"] == args.caps[0]}
    result = {"dataset": args.dataset, "model": args.model, "seed": args.seed, "caps": args.caps,
              "command": "python benchmarks/determinism.py " + " ".join(sys.argv[1:]), "runs": runs,
              "same_digits": same, "deterministic_cost": speed["deterministic"] / speed["default"], "note": args.note}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "determinism.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "determinism.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
