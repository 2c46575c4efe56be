"""The paper's ID+PLM and PLM baselines beside its Table 2, at the `cpu` profile's scale.

    python benchmarks/baselines.py [--datasets ml-1m] [--models morec ctrl ctr_bert ptab plm]
                                   [--seeds 1 2 3] [--runs DIR] [--name baselines_cpu]

- ``morec``: DCNv2 + each item's text (frozen MiniLM, one vector per distinct item) as a field.
- ``ctrl``: FLIP's pretraining with ICL alone, then DCNv2 finetuned alone (``flipctr run --method
  ctrl``); its runs also give DCNv2 from scratch with the same seeds, reported as ``dcnv2 (ctrl
  runs)`` and used for the paired CTRL − DCNv2 differences.
- ``ctr_bert``: two text towers (user fields, item fields; frozen MiniLM, one vector per distinct
  user / item), late fusion by an MLP.
- ``ptab``: token-level MLM of the prompts with the language model trained, then the language
  model finetuned for CTR (``flipctr run --method ptab``), with the reductions of ``PTAB`` below.
- ``plm``: PTab's control, the same finetuning without the MLM stage.

Every run is the `cpu` profile plus the settings named here; a finished run folder under
``--runs`` is read back, not trained again. Rows of ``benchmarks/results/<name>.{json,md}`` are
merged by (dataset, model). Model selection on validation; test evaluated once per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from flipctr.paper import table2
from flipctr.profiles import profile_config
from flipctr.runs.flip import run_flip
from flipctr.runs.recipes import METHODS
from flipctr.runs.protocol import train_run
from flipctr.runtime.environment import environment_info
from flipctr.utils import write_json, write_text
from id_models import _mean_std, metric_cells  # benchmarks/ is the script's folder

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["dcnv2 (ctrl runs)", "morec", "ctrl", "ctr_bert", "plm", "ptab"]
# A trained MiniLM costs ~25 rows/s forward+backward on a 2-core CPU in fp32 (~100 rows/s forward):
# MLM on 10k rows for one epoch, then finetuning on the last 5k training rows for at most two epochs
# (selected on the last 2k validation rows, no refit), batches of 32 for enough steps; test is whole.
PTAB = ["model.plm_trainable_layers=null", "pretrain.rows=10000", "pretrain.epochs=1", "pretrain.batch_size=64",
        "pretrain.lr=1e-4", "text_finetune.lr=5e-5", "text_finetune.batch_size=32",
        "text_finetune.train_rows=5000", "text_finetune.valid_rows=2000", "text_finetune.epochs=2",
        "text_finetune.refit=false"]
SETTINGS = {"morec": ["model.name=morec"], "ctr_bert": ["model.name=ctr_bert"], "ctrl": METHODS["ctrl"].overrides(),
            "ptab": [*METHODS["ptab"].overrides(), *PTAB], "plm": [*PTAB, "pretrain.epochs=0"]}


def run_model(model: str, dataset: str, seed: int, runs: Path) -> dict[str, dict]:
    """One seed of ``model``: the metrics of each model it reports (``ctrl`` also reports DCNv2)."""
    cfg = profile_config("cpu", [*SETTINGS[model], f"data.dataset={dataset}", f"train.seed={seed}",
                                 f"pretrain.seed={seed}", "train.progress=false", "pretrain.progress=false"])
    folder = runs / f"{dataset}-{model}-{seed}"
    if model in ("morec", "ctr_bert"):
        return {model: train_run(cfg, folder, resume=True)}
    method = {"ctrl": "ctrl", "ptab": "ptab"}.get(model, "flip")
    variants = ("scratch", "flip_id") if model == "ctrl" else ("flip_plm",)
    report = run_flip(cfg, folder, variants, resume=True, profile="cpu", method=method)
    results, pretrain = report["results"], {"pretrain_seconds": report["pretrain_seconds"]}
    if model == "ctrl":
        return {"ctrl": {**results["flip_id"], **pretrain}, "dcnv2 (ctrl runs)": results["scratch"]}
    return {model: {**results["flip_plm"], **pretrain}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m"])
    parser.add_argument("--models", nargs="+", default=["morec", "ctrl", "ctr_bert", "ptab", "plm"],
                        choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/baselines"))
    parser.add_argument("--name", default="baselines_cpu", help="results file stem")
    args = parser.parse_args()

    path = RESULTS / f"{args.name}.json"
    report = json.loads(path.read_text()) if path.exists() else {"results": [], "commands": []}
    for dataset in args.datasets:
        for model in args.models:
            per_seed = [run_model(model, dataset, seed, args.runs) for seed in args.seeds]
            for name in per_seed[0]:
                runs = [{k: v for k, v in seeds[name].items() if k != "history"} for seeds in per_seed]
                row = _row(dataset, name, args.seeds, runs, SETTINGS[model])
                if name == "ctrl":
                    base = [seeds["dcnv2 (ctrl runs)"]["test"]["auc"] for seeds in per_seed]
                    diffs = [r["test"]["auc"] - b for r, b in zip(runs, base)]
                    row["paired_vs_dcnv2"] = {"auc_diff_mean": statistics.fmean(diffs),
                                              "auc_diff_per_seed": diffs, "seeds_better": sum(d > 0 for d in diffs)}
                report["results"] = [r for r in report["results"] if (r["dataset"], r["model"]) != (dataset, name)]
                report["results"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr)
            _save(report, path)
    print(render(report))


def _row(dataset: str, model: str, seeds: list[int], runs: list[dict], settings: list[str]) -> dict:
    auc = _mean_std([m["test"]["auc"] for m in runs])
    logloss = _mean_std([m["test"]["logloss"] for m in runs])
    paper = table2(dataset, "dcnv2" if model.startswith("dcnv2") else model)
    return {"dataset": dataset, "model": model, "protocol": runs[0]["protocol"], "selected_on": runs[0]["selected_on"],
            "seeds": seeds, "settings": ["cpu profile", *settings], "test_auc_mean": auc[0], "test_auc_std": auc[1],
            "test_logloss_mean": logloss[0], "test_logloss_std": logloss[1],
            "valid_auc_mean": statistics.fmean([m["valid"]["auc"] for m in runs]) if runs[0]["valid"] else None,
            "best_epoch": [m["best_epoch"] for m in runs],
            "wall_seconds_mean": statistics.fmean([m["wall_seconds"] + m.get("pretrain_seconds", 0) for m in runs]),
            "train_samples_per_second_mean": statistics.fmean([m["train_samples_per_second"] for m in runs]),
            "paper_auc": paper[0] if paper else None, "paper_logloss": paper[1] if paper else None, "runs": runs}


def _save(report: dict, path: Path) -> None:
    command = " ".join(["python", "benchmarks/baselines.py", *sys.argv[1:]])
    report.update(environment=environment_info(), commands=list(dict.fromkeys([*report.get("commands", []), command])))
    report.pop("overrides", None)
    order = {m: i for i, m in enumerate(ORDER)}
    report["results"].sort(key=lambda r: (r["dataset"] != "ml-1m", r["dataset"], order.get(r["model"], 99)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    write_text(path.with_suffix(".md"), render(report))


def render(report: dict) -> str:
    env = report["environment"]
    lines = ["# Baselines (ID+PLM, PLM) at the `cpu` scale vs paper Table 2", "", "Commands:", "",
             *[f"    {c}" for c in report["commands"]], "",
             f"Machine: {env['cpu_count']} CPU threads, torch {env['torch']}, {env['platform']}", "",
             "| dataset | model | seeds | test AUC | test Logloss | valid AUC | paper AUC / Logloss (selected on test) "
             "| AUC − paper | wall s (incl. pretraining) | settings beyond the cpu profile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        auc, ll, valid, paper, gap = metric_cells(r)
        settings = ", ".join(f"`{s}`" for s in r.get("settings", [])[1:]) or "—"
        lines.append(f"| {r['dataset']} | {r['model']} | {len(r['seeds'])} | {auc} | {ll} | {valid} | {paper} | {gap} | "
                     f"{r['wall_seconds_mean']:.0f} | {settings} |")
    paired = [r for r in report["results"] if "paired_vs_dcnv2" in r]
    for r in paired:
        p = r["paired_vs_dcnv2"]
        lines += ["", f"{r['dataset']}: CTRL − DCNv2 from scratch (same seeds, paired): {p['auc_diff_mean']:+.4f} AUC "
                  f"({p['seeds_better']} of {len(p['auc_diff_per_seed'])} seeds better)."]
    lines += ["", "Test AUC/Logloss from scikit-learn, mean ± std over seeds. Selection on validation AUC "
              "(the text models: on their validation subset); test evaluated once per model. The paper selected "
              "on test and trained its language models fully on a GPU.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
