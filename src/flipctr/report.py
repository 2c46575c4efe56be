"""Rendering of run results as Markdown tables."""

from __future__ import annotations


def render_results(report: dict) -> str:
    names = {"scratch": f"{report['backbone']} (from scratch)", "flip_id": "FLIP_ID", "flip_plm": "FLIP_PLM",
             "flip": "FLIP"}
    lines = [f"# FLIP on {report['dataset']} (profile {report['profile']}, {report['backbone']} + {report['plm']})",
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
              f"total {report['wall_seconds']:.0f} s. Selection on validation; test evaluated once per model.", ""]
    return "\n".join(lines)
