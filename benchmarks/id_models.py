"""Train the ID-based models on real data and compare with the paper's Table 2.

    python benchmarks/id_models.py [--datasets ml-1m bookcrossing] [--models dcnv2 deepfm ...]
                                   [--seeds 1 2 3] [--set key=value ...]

Clean protocol (epochs chosen on validation AUC, refit on train+valid, test once) unless
``--set train.protocol=paper``. Each (dataset, model, seed) run keeps its folder under
``--runs``; a run whose ``metrics.json`` exists with the same resolved config is read back, not
trained again, so the table can be grown over several calls (e.g. more seeds for some models).
Rows of ``benchmarks/results/<name>.{json,md}`` are merged by (dataset, model): a call replaces
the rows it ran and keeps the others. Raw data must have been fetched (``flipctr data get NAME``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from flipctr.config import load_config
from flipctr.models.backbones import MODELS
from flipctr.paper import table2
from flipctr.runs.protocol import train_run
from flipctr.runtime.environment import environment_info
from flipctr.utils import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
ALL_MODELS = ["afm", "pnn", "widedeep", "dcn", "deepfm", "xdeepfm", "afn", "autoint", "dcnv2"]  # Table 2 order


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _run(cfg, run_dir: Path) -> dict:
    """Train, or read back a finished run of the same resolved config."""
    done = run_dir / "metrics.json"
    if done.exists() and (run_dir / "config.yaml").exists():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        wanted = cfg.to_dict()
        if all(saved.get(s, {}).get(k) == v for s in ("model", "train") for k, v in wanted[s].items()
               if k not in ("progress", "lr", "eval_batch_size")) and saved["data"]["dataset"] == cfg.data.dataset:
            print(f"[id_models] reusing {run_dir}", file=sys.stderr)
            return json.loads(done.read_text())
    return train_run(cfg, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "bookcrossing"])
    parser.add_argument("--models", nargs="+", default=ALL_MODELS, choices=sorted([*MODELS, "morec", "ctr_bert"]),
                        help="ID backbones; morec, ctr_bert (with their own --name; frozen encoder: "
                             "--set model.plm_trainable_layers=0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/id_models"))
    parser.add_argument("--name", default="id_models", help="results file stem")
    args = parser.parse_args()

    path = RESULTS / f"{args.name}.json"
    report = json.loads(path.read_text()) if path.exists() else {"results": [], "commands": []}
    if report.get("overrides", []) != args.overrides and report["results"]:
        raise SystemExit(f"{path} holds runs made with overrides {report.get('overrides')}; "
                         f"use another --name for {args.overrides}")
    for dataset in args.datasets:
        for model in args.models:
            runs = []
            for seed in args.seeds:
                cfg = load_config(None, [*args.overrides, f"data.dataset={dataset}", f"model.name={model}",
                                         f"train.seed={seed}", "train.progress=false"])
                runs.append(_run(cfg, args.runs / f"{dataset}-{model}-{seed}"))
            auc = _mean_std([m["test"]["auc"] for m in runs])
            logloss = _mean_std([m["test"]["logloss"] for m in runs])
            paper = table2(dataset, model)
            row = {
                "dataset": dataset, "model": model, "protocol": runs[0]["protocol"],
                "selected_on": runs[0]["selected_on"], "seeds": args.seeds,
                "test_auc_mean": auc[0], "test_auc_std": auc[1],
                "test_logloss_mean": logloss[0], "test_logloss_std": logloss[1],
                "valid_auc_mean": statistics.fmean([m["valid"]["auc"] for m in runs]) if runs[0]["valid"] else None,
                "best_epoch": [m["best_epoch"] for m in runs],
                "wall_seconds_mean": statistics.fmean([m["wall_seconds"] for m in runs]),
                "train_samples_per_second_mean": statistics.fmean([m["train_samples_per_second"] for m in runs]),
                "paper_auc": paper[0] if paper else None, "paper_logloss": paper[1] if paper else None,
                "runs": [{k: v for k, v in m.items() if k != "history"} for m in runs],
            }
            report["results"] = [r for r in report["results"] if (r["dataset"], r["model"]) != (dataset, model)]
            report["results"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr)
            _save(report, args, path)
    print(render(report))


def _save(report: dict, args: argparse.Namespace, path: Path) -> None:
    command = " ".join(["python", "benchmarks/id_models.py", *sys.argv[1:]])
    report.update(overrides=args.overrides, environment=environment_info(),
                  commands=list(dict.fromkeys([*report.get("commands", []), command])))
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    report["results"].sort(key=lambda r: (r["dataset"] != "ml-1m", r["dataset"], order.get(r["model"], 99)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    write_text(path.with_suffix(".md"), render(report))


def metric_cells(r: dict) -> tuple[str, str, str, str, str]:
    """A result row's table cells: test AUC, test Logloss (± std over several seeds), valid AUC,
    the paper's AUC / Logloss and the AUC gap to it."""
    several = len(r["seeds"]) > 1
    auc = f"{r['test_auc_mean']:.4f}" + (f" ± {r['test_auc_std']:.4f}" if several else "")
    ll = f"{r['test_logloss_mean']:.4f}" + (f" ± {r['test_logloss_std']:.4f}" if several else "")
    valid = f"{r['valid_auc_mean']:.4f}" if r["valid_auc_mean"] else "—"
    paper = f"{r['paper_auc']} / {r['paper_logloss']}" if r["paper_auc"] else "—"
    gap = f"{r['test_auc_mean'] - r['paper_auc']:+.4f}" if r["paper_auc"] else "—"
    return auc, ll, valid, paper, gap


def render(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# {'ID-based models' if report['results'] and all(r['model'] in MODELS for r in report['results']) else 'Models'}"
        ": measured vs paper Table 2",
        "",
        "Commands:", "", *[f"    {c}" for c in report["commands"]], "",
        f"Machine: {env['cpu_count']} CPU threads, torch {env['torch']}, {env['platform']}",
        "",
        "| dataset | model | seeds | test AUC | test Logloss | valid AUC | paper AUC / Logloss (selected on test) "
        "| AUC − paper | best epoch | wall s | train rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        auc, ll, valid, paper, gap = metric_cells(r)
        proto = "" if r["selected_on"] == "valid" else " (selected on test)"
        lines.append(f"| {r['dataset']}{proto} | {r['model']} | {len(r['seeds'])} | {auc} | {ll} | {valid} | {paper} | "
                     f"{gap} | {r['best_epoch']} | {r['wall_seconds_mean']:.0f} | "
                     f"{r['train_samples_per_second_mean']:.0f} |")
    lines += ["", "Test AUC/Logloss from scikit-learn, mean ± std over seeds. Protocol `clean`: epochs chosen "
              "on validation AUC, then refit on train+valid for that many epochs; test evaluated once.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
