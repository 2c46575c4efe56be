"""FLIP pretraining throughput against the bare cost of its encoder work.

    python benchmarks/pretrain_throughput.py [--dataset ml-1m] [--batch-size 32] [--steps 4]
                                             [--device cpu] [--plm minilm-l6] [--out DIR]
                                             [--name pretrain_throughput]

For each setting (language model trained, as in the paper; frozen, as in the ``cpu`` profile)
and precision (fp32; bf16 autocast where the device has fast bf16), it times one epoch of the
real pretraining loop (``Pretrainer.fit`` on ``--steps`` batches of real train+valid rows,
after an epoch of warm-up) and the same batches, in the same order and widths, through the
language model alone: clean and masked text as one pass, forward+backward when the model is
trained, forward only when frozen. The ratio (loop time / bare encoder time) is the overhead
of everything that is not the encoder: heads, ID backbone, masking, batching, optimizer,
host waits. Target: <= 1.3. Writes ``<out>/<name>.{json,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from flipctr.data.batching import padding_fraction
from flipctr.data.cache import prepare, resolve_data_config
from flipctr.runtime.device import resolve_device
from flipctr.profiles import profile_config
from flipctr.runs.flip import ENCODING, pretraining_setup
from flipctr.runs.inputs import ModelInputs
from flipctr.runtime.device import Runtime, bf16_supported
from flipctr.runtime.environment import environment_info
from flipctr.utils import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"trained": "paper", "frozen": "cpu"}  # setting -> the profile it is measured in


def bare_encoder(model, split, cfg, device: torch.device, dtype: torch.dtype | None) -> float:
    """Rows/s of the language model alone on the batches of the loop's second epoch."""
    lm, bs, trained = model.language_model, cfg.pretrain.batch_size, model.language_model.trainable
    shuffle = torch.Generator().manual_seed(cfg.pretrain.seed)
    orders = [split.order(shuffle, bs, cfg.pretrain.length_buckets) for _ in range(2)]
    masking = torch.Generator(device=device).manual_seed(0)
    seconds = 0.0
    for epoch, order in enumerate(orders):  # the first epoch warms up
        widths = split.batch_widths(order, bs)
        for step, width in enumerate(widths):
            batch = split.batch(order[step * bs:(step + 1) * bs].to(device), model.input_names, width)
            with torch.no_grad():
                masked = model.masker(batch["ids"], batch["input_ids"], batch["attention_mask"],
                                      batch["value_spans"], masking).masked_input_ids
            ids = torch.cat([batch["input_ids"], masked])
            mask = torch.cat([batch["attention_mask"], batch["attention_mask"]])
            Runtime(device).synchronize()
            tick = time.perf_counter()
            with torch.set_grad_enabled(trained), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                                 enabled=dtype is not None):
                hidden = lm(ids, mask).hidden_states
            if trained:
                hidden.float().pow(2).mean().backward()
                lm.zero_grad(set_to_none=True)
            Runtime(device).synchronize()
            if epoch:
                seconds += time.perf_counter() - tick
    return len(split) / seconds


def measure(setting: str, precision: str, args, data, rd: ModelInputs, device: torch.device) -> dict:
    cfg = profile_config(SETTINGS[setting], [
        f"data.dataset={args.dataset}", f"pretrain.batch_size={args.batch_size}",
        f"pretrain.rows={args.batch_size * args.steps}", "pretrain.rows_from=random", "pretrain.epochs=2",
        f"pretrain.amp={'bf16' if precision == 'bf16' else 'off'}", "pretrain.progress=false",
        f"train.device={device}", f"model.plm={args.plm}"])
    cfg = dataclasses.replace(cfg, data=resolve_data_config(cfg.data))
    with tempfile.TemporaryDirectory() as tmp:
        model, split, pretrainer = pretraining_setup(cfg, rd, data.encoding(ENCODING), device, Path(tmp))
        last = pretrainer.fit(model, split)[-1]
    loop = last["samples_per_second"]
    dtype = torch.bfloat16 if precision == "bf16" else None
    model.to(device)
    bare = bare_encoder(model, split, cfg, device, dtype)
    lengths = split.host("lengths")
    order = split.order(torch.Generator().manual_seed(0), args.batch_size, cfg.pretrain.length_buckets)
    return {"setting": setting, "profile": SETTINGS[setting], "precision": precision,
            "batch_size": args.batch_size, "rows": len(split),
            "padding": round(padding_fraction(lengths, order, split.batch_widths(order, args.batch_size),
                                              args.batch_size), 3),
            "pretrain_rows_per_s": round(loop, 2), "bare_encoder_rows_per_s": round(bare, 2),
            "ratio": round(bare / loop, 3),
            **({"peak_gpu_memory_mib": last["peak_gpu_memory_mib"]} if "peak_gpu_memory_mib" in last else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed batches (after as many of warm-up)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--plm", default="minilm-l6", help="language model name or folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="pretrain_throughput")
    args = parser.parse_args()
    device = resolve_device(args.device)
    base = profile_config("cpu", [f"data.dataset={args.dataset}", f"model.plm={args.plm}"])
    base = dataclasses.replace(base, data=resolve_data_config(base.data))
    data = prepare(base.data)
    rd = ModelInputs(data, base, device, text=True)
    rows, skipped = [], []
    for setting in args.settings:
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not bf16_supported(device):
                skipped.append(f"{setting} bf16: {device.type} without fast bf16 (no AMX/AVX512-BF16 on CPU)")
                continue
            rows.append(measure(setting, precision, args, data, rd, device))
            print(rows[-1], flush=True)
    command = "python benchmarks/pretrain_throughput.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k != "out")
    report = {"command": command, "dataset": args.dataset, "environment": environment_info(str(device)),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "results": rows, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", report)
    write_text(args.out / f"{args.name}.md", render(report))
    print(render(report))


def render(report: dict) -> str:
    env = report["environment"]
    lines = [f"# FLIP pretraining throughput vs the bare encoder ({report['dataset']})", "",
             f"    {report['command']}", "",
             f"Device: {env.get('device')}, {env['cpu_count']} CPU threads ({report['cpu_capability']}), "
             f"torch {env['torch']}.", "",
             "| encoder | precision | batch | padding | pretraining rows/s | bare encoder rows/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    gpu = any("peak_gpu_memory_mib" in r for r in report["results"])
    if gpu:
        lines[-2:] = [lines[-2] + " peak GPU memory (MiB) |", lines[-1] + "---|"]
    for r in report["results"]:
        lines.append(f"| {r['setting']} ({r['profile']} profile) | {r['precision']} | {r['batch_size']} | "
                     f"{r['padding']:.1%} | {r['pretrain_rows_per_s']:.1f} | {r['bare_encoder_rows_per_s']:.1f} | "
                     f"{r['ratio']:.2f} |" + (f" {r.get('peak_gpu_memory_mib', float('nan')):.0f} |" if gpu else ""))
    lines += ["", "Ratio = bare encoder rows/s / pretraining rows/s: the cost of everything around the encoder "
              "(target <= 1.3). Bare encoder: the same batches, clean and masked text as one pass, "
              "forward+backward when trained, forward only when frozen. Padding: share of padded text "
              "positions in the length-bucketed batches.", ""]
    lines += [f"Not measured: {s}." for s in report["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
