"""FLIP with the `cpu` profile, over several seeds.

    python benchmarks/flip_cpu.py [--dataset ml-1m|bookcrossing] [--seeds 1 2 3] [--profile cpu]
                                  [--set key=value ...]

Each seed runs ``flipctr run`` (pretraining included; the seed drives pretraining and every
finetuning); stages an earlier call finished are read back from the run folder, so seeds can be
added one call at a time. Writes ``benchmarks/results/flip_<ml1m|bx>_cpu.{json,md}``: the
backbone from scratch vs FLIP_ID vs FLIP_PLM vs FLIP, test AUC / Logloss mean ± std, paired
differences.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from flipctr.paper import table2
from flipctr.profiles import profile_config
from flipctr.runs.flip import run_flip
from flipctr.runs.recipes import VARIANTS
from flipctr.runtime.environment import environment_info
from flipctr.utils import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {"ml-1m": "ml1m", "bookcrossing": "bx"}
NAMES = {"scratch": "DCNv2 (from scratch)", "flip_id": "FLIP_ID", "flip_plm": "FLIP_PLM", "flip": "FLIP"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/flip"))
    parser.add_argument("--name", help="results file stem (default flip_<dataset>_<profile>)")
    args = parser.parse_args()
    args.name = args.name or f"flip_{SHORT.get(args.dataset, args.dataset)}_{args.profile}"

    reports = []
    for seed in args.seeds:
        cfg = profile_config(args.profile, [*args.overrides, f"data.dataset={args.dataset}",
                                            f"train.seed={seed}", f"pretrain.seed={seed}",
                                            "train.progress=false", "pretrain.progress=false"])
        reports.append(run_flip(cfg, args.runs / f"{args.dataset}-{args.profile}-seed{seed}", resume=True,
                                profile=args.profile))
    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    rows = []
    for variant in VARIANTS:
        aucs = [r["results"][variant]["test"]["auc"] for r in reports]
        lls = [r["results"][variant]["test"]["logloss"] for r in reports]
        valid = [r["results"][variant]["valid"]["auc"] for r in reports]
        rows.append({"variant": variant, "test_auc_mean": statistics.fmean(aucs), "test_auc_std": sd(aucs),
                     "test_logloss_mean": statistics.fmean(lls), "test_logloss_std": sd(lls),
                     "valid_auc_mean": statistics.fmean(valid), "test_auc_per_seed": aucs,
                     "paper": table2(args.dataset, variant)})
    paired = []  # per-seed differences: the seed is shared, so these are paired comparisons
    # valid AUCs compare only where both models select on the whole validation split
    for better, base, splits in (("flip_id", "scratch", ("valid", "test")), ("flip", "flip_id", ("test",)),
                                 ("flip", "scratch", ("test",))):
        for split in splits:
            diffs = [r["results"][better][split]["auc"] - r["results"][base][split]["auc"] for r in reports]
            paired.append({"comparison": f"{better} - {base}", "split": split, "auc_diff_mean": statistics.fmean(diffs),
                           "auc_diff_std": sd(diffs), "auc_diff_per_seed": diffs,
                           "seeds_better": sum(d > 0 for d in diffs)})
    report = {"command": " ".join(sys.argv), "dataset": args.dataset, "profile": args.profile, "seeds": args.seeds,
              "overrides": args.overrides, "environment": environment_info(),
              "wall_seconds_per_seed": [r["wall_seconds"] for r in reports],
              "pretrain_seconds_per_seed": [r["pretrain_seconds"] for r in reports],
              "prompts": reports[0].get("prompts"), "results": rows,
              "paired": paired}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", report)
    write_text(RESULTS / f"{args.name}.md", render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = [f"# FLIP on {report.get('dataset', 'ml-1m')}, profile `{report['profile']}`, seeds {report['seeds']}", "",
             f"Command: `{report['command']}`  ",
             f"Time per seed (s; pretraining + the four finetunings): {report['wall_seconds_per_seed']}; "
             f"pretraining (s): {report['pretrain_seconds_per_seed']}", ""]
    prompts = report.get("prompts")
    if prompts:
        lines += [f"Prompts: {prompts['tokens_mean']:.1f} tokens on average (p95 {prompts['tokens_p95']:.0f}, "
                  f"max {prompts['tokens_max']}); at max_length {prompts['max_length']}, "
                  f"{prompts['samples_truncated']} of {prompts['samples']} samples lost "
                  f"{prompts['fields_lost']} field values to truncation.", ""]
    lines += [
             "| model | test AUC | test Logloss | valid AUC | AUC per seed | paper AUC / Logloss (selected on test) |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        paper = f"{r['paper'][0]} / {r['paper'][1]}" if r["paper"] else "—"
        lines.append(f"| {NAMES[r['variant']]} | {r['test_auc_mean']:.4f} ± {r['test_auc_std']:.4f} | "
                     f"{r['test_logloss_mean']:.4f} ± {r['test_logloss_std']:.4f} | {r['valid_auc_mean']:.4f} | "
                     f"{', '.join(f'{a:.4f}' for a in r['test_auc_per_seed'])} | {paper} |")
    lines += ["", "Paired AUC differences (same seed):", "",
              "| comparison | split | mean ± std | per seed | seeds better |", "|---|---|---|---|---|"]
    for p in report.get("paired", []):
        lines.append(f"| {p['comparison']} | {p['split']} | {p['auc_diff_mean']:+.4f} ± {p['auc_diff_std']:.4f} | "
                     f"{', '.join(f'{d:+.4f}' for d in p['auc_diff_per_seed'])} | "
                     f"{p['seeds_better']}/{len(p['auc_diff_per_seed'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
