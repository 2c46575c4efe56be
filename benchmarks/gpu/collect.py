"""What a one-shot run brought back, as one benchmark result:

    python benchmarks/gpu/collect.py OUT_DIR --name flip_ml1m_gpu [--command "..."] [--note "..."]

reads ``OUT_DIR`` (``results.json``, ``run.tar.gz``, ``oneshot.log``, as
``benchmarks/gpu/oneshot.sh`` leaves them; the device is the run's ``environment.json``) and writes ``benchmarks/results/NAME.{json,md}``:
the device, the command, the budgets, pretraining's loss per objective, rows/s and peak GPU
memory per epoch, each stage's time and how it ended, the four models' test AUC / Logloss with
the paper's numbers beside them. It reports what is there: a model the run did not finish is
listed as such.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _archive(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def collect(out: Path, command: str | None = None, note: str | None = None) -> dict:
    report = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    files = _archive(out / "run.tar.gz")
    environment = json.loads(files.get("run/environment.json", b"{}"))
    stages = {}
    for variant in report.get("variants", []):
        metrics = json.loads(files.get(f"run/{variant}/metrics.json", b"null"))
        stages[variant] = None if metrics is None else {
            key: metrics.get(key) for key in ("test", "valid", "best_epoch", "epochs", "stopped", "fit_seconds",
                                              "wall_seconds", "max_seconds", "train_samples_per_second", "alpha")
            if key in metrics}
    log = (out / "oneshot.log").read_text() if (out / "oneshot.log").exists() else ""
    ended = re.findall(r"run ended with status (\d+).*?(\d+) s in all", log)
    return {
        "device": environment.get("device"), "gpu": environment.get("gpu"),
        "versions": {k: environment.get(k) for k in ("torch", "transformers", "python") if k in environment},
        "command": command, "note": note, "dataset": report.get("dataset"), "profile": report.get("profile"),
        "complete": report.get("complete", False), "refit": report.get("refit"),
        "max_seconds": report.get("max_seconds"),
        "pretraining": json.loads(files.get("run/pretrain/pretrain_history.json", b"[]")),
        "pretrain_seconds": report.get("pretrain_seconds"), "wall_seconds": report.get("wall_seconds"),
        "command_seconds": int(ended[-1][1]) if ended else None,
        "command_status": int(ended[-1][0]) if ended else None,
        "models": stages, "paper": report.get("paper", {}), "prompts": report.get("prompts"),
    }


def render(result: dict) -> str:
    lines = [f"# One-shot `gpu` profile on {result['dataset']} ({result['gpu'] or result['device']})", "",
             f"Command: `{result['command']}`" if result["command"] else "Command: not recorded", "",
             f"Versions: {result['versions']}. Budgets (s): {result['max_seconds']}; refit: {result['refit']}.",
             f"Command status {result['command_status']}, {result['command_seconds']} s in all; "
             f"{'all four models finished' if result['complete'] else 'NOT all models finished'}.", "",
             *([f"**Read this first:** {result['note']}", ""] if result.get("note") else []),
             "## Pretraining", "", "| epoch | steps | rows | loss | MLM | MTM | ICL | rows/s | peak GPU MiB | s | budget stop |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["pretraining"]:
        cell = lambda k, f="{:.4f}": f.format(r[k]) if k in r else "—"  # noqa: E731
        lines.append(f"| {r['epoch']} | {r.get('steps', '—')} | {r.get('rows', '—')} | {cell('loss')} | {cell('mlm')} | "
                     f"{cell('mtm')} | {cell('icl')} | {cell('samples_per_second', '{:.0f}')} | "
                     f"{cell('peak_gpu_memory_mib', '{:.0f}')} | {r['seconds']} | {'yes' if r.get('stopped_by_budget') else ''} |")
    lines += ["", "## Finetuning (selected on validation, test once)", "",
              "| model | test AUC | test Logloss | valid AUC | paper AUC / Logloss | epochs | ended by | fit s | stage s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for variant, m in result["models"].items():
        paper = result["paper"].get(variant)
        paper = f"{paper[0]} / {paper[1]}" if paper else "—"
        if m is None:
            lines.append(f"| {variant} | not finished | | | {paper} | | | | |")
            continue
        valid = f"{m['valid']['auc']:.4f}" if m.get("valid") else "—"
        lines.append(f"| {variant} | {m['test']['auc']:.4f} | {m['test']['logloss']:.4f} | {valid} | {paper} | "
                     f"{m.get('best_epoch')} of {m.get('epochs')} | {m.get('stopped') or 'all epochs'} | "
                     f"{m.get('fit_seconds')} | {m.get('wall_seconds')} |")
    if (result["models"].get("flip") or {}).get("alpha") is not None:
        lines += ["", f"FLIP's α after training: {result['models']['flip']['alpha']:.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--name", default="flip_ml1m_gpu")
    parser.add_argument("--command", help="the command as it was run")
    parser.add_argument("--note", help="what the run is and is not evidence of (printed first)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = collect(args.out, args.command, args.note)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{args.name}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
