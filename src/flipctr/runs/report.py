"""Reports of finished runs: Markdown and CSV tables, figures (``flipctr report``).

``flipctr report RUN_DIR... --out DIR`` reads run folders (a ``flipctr train`` folder, or a
``flipctr run`` folder, which stands for its four finetuned models), groups runs that differ
only by their seed, and writes ``report.md`` and ``report.csv`` (mean ± std over seeds, the
paper's Table 2 beside them), ``test_auc.png`` (test AUC per model with error bars against the
paper) and ``curves.png`` (validation AUC and training loss per epoch of every run).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

from ..paper import table2
from ..runtime.folder import RunFolder
from ..utils import atomic_path, write_text

VARIANT_NAMES = {"scratch": "from scratch", "flip_id": "FLIP_ID", "flip_plm": "FLIP_PLM", "flip": "FLIP"}
# settings that do not change what a run computes, or that tell seeds apart
_NOT_IDENTITY = {("train", "seed"), ("train", "progress"), ("train", "device"), ("train", "threads"),
                 ("pretrain", "progress"), ("pretrain", "seed")}


def variant_name(variant: str, report: dict) -> str:
    """How a ``flipctr run`` report names a finetuned model (a baseline method names its own, e.g.
    CTRL for the ID model after ICL-only alignment)."""
    return report.get("names", {}).get(variant) or VARIANT_NAMES[variant]


def find_runs(paths: list[Path]) -> list[dict]:
    """One record per finished model under ``paths``: dataset, model, seed, metrics, history."""
    runs = []
    for folder in map(RunFolder, paths):
        if folder.results.exists():  # a FLIP run: its finetuned models
            report = folder.read_results()
            for variant in report["results"]:
                run = _read(folder.variant(variant))
                name = report["backbone"] if variant == "scratch" else variant_name(variant, report)
                runs.append({**run, "model": name, "paper": report["paper"].get(variant),
                             "identity": f"{run['identity']}|{variant}|{_identity(folder)}"})
        elif folder.finished:
            run = _read(folder)
            runs.append({**run, "paper": table2(run["dataset"], run["model"])})
        else:
            raise FileNotFoundError(f"{folder.path}: neither metrics.json nor results.json "
                                    "(not a finished run folder)")
    return runs


def _identity(folder: RunFolder) -> str:
    cfg = folder.read_config_dict()
    kept = {f"{s}.{k}": v for s, section in cfg.items() if isinstance(section, dict)
            for k, v in section.items() if (s, k) not in _NOT_IDENTITY}
    return json.dumps(kept, sort_keys=True, default=str)


def _read(folder: RunFolder) -> dict:
    metrics, cfg = folder.read_metrics(), folder.read_config_dict()
    return {"folder": str(folder.path), "dataset": metrics.get("dataset", cfg["data"]["dataset"]),
            "model": metrics.get("model", cfg["model"]["name"]), "seed": cfg["train"]["seed"],
            "protocol": metrics["protocol"], "selected_on": metrics["selected_on"], "test": metrics["test"],
            "valid": metrics.get("valid"), "history": metrics.get("history", []), "identity": _identity(folder)}


def group_runs(runs: list[dict]) -> list[dict]:
    """Runs that differ only by seed, as one row: mean ± std of test AUC / Logloss."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["identity"], []).append(run)
    rows = []
    for members in groups.values():
        auc = [m["test"]["auc"] for m in members]
        logloss = [m["test"]["logloss"] for m in members]
        first = members[0]
        rows.append({"dataset": first["dataset"], "model": first["model"], "protocol": first["protocol"],
                     "selected_on": first["selected_on"], "seeds": sorted(m["seed"] for m in members),
                     "test_auc_mean": statistics.fmean(auc), "test_auc_std": _std(auc),
                     "test_logloss_mean": statistics.fmean(logloss), "test_logloss_std": _std(logloss),
                     "paper_auc": first["paper"][0] if first["paper"] else None,
                     "paper_logloss": first["paper"][1] if first["paper"] else None,
                     "folders": [m["folder"] for m in members]})
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def render_table(rows: list[dict]) -> str:
    lines = ["| dataset | model | seeds | test AUC | test Logloss | paper AUC / Logloss (selected on test) | AUC − paper |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        several = len(r["seeds"]) > 1
        auc = f"{r['test_auc_mean']:.4f}" + (f" ± {r['test_auc_std']:.4f}" if several else "")
        ll = f"{r['test_logloss_mean']:.4f}" + (f" ± {r['test_logloss_std']:.4f}" if several else "")
        paper = f"{r['paper_auc']} / {r['paper_logloss']}" if r["paper_auc"] else "—"
        gap = f"{r['test_auc_mean'] - r['paper_auc']:+.4f}" if r["paper_auc"] else "—"
        proto = "" if r["selected_on"] == "valid" else " (selected on test)"
        lines.append(f"| {r['dataset']}{proto} | {r['model']} | {len(r['seeds'])} | {auc} | {ll} | {paper} | {gap} |")
    return "\n".join(lines) + "\n"


def write_report(paths: list[Path], out: Path) -> list[dict]:
    """``report.md``, ``report.csv``, ``test_auc.png`` and ``curves.png`` of the runs in ``paths``."""
    runs = find_runs(paths)
    rows = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", "# Runs\n\n" + render_table(rows) + "\nMean ± std over seeds; test AUC/Logloss "
               "from scikit-learn. Runs: " + ", ".join(f"`{r['folder']}`" for r in runs) + "\n")
    frame = pd.DataFrame([{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()}
                          for r in rows])
    with atomic_path(out / "report.csv") as tmp:
        frame.to_csv(tmp, index=False)
    _plot_auc(rows, out / "test_auc.png")
    _plot_curves(runs, out / "curves.png")
    return rows


def _plot_auc(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 4))
    x = range(len(rows))
    ax.errorbar(x, [r["test_auc_mean"] for r in rows], yerr=[r["test_auc_std"] for r in rows], fmt="o",
                capsize=4, label="measured (mean ± std over seeds)")
    papers = [(i, r["paper_auc"]) for i, r in enumerate(rows) if r["paper_auc"]]
    if papers:
        ax.scatter(*zip(*papers), marker="x", color="black", label="paper (selected on test)")
    ax.set_xticks(list(x), [f"{r['dataset']}\n{r['model']}" for r in rows], fontsize=8)
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (auc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        label = f"{run['dataset']} {run['model']} seed {run['seed']}"
        evals = [e for record in run["history"] for e in record.get("evals", [])]
        if evals:
            auc_ax.plot([e["epoch"] for e in evals], [e["auc"] for e in evals], marker="o", label=label)
        loss_ax.plot([r["epoch"] for r in run["history"]], [r["train_loss"] for r in run["history"]], marker="o",
                     label=label)
    auc_ax.set(xlabel="epoch", ylabel="validation AUC")
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    loss_ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def render_results(report: dict) -> str:
    names = {v: variant_name(v, report) for v in report["results"]}
    names["scratch"] = f"{report['backbone']} (from scratch)"
    lines = [f"# {report.get('title', 'FLIP')} on {report['dataset']} (profile {report['profile']}, {report['backbone']} + {report['plm']})",
             "", "| model | test AUC | test Logloss | valid AUC | paper AUC / Logloss (selected on test) |",
             "|---|---|---|---|---|"]
    for variant, m in report["results"].items():
        paper = report["paper"].get(variant)
        valid = f"{m['valid']['auc']:.4f}" if m.get("valid") else "—"
        lines.append(f"| {names[variant]} | {m['test']['auc']:.4f} | {m['test']['logloss']:.4f} | {valid} | "
                     f"{f'{paper[0]} / {paper[1]}' if paper else '—'} |")
    if "alpha" in report["results"].get("flip", {}):
        lines += ["", f"FLIP's α (weight of the ID side) after training: {report['results']['flip']['alpha']:.3f}."]
    lines += ["", f"Pretrained: {report['pretrained']} ({report['pretrain_seconds']:.0f} s); "
              f"total {report['wall_seconds']:.0f} s. Selection on validation; test evaluated once per model."]
    budgets = {k: v for k, v in report.get("max_seconds", {}).items() if v is not None}
    if budgets:
        cut = [names[v] for v, m in report["results"].items() if "budget" in (m.get("stopped"), m.get("refit_stopped"))]
        lines += ["", "Time budgets (s): " + ", ".join(f"{k} {v:g}" for k, v in budgets.items())
                  + f"; refit {'on' if report['refit']['id'] else 'off'} (ID models), "
                  f"{'on' if report['refit']['text'] else 'off'} (text models). "
                  + (f"Stopped by their budget: {', '.join(cut)}." if cut else "No finetuning was stopped by its budget.")]
    missing = [v for v in report.get("variants", []) if v not in report["results"]]
    if missing:
        lines += ["", f"Not finished (yet): {', '.join(missing)}."]
    lines.append("")
    return "\n".join(lines)
