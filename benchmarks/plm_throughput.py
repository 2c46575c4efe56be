"""Language-model throughput on real ML-1M prompts.

    python benchmarks/plm_throughput.py [--plm minilm-l6] [--batch-size 256] [--batches 3]

Measures encoder samples/s for forward (inference) and forward+backward (training), fp32 vs
bf16 autocast, dynamic padding (to the longest prompt of the batch) vs fixed padding (to
max_length). Writes ``benchmarks/results/plm_throughput.{json,md}``. Needs the ML-1M raw
files (``flipctr data get ml-1m``) and the model (``flipctr lm get minilm-l6``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flipctr.config import DataConfig
from flipctr.data.batching import DeviceRows
from flipctr.data.cache import prepare
from flipctr.data.text import load_or_build_text
from flipctr.data.lm_files import load_tokenizer
from flipctr.models.language import LanguageModel
from flipctr.runtime.device import bf16_supported
from flipctr.runtime.environment import environment_info
from flipctr.utils import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def measure(lm: LanguageModel, split: DeviceRows, batch_size: int, batches: int, train: bool,
            dtype: torch.dtype | None, fixed_width: int | None) -> float:
    rows = torch.arange(batch_size * (batches + 1))
    params = [p for p in lm.parameters()]
    elapsed, count = 0.0, 0
    for b in range(batches + 1):  # the first batch warms up
        batch = split.batch(rows[b * batch_size:(b + 1) * batch_size], ("input_ids", "attention_mask"))
        if fixed_width is not None:
            pad = fixed_width - batch["input_ids"].shape[1]
            batch = {k: torch.nn.functional.pad(v, (0, pad)) for k, v in batch.items()}
        start = time.perf_counter()
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
            cls = lm(**batch).cls
        if train:
            cls.float().pow(2).mean().backward()
            for p in params:
                p.grad = None
        if b:
            elapsed += time.perf_counter() - start
            count += batch_size
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plm", default="minilm-l6")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = prepare(DataConfig("ml-1m"))
    text = load_or_build_text(data.folder, data.value_codes(), data.fields, load_tokenizer(args.plm),
                              args.max_length)
    start, stop = data.sizes.bounds("train")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(stop - start, args.batch_size * (args.batches + 1), replace=False))
    split = DeviceRows.from_arrays(np.zeros(len(rows)), torch.device("cpu"),
                              input_ids=text.input_ids[rows], lengths=text.lengths[rows])
    lm = LanguageModel.from_pretrained(args.plm)
    lm.train()  # dropout on in the training measurements, as in finetuning
    results = []
    dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if bf16_supported(torch.device("cpu")) else [])
    for mode in ("forward", "forward+backward"):
        for dname, dtype in dtypes:
            for padding in ("dynamic", "fixed"):
                if mode == "forward":
                    lm.eval()
                else:
                    lm.train()
                rate = measure(lm, split, args.batch_size, args.batches, mode != "forward", dtype,
                               args.max_length if padding == "fixed" else None)
                results.append({"mode": mode, "dtype": dname, "padding": padding, "samples_per_second": round(rate, 1)})
                print(results[-1], file=sys.stderr)
    report = {
        "command": " ".join(sys.argv), "plm": args.plm, "batch_size": args.batch_size,
        "batches_measured": args.batches, "max_length": args.max_length,
        "parameters": sum(p.numel() for p in lm.parameters()),
        "tokens_per_sample": {"mean": round(text.report["tokens_mean"], 2), "p95": text.report["tokens_p95"],
                              "max": text.report["tokens_max"]},
        "measured_tokens_per_sample_mean": float(text.lengths[rows].mean()),
        "environment": environment_info("cpu"), "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "plm_throughput.json", report)
    write_text(RESULTS / "plm_throughput.md", render(report))
    print(render(report))


def render(report: dict) -> str:
    rate = {(r["mode"], r["dtype"], r["padding"]): r["samples_per_second"] for r in report["results"]}
    env = report["environment"]
    lines = [
        f"# Language-model throughput: {report['plm']} on ML-1M prompts",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {env['cpu_count']} CPU threads ({env['torch_threads']} torch threads), torch {env['torch']}  ",
        f"Batch {report['batch_size']}, {report['batches_measured']} batches measured after one warm-up; "
        f"{report['parameters'] / 1e6:.1f}M parameters.  ",
        f"Tokens per sample ([CLS]/[SEP] included), all ML-1M prompts: mean {report['tokens_per_sample']['mean']}, "
        f"p95 {report['tokens_per_sample']['p95']:.0f}, max {report['tokens_per_sample']['max']}; "
        f"fixed padding pads to {report['max_length']}.",
        "",
        "| mode | dtype | dynamic padding (samples/s) | fixed padding (samples/s) |",
        "|---|---|---|---|",
    ]
    for mode in ("forward", "forward+backward"):
        for dtype in ("fp32", "bf16"):
            if (mode, dtype, "dynamic") in rate:
                lines.append(f"| {mode} | {dtype} | {rate[mode, dtype, 'dynamic']} | {rate[mode, dtype, 'fixed']} |")
    for mode in ("forward", "forward+backward"):
        if (mode, "bf16", "dynamic") in rate:
            lines.append("")
            lines.append(f"bf16 speed-up, {mode}, dynamic padding: "
                         f"{rate[mode, 'bf16', 'dynamic'] / rate[mode, 'fp32', 'dynamic']:.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
