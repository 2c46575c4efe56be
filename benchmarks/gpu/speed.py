"""Each training stage's speed on the paper's batch sizes, the eager path against the fast paths,
on ML-1M shapes: the first thing to run on a lent GPU (a few minutes).

    python benchmarks/gpu/speed.py OUT [--plm minilm-l6] [--rows 60000] [--steps 30] [--device auto]

Stages: FLIP pretraining (language model trained, DCNv2, MLM+MTM+ICL, batch 1024), FLIP_PLM,
FLIP and DCNv2 finetuning (batch 256). Paths: "eager" (every fast path off) and "fast" (each
at its default for the device). Fast paths today: ``model.plm_attention_mask`` (a prepared 4-D
mask on CUDA). Each stage runs two epochs on the first ``--rows`` samples (pretraining on
``--steps`` batches of them): the first warms up (kernel choice, allocator), the second is
timed (training steps only). Per stage and path it records samples/s, the epochs' mean losses
(eager and fast side by side: the same computation must give close values), the host waits per
step in the timed epoch (CUDA: ``torch.cuda.set_sync_debug_mode``, checkpoints and evaluation
included), peak GPU memory, and for the fast path a profiler table of one epoch's top
operations; and whether the pretraining step can be captured whole (CUDA graphs, a compiled
step). Writes ``OUT/speed.{json,md}``; commit them as ``benchmarks/results/gpu_speed.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from flipctr.data.cache import prepare, resolve_data_config
from flipctr.profiles import profile_config
from flipctr.runtime.device import resolve_device
from flipctr.runs.flip import ENCODING, pretraining_setup
from flipctr.runs.inputs import ModelInputs
from flipctr.runs.protocol import train_run
from flipctr.runtime.environment import environment_info
from flipctr.training.engine import global_order
from flipctr.training.pretrain import Pretraining
from flipctr.training.trace import trace_report
from flipctr.utils import write_json, write_text

PATHS = {"eager": ["model.plm_attention_mask=2d"], "fast": ["model.plm_attention_mask=auto"]}
STAGES = ("pretrain", "plm", "flip", "dcnv2")
TARGETS = {"pretrain": 40_000, "plm": 45_000, "flip": 40_000, "dcnv2": 250_000}  # samples/s on one H200


class SyncCounter:
    """Host waits for the device while it is on (CUDA's sync debug mode, one warning each)."""

    def __init__(self, device: torch.device):
        self.cuda, self.count = device.type == "cuda", 0

    @contextmanager
    def counting(self):
        if not self.cuda:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.count += sum("synchroniz" in str(w.message) for w in caught)


def config(args, path: str, stage: str):
    sets = [f"data.dataset={args.dataset}", f"data.limit={args.rows}", f"model.plm={args.plm}",
            f"train.device={args.device}", "train.progress=false", "pretrain.progress=false", "train.epochs=2",
            "text_finetune.epochs=2", "train.refit=false", "text_finetune.refit=false", "train.patience=10",
            "pretrain.epochs=2", f"pretrain.rows={args.steps * 1024}", "pretrain.rows_from=last",
            *PATHS[path], *args.sets]
    if stage != "pretrain":
        sets.append(f"model.name={stage}")
    cfg = profile_config("paper", sets)
    return dataclasses.replace(cfg, data=resolve_data_config(cfg.data))


def pretrain(args, path: str, device: torch.device, profile: bool) -> dict:
    cfg = config(args, path, "pretrain")
    data = prepare(cfg.data)
    rd = ModelInputs(data, cfg, device, text=True)
    syncs = SyncCounter(device)
    with tempfile.TemporaryDirectory() as tmp:
        model, split, pretrainer = pretraining_setup(cfg, rd, data.encoding(ENCODING), device, Path(tmp))
        steps = -(-len(split) // cfg.pretrain.batch_size)
        with syncs.counting():
            history = pretrainer.fit(model, split)
        table = _profile(lambda: pretrainer.fit(model, split), device) if profile else None
    last = history[-1]
    return {"samples_per_second": last["samples_per_second"], "steps": steps,
            "losses": [{k: r[k] for k in ("loss", "mlm", "mtm", "icl") if k in r} for r in history],
            "syncs_per_step": round(syncs.count / (steps * len(history)), 2) if syncs.cuda else None,
            "peak_gpu_memory_mib": last.get("peak_gpu_memory_mib"), "profile": table}


def trace(args, device: torch.device) -> dict:
    """Whether the pretraining step, as the stage hands it its first batch (fast path), is
    captured whole: one graph, no data-dependent shape, no host read (:mod:`flipctr.training.trace`)."""
    cfg = config(args, "fast", "pretrain")
    data = prepare(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        model, split, pretrainer = pretraining_setup(cfg, ModelInputs(data, cfg, device, text=True),
                                                     data.encoding(ENCODING), device, Path(tmp))
        stage = Pretraining(pretrainer, model, split, None)
        order = global_order(split, stage.generators["shuffle"], stage.batch_size, stage.length_buckets)
        stage.begin_epoch(1, order)
        rows = order[:stage.batch_size]
        widths = split.batch_widths(rows, stage.batch_size)
        inputs = stage.step_inputs(0, split.batch(rows.to(device), stage.names, widths[0] if widths else None))
        stage.tracker.close()

        def step(inputs: dict) -> torch.Tensor:
            with pretrainer.runtime.autocast():
                return model(**inputs).loss

        return trace_report(step, inputs)


def finetune(args, path: str, stage: str, device: torch.device, profile: bool) -> dict:
    cfg = config(args, path, stage)
    syncs = SyncCounter(device)
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with syncs.counting():
            metrics = train_run(cfg, Path(tmp) / "run", select_only=True)
        table = _profile(lambda: train_run(cfg, Path(tmp) / "again", select_only=True), device) if profile else None
    history = metrics["history"]
    steps = sum(-(-h["samples"] // cfg.train.batch_size) for h in history)
    return {"samples_per_second": history[-1]["samples_per_second"], "steps": steps,
            "losses": [{"loss": h["train_loss"]} for h in history],
            "syncs_per_step": round(syncs.count / max(steps, 1), 2) if syncs.cuda else None,
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None, "profile": table}


def _profile(run, device: torch.device) -> str:
    """The top operations of one more run, by device time (CPU time without CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48)


def render(report: dict) -> str:
    lines = [f"# Training speed per stage, eager vs fast ({report['device']})", "",
             f"Command: `{report['command']}` ({report['seconds']:.0f} s)", "",
             "| stage | path | samples/s | target | steps timed | host waits / step | peak GPU MiB | epochs' losses |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        losses = "; ".join(", ".join(f"{k} {v:.4f}" for k, v in e.items()) for e in r["losses"])
        lines.append(f"| {r['stage']} | {r['path']} | {r['samples_per_second']:.0f} | {TARGETS[r['stage']]} | "
                     f"{r['steps']} | {r['syncs_per_step']} | {r['peak_gpu_memory_mib']} | {losses} |")
    if report.get("trace"):
        tr = report["trace"]
        lines += ["", f"Pretraining step captured whole (one graph, static shapes, no host read): "
                      f"{'yes' if tr['whole'] else 'no'} (graphs {tr['graphs']}, data-dependent shapes "
                      f"{tr['data_dependent'] or 'none'}, host reads {tr['host_reads'] or 'none'}"
                      f"{', ' + tr['error'] if tr['error'] else ''})."]
    for r in report["results"]:
        if r.get("profile"):
            lines += ["", f"## {r['stage']} ({r['path']}): top operations of one more run", "", "```", r["profile"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--plm", default="minilm-l6")
    parser.add_argument("--rows", type=int, default=60_000, help="samples (data.limit) the finetunings use")
    parser.add_argument("--steps", type=int, default=30, help="pretraining batches of 1024 per epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more settings for every run")
    args = parser.parse_args(argv)
    tick = time.perf_counter()
    device = resolve_device(args.device)
    args.device = str(device)
    results = []
    for stage in args.stages:
        for path in PATHS:
            profile = path == "fast" and not args.no_profile
            row = (pretrain(args, path, device, profile) if stage == "pretrain"
                   else finetune(args, path, stage, device, profile))
            results.append({"stage": stage, "path": path, **row})
            print(f"[speed] {stage} {path}: {row['samples_per_second']:.0f} samples/s, "
                  f"{row['syncs_per_step']} host waits/step", file=sys.stderr, flush=True)
    traced_step = trace(args, device) if "pretrain" in args.stages else None
    report = {"command": "python benchmarks/gpu/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": environment_info(str(device)).get("gpu", str(device)),
              "environment": environment_info(str(device)), "seconds": time.perf_counter() - tick,
              "results": results, "trace": traced_step}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speed.json", report)
    write_text(args.out / "speed.md", render(report))
    print(render(report))


if __name__ == "__main__":
    main()
