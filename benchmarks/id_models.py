"""Train ID-based models on real data and compare with the paper's numbers.

    python benchmarks/id_models.py [--datasets ml-1m bookcrossing] [--models dcnv2 deepfm autoint]
                                   [--seeds 2024] [--set key=value ...]

Writes ``benchmarks/results/id_models.{json,md}``. Raw data must have been fetched
(``flipctr data get NAME``). Clean protocol (selection on validation, refit on train+valid)
unless ``--set train.protocol=paper``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from flipctr.config import load_config
from flipctr.training.runner import train_run
from flipctr.utils import environment_info, write_json, write_text

# Paper, Table 2 (test AUC / Logloss; the paper selects on test).
PAPER = {
    ("ml-1m", "dcnv2"): (0.8548, 0.3893), ("ml-1m", "deepfm"): (0.8539, 0.3905),
    ("ml-1m", "autoint"): (0.8509, 0.4013),
    ("bookcrossing", "dcnv2"): (0.7956, 0.5103), ("bookcrossing", "deepfm"): (0.7947, 0.5122),
    ("bookcrossing", "autoint"): (0.7953, 0.5118),
}
RESULTS = Path(__file__).resolve().parent / "results"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "bookcrossing"])
    parser.add_argument("--models", nargs="+", default=["dcnv2", "deepfm", "autoint"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2024])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/id_models"))
    parser.add_argument("--name", default="id_models", help="results file stem")
    args = parser.parse_args()

    rows = []
    for dataset in args.datasets:
        for model in args.models:
            runs = []
            for seed in args.seeds:
                cfg = load_config(None, [*args.overrides, f"model.name={model}", f"train.seed={seed}",
                                         "train.progress=false"])
                cfg.data.dataset = dataset
                start = time.perf_counter()
                metrics = train_run(cfg, args.runs / f"{dataset}-{model}-{seed}")
                metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
                runs.append(metrics)
            auc = _mean_std([m["test"]["auc"] for m in runs])
            logloss = _mean_std([m["test"]["logloss"] for m in runs])
            before = [m["test_before_refit"]["auc"] for m in runs if m.get("test_before_refit")]
            rows.append({
                "dataset": dataset, "model": model, "protocol": runs[0]["protocol"],
                "selected_on": runs[0]["selected_on"], "seeds": args.seeds,
                "test_auc_mean": auc[0], "test_auc_std": auc[1],
                "test_logloss_mean": logloss[0], "test_logloss_std": logloss[1],
                "test_auc_before_refit_mean": statistics.fmean(before) if before else None,
                "valid_auc_mean": statistics.fmean([m["valid"]["auc"] for m in runs]) if runs[0]["valid"] else None,
                "best_epoch": [m["best_epoch"] for m in runs],
                "wall_seconds_mean": statistics.fmean([m["wall_seconds"] for m in runs]),
                "train_samples_per_second_mean": statistics.fmean([m["train_samples_per_second"] for m in runs]),
                "paper_auc": PAPER.get((dataset, model), (None, None))[0],
                "paper_logloss": PAPER.get((dataset, model), (None, None))[1],
                "runs": [{k: v for k, v in m.items() if k != "history"} for m in runs],
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), file=sys.stderr)
    report = {"command": " ".join(sys.argv), "overrides": args.overrides,
              "environment": environment_info(), "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", report)
    write_text(RESULTS / f"{args.name}.md", render(report))
    print(render(report))


def render(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# ID-based models: measured vs paper",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu_count']} CPU threads, torch {env['torch']}, {env['platform']}",
        "",
        "| dataset | model | protocol | test AUC | test Logloss | AUC before refit | valid AUC | paper AUC / Logloss (selected on test) | best epoch | wall s | train rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        pm = "±"
        auc = f"{r['test_auc_mean']:.4f} {pm} {r['test_auc_std']:.4f}" if len(r["seeds"]) > 1 else f"{r['test_auc_mean']:.4f}"
        ll = f"{r['test_logloss_mean']:.4f} {pm} {r['test_logloss_std']:.4f}" if len(r["seeds"]) > 1 else f"{r['test_logloss_mean']:.4f}"
        before = f"{r['test_auc_before_refit_mean']:.4f}" if r["test_auc_before_refit_mean"] else "—"
        valid = f"{r['valid_auc_mean']:.4f}" if r["valid_auc_mean"] else "—"
        paper = f"{r['paper_auc']} / {r['paper_logloss']}" if r["paper_auc"] else "—"
        proto = r["protocol"] + (" (selected on test)" if r["selected_on"] == "test" else "")
        lines.append(f"| {r['dataset']} | {r['model']} | {proto} | {auc} | {ll} | {before} | {valid} | {paper} | "
                     f"{r['best_epoch']} | {r['wall_seconds_mean']:.0f} | {r['train_samples_per_second_mean']:.0f} |")
    lines += ["", f"Seeds: {report['results'][0]['seeds'] if report['results'] else []}. "
              "Test AUC/Logloss from scikit-learn. `clean`: epochs chosen on validation AUC, then refit on "
              "train+valid for that many epochs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
