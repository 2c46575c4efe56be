"""The `gpu` profile in ONE command on a lent GPU machine that forgets everything after it:
preflight, then the run under time budgets, with evidence in OUT however it ends.

    bash benchmarks/gpu/oneshot.sh PACK OUT [--seconds 540] [--profile gpu|paper] [--set key=value ...]
    bash benchmarks/gpu/oneshot.sh PACK OUT --profile paper --stage pretrain [--seconds 570]
    bash benchmarks/gpu/oneshot.sh PACK OUT --profile paper --stage finetune [--pretrained DIR] [--seconds 570]

PACK is made by `make gpu-pack` (raw data + the encoder in bf16). Nothing is installed: flipctr
runs from ``src`` on the machine's own torch and transformers. In order:

1. ``OUT/machine.txt``: ``nvidia-smi``, package versions, CPU count, environment.
2. The full data preparation (table + tokenized prompts) starts in the background, while
3. the PREFLIGHT runs ``flipctr run --profile gpu`` on a few thousand rows with every setting of
   the real run (bf16 pack loaded as fp32 master weights, bf16 autocast, fused AdamW, CUDA
   generators, the budgets, all four finetunings with FLIP's α, results files) within
   ``--preflight-seconds``, and is checked (device, precision, four finite results, fp32
   weights saved). Any failure ends the command at once (exit 3) with its log in OUT.
4. The RUN: what is left of ``--seconds`` after preparation, less ``--reserve`` (start-up,
   model building, test evaluations), is shared between pretraining and the four finetunings
   as ``--shares`` says (``pretrain.max_seconds``, ``train.max_seconds``,
   ``text_finetune.max_seconds``); refit is off for all four models, like for like.
   ``results.{json,md}`` are rewritten after each model.

Stages (``--stage``): "all" (above); "pretrain": the preflight, then the pretraining alone
with all the time left (``flipctr run --pretrain-only``), its weights into OUT as bf16
safetensors shards of at most ``--shard-mib`` with ``pretrain_history.json`` (no results
files); "finetune": no preflight, the four models from the pretraining ``--pretrained`` names
(the shards carried back, or by default the one a pretrain stage left on this machine), refit
as the profile says, the time shared by the four models.

Every ``--every`` seconds the run folder's small files (no weights) are packed into
``OUT/run.tar.gz`` and the results copied, so a kill leaves the last state. OUT never holds
more than 8 files (a lent machine returns at most 8): machine.txt, oneshot.log,
preflight.tar.gz, run.tar.gz, results.json, results.md, and at most one file being written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("scratch", "flip_id", "flip_plm", "flip")
# settings of the real run beyond the `gpu` profile: refit off for all four (a refit would
# need its own time), a budget checked four times an epoch, patience of one epoch
RUN_SETTINGS = ["train.refit=false", "text_finetune.refit=false", "train.evals_per_epoch=4", "train.patience=4",
                "train.progress=false", "pretrain.progress=false"]
# the preflight: the same settings on the first rows, one epoch each, small budgets that still
# let the schedule sizing and the budget checks run
PREFLIGHT_SETTINGS = [*RUN_SETTINGS, "data.limit=4000", "pretrain.epochs=2", "pretrain.batch_size=128",
                      "pretrain.max_seconds=60", "train.epochs=1", "text_finetune.epochs=1",
                      "train.max_seconds=60", "text_finetune.max_seconds=60"]
SHARES = {"pretrain": 0.34, "scratch": 0.08, "flip_id": 0.08, "flip_plm": 0.25, "flip": 0.25}
FINETUNE_SHARES = {"scratch": 0.12, "flip_id": 0.12, "flip_plm": 0.38, "flip": 0.38}
SMALL_FILES = (".json", ".md", ".yaml", ".log", ".png", ".txt", ".csv")
MAX_SMALL_FILE = 2 << 20


class Log:
    """``OUT/oneshot.log`` (and stdout): lines stamped with the seconds since the start and their source."""

    def __init__(self, path: Path, start: float):
        self.handle, self.start, self.lock = open(path, "a", buffering=1, encoding="utf-8"), start, threading.Lock()

    def __call__(self, source: str, line: str) -> None:
        text = f"[{time.monotonic() - self.start:6.1f}s {source}] {line.rstrip()}"
        with self.lock:
            self.handle.write(text + "\n")
            print(text, flush=True)


class Child:
    """A subprocess whose output lines go to the log, with a deadline."""

    def __init__(self, name: str, args: list[str], log: Log, env: dict[str, str]):
        self.name, self.log, self.lines = name, log, []
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=ROOT, start_new_session=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        log(name, "started: " + " ".join(args))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.log(self.name, line)

    def wait(self, seconds: float) -> int:
        """The exit status; 124 when it was stopped at ``seconds``."""
        try:
            status = self.process.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            self.stop()
            status = 124
        self.reader.join(timeout=5)
        self.log(self.name, f"ended with status {status}")
        return status

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL 10 s later."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def archive(folders: dict[str, Path], target: Path) -> None:
    """The small files (no weights, no optimizer state) of ``folders`` as one .tar.gz, written
    beside ``target`` and renamed onto it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, folder in folders.items():
            if folder.is_file():
                tar.add(folder, arcname=name)
                continue
            for path in sorted(folder.rglob("*")) if folder.exists() else []:
                if (path.is_file() and path.suffix in SMALL_FILES and not path.name.startswith(".")
                        and path.stat().st_size <= MAX_SMALL_FILE):
                    tar.add(path, arcname=f"{name}/{path.relative_to(folder)}")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, target)


def copy_results(run_dir: Path, out: Path) -> None:
    for name in ("results.json", "results.md"):
        if (run_dir / name).exists():
            tmp = out / f".{name}.tmp"
            shutil.copyfile(run_dir / name, tmp)
            os.replace(tmp, out / name)


def safetensors_dtypes(path: Path, prefix: str) -> set[str]:
    """The dtypes of the tensors named ``prefix*`` in a safetensors file (read from its header)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    return {v["dtype"] for k, v in header.items() if k.startswith(prefix)}


def check_preflight(run_dir: Path, expect_device: str) -> list[str]:
    """What is wrong with a finished preflight run (empty: nothing)."""
    problems = []
    results_path = run_dir / "results.json"
    if not results_path.exists():
        return ["no results.json"]
    report = json.loads(results_path.read_text())
    if set(report["results"]) != set(VARIANTS):
        problems.append(f"results for {sorted(report['results'])}, not all four models")
    for variant, metrics in report["results"].items():
        auc = (metrics.get("test") or {}).get("auc")
        if not isinstance(auc, float) or not 0.0 <= auc <= 1.0:
            problems.append(f"{variant}: test AUC {auc!r}")
        environment = run_dir / variant / "environment.json"
        if environment.exists():
            env = json.loads(environment.read_text())
            if not str(env.get("device", "")).startswith(expect_device):
                problems.append(f"{variant}: ran on {env.get('device')!r}, not {expect_device}")
            if expect_device == "cuda" and env.get("amp") != "bf16":
                problems.append(f"{variant}: autocast {env.get('amp')!r}, not bf16")
        else:
            problems.append(f"{variant}: no environment.json")
    if "alpha" not in report["results"].get("flip", {}):
        problems.append("FLIP reports no α")
    weights = run_dir / "pretrain" / "pretrained.safetensors"
    if not weights.exists():
        problems.append("no pretrained weights")
    elif safetensors_dtypes(weights, "language_model.") != {"F32"}:
        problems.append(f"language model saved as {safetensors_dtypes(weights, 'language_model.')}, not fp32 "
                        "master weights")
    history = run_dir / "pretrain" / "pretrain_history.json"
    if expect_device == "cuda" and history.exists() and not all(
            "peak_gpu_memory_mib" in r for r in json.loads(history.read_text())):
        problems.append("pretraining recorded no peak GPU memory")
    return problems


def machine_facts(path: Path) -> None:
    lines = [f"python {sys.version.split()[0]}", f"cpus {os.cpu_count()}"]
    for package in ("torch", "transformers", "tokenizers", "numpy", "pandas", "pyarrow"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    lines += [f"{k}={v}" for k, v in sorted(os.environ.items())
              if k.startswith(("CUDA", "NVIDIA", "FLIPCTR", "OMP", "TORCH", "PYTORCH", "NCCL"))]
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        smi = f"nvidia-smi: {err}"
    path.write_text("\n".join(lines) + "\n\n" + smi)


def budgets(seconds_left: float, shares: dict[str, float], refit: bool = False) -> dict[str, float]:
    """Each stage's seconds: ``shares`` of what is left (the two ID models share one setting,
    ``train.max_seconds``, and the two text models another; with ``refit`` each model's share
    holds its selection and its refit, each under that budget). No "pretrain" share: none."""
    total = sum(shares.values())
    part = {k: seconds_left * v / total / (2 if refit and k != "pretrain" else 1) for k, v in shares.items()}
    out = {"train": min(part["scratch"], part["flip_id"]), "text_finetune": min(part["flip_plm"], part["flip"])}
    return {"pretrain": part["pretrain"], **out} if "pretrain" in part else out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pack", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=540, help="the whole command's wall-clock limit")
    parser.add_argument("--preflight-seconds", type=float, default=60)
    parser.add_argument("--reserve", type=float, default=60,
                        help="seconds of the run outside the stages' budgets (start-up, model building, test)")
    parser.add_argument("--shares", type=json.loads, default=SHARES, help="JSON {stage: share of the time left}")
    parser.add_argument("--every", type=float, default=20, help="seconds between copies of the evidence to OUT")
    parser.add_argument("--work", type=Path, help="data and run folders (default $FLIPCTR_DATA or /tmp/flipctr-oneshot)")
    parser.add_argument("--expect-device", default="cuda", help="the device the preflight must have used")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a setting for preflight and run")
    parser.add_argument("--preflight-set", action="append", default=[], help="a setting for the preflight only")
    parser.add_argument("--run-set", action="append", default=[], help="a setting for the run only")
    parser.add_argument("--profile", choices=["gpu", "paper"], default="gpu")
    parser.add_argument("--stage", choices=["all", "pretrain", "finetune"], default="all")
    parser.add_argument("--pretrained", type=Path, help="finetune stage: the pretraining's shards and history "
                                                         "(default: the one a pretrain stage left in WORK)")
    parser.add_argument("--shard-mib", type=float, default=16, help="pretrain stage: the largest file into OUT")
    args = parser.parse_args(argv)
    if args.shares is SHARES and args.stage == "finetune":
        args.shares = FINETUNE_SHARES

    start = time.monotonic()
    deadline = start + args.seconds
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pack = args.pack.resolve()
    work = (args.work or Path(os.environ.get("FLIPCTR_DATA", "/tmp/flipctr-oneshot"))).resolve()
    log = Log(out / "oneshot.log", start)
    machine_facts(out / "machine.txt")
    meta = json.loads((pack / "PACK.json").read_text())
    dataset = meta["dataset"]
    env = {**os.environ, "FLIPCTR_DATA": str(work), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("WORLD_SIZE", None)  # one process on one GPU
    if not (work / "raw" / dataset / "SOURCE.json").exists():
        (work / "raw").mkdir(parents=True, exist_ok=True)
        with tarfile.open(pack / f"raw-{dataset}.tar.xz") as tar:
            tar.extractall(work / "raw", filter="data")
    log("oneshot", f"pack {pack} ({dataset}), work {work}, {args.seconds:.0f} s in all")
    flipctr = [sys.executable, "-m", "flipctr.cli"]
    common = ["--dataset", dataset, "--profile", args.profile, "--plm", str(pack / "plm")]
    # the whole run: refit off for all four (no time for it); the finetune stage refits as the profile says
    run_base = RUN_SETTINGS if args.stage != "finetune" else [s for s in RUN_SETTINGS if ".refit=" not in s]

    def sets(items: list[str]) -> list[str]:
        return [x for item in items for x in ("--set", item)]

    prepare = Child("prepare", [*flipctr, "data", "prepare", dataset, "--plm", str(pack / "plm")], log, env)
    if args.stage != "finetune":  # the finetune stage follows a pretrain stage's preflight
        preflight_dir = work / "preflight"
        shutil.rmtree(preflight_dir, ignore_errors=True)
        preflight = Child("preflight", [*flipctr, "run", *common, "--run-dir", str(preflight_dir),
                                        *sets([*PREFLIGHT_SETTINGS, *args.sets, *args.preflight_set])], log, env)
        status = preflight.wait(args.preflight_seconds)
        problems = (["exit status %d%s" % (status, " (over its time)" if status == 124 else "")] if status
                    else check_preflight(preflight_dir, args.expect_device))
        archive({"preflight": preflight_dir}, out / "preflight.tar.gz")
        if problems:
            prepare.stop()
            for problem in problems:
                log("oneshot", f"PREFLIGHT FAILED: {problem}")
            return 3
        log("oneshot", "preflight passed")

    status = prepare.wait(deadline - time.monotonic() - args.reserve)
    if status:
        log("oneshot", f"data preparation failed (status {status})")
        return 4
    left = deadline - time.monotonic() - args.reserve
    run_dir = work / "run"
    stage_args: list[str] = []
    if args.stage == "pretrain":
        budget = {"pretrain": left}
        stage_args = ["--pretrain-only"]
    elif args.stage == "finetune":
        refit = args.profile == "paper"  # the paper profile refits both kinds of model
        budget = budgets(left, args.shares, refit)
        source = (args.pretrained or run_dir / "pretrain").resolve()
        if args.pretrained is None:  # a fresh run folder beside the pretraining left on this machine
            run_dir = work / "run-finetune"
        stage_args = ["--pretrained", str(source)]
    else:
        budget = budgets(left, args.shares)
    log("oneshot", f"{left:.0f} s for the stages: " + ", ".join(f"{k}.max_seconds={v:.0f}" for k, v in budget.items()))
    run_settings = [*run_base, *(f"{k}.max_seconds={v:.0f}" for k, v in budget.items()), *args.sets, *args.run_set]
    run = Child("run", [*flipctr, "run", *common, "--run-dir", str(run_dir), *stage_args, *sets(run_settings)],
                log, env)

    def evidence() -> None:
        archive({"run": run_dir, "prepare.log": work / "prepare.log"}, out / "run.tar.gz")
        if args.stage != "pretrain":  # a pretraining has no results to show; its weights come back instead
            copy_results(run_dir, out)

    stop_copies = threading.Event()

    def copies() -> None:
        while not stop_copies.wait(args.every):
            try:
                evidence()
            except OSError as err:  # a file removed while read: the next copy has it
                log("oneshot", f"copy of the evidence skipped: {err}")

    (work / "prepare.log").write_text("".join(prepare.lines))
    copier = threading.Thread(target=copies, daemon=True)
    copier.start()
    status = run.wait(deadline - time.monotonic() - 10)  # 10 s for the last copy
    stop_copies.set()
    copier.join()
    evidence()
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    if args.stage == "pretrain" and (run_dir / "pretrain" / "pretrained.safetensors").exists():
        sys.path.insert(0, str(ROOT / "src"))  # flipctr runs from src there, not installed
        from flipctr.runs.flip import export_pretraining

        shards = export_pretraining(run_dir / "pretrain", out, int(args.shard_mib * 2**20))
        log("oneshot", f"pretrained weights into OUT: {', '.join(p.name for p in shards)} and pretrain_history.json")
    log("oneshot", f"run ended with status {status}; finished: {sorted(results.get('results', {}))}; "
        f"{time.monotonic() - start:.0f} s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
