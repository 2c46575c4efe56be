"""The fault table: faults injected into real flipctr processes on tiny data in a scratch folder,
each with what the user saw and whether the re-run ended as an uninterrupted run does.

    python benchmarks/faults.py [--work /tmp/flipctr-faults] [--only NAME ...]

Faults: SIGKILL inside ``data prepare``, inside the text-cache build, in pretraining mid-epoch,
in each of the four finetunings of ``flipctr run`` (one run killed five times, resumed each time),
during a checkpoint write; two ``data prepare`` of one dataset at once; a full disk (a small
tmpfs: needs root); a read-only run folder (a tmpfs mounted read-only: needs root); a truncated
checkpoint; a truncated cache file. "Same results" compares the cache files byte for byte (the
timings in meta.json and report.json aside) or the test metrics to the last digit. Writes
``benchmarks/results/faults.{json,md}``. The cheap cases are also tests (tests/test_faults.py).
Tiny data and models come from the test suite's writers (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ML1M_WORDS, install_raw, tiny_tokenizer, write_ml1m  # noqa: E402

FLIPCTR = [sys.executable, "-m", "flipctr.cli"]
TRAIN_SETS = ["model.embedding_dim=64", "model.dnn_hidden=[32]", "model.cross_layers=1", "train.epochs=4",
              "train.patience=10", "train.progress=false", "train.amp=off", "train.threads=1"]
RUN_SETS = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=3",
            "train.patience=10", "train.progress=false", "pretrain.progress=false", "train.amp=off",
            "pretrain.amp=off", "pretrain.epochs=3", "pretrain.batch_size=16", "pretrain.rows=400",
            "pretrain.lr=1e-3", "text_finetune.epochs=2", "text_finetune.batch_size=32",
            "text_finetune.train_rows=200", "text_finetune.valid_rows=60", "model.plm_trainable_layers=null",
            "train.threads=1"]


class Scratch:
    """The scratch folder: tiny datasets, a tiny language model, and their clean builds."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        self.clicks = self._click_log(work / "clicks", rows=1_500_000, users=200_000, items=50_000)  # prepare: seconds
        self.train_log = self._click_log(work / "train-log", rows=60_000, users=50_000, items=20_000)  # 50 MB checkpoints
        self.ml1m = write_ml1m(work / "raw-ml", n_users=300, n_movies=200, n_ratings=60_000)
        self.small_ml1m = write_ml1m(work / "raw-ml-small")
        self.plm = self._tiny_plm(work / "tiny-bert")

    @staticmethod
    def _click_log(folder: Path, rows: int, users: int, items: int) -> Path:
        """A custom CSV click log whose label depends on the item."""
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        users, items = rng.integers(0, users, rows), rng.integers(0, items, rows)
        frame = pd.DataFrame({"uid": [f"u{u}" for u in users], "item": items, "ts": rng.permutation(rows),
                              "click": (rng.random(rows) < 1 / (1 + np.exp(-np.sin(items)))).astype(int)})
        frame.to_csv(folder / "log.csv", index=False)
        schema = {"name": folder.name, "file": "log.csv", "fields": {"user ID": "uid", "item ID": "item"},
                  "label": {"column": "click"}, "order": "ts"}
        (folder / "log.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
        return folder / "log.yaml"

    @staticmethod
    def _tiny_plm(folder: Path) -> Path:
        import torch
        from transformers import BertConfig, BertModel

        tokenizer = tiny_tokenizer(ML1M_WORDS)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=128), add_pooling_layer=False
                  ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    def home(self, name: str, ml1m: Path | None = None) -> Path:
        """A fresh data home (``FLIPCTR_DATA``), with ML-1M's raw files when asked."""
        home = self.work / "homes" / name
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        if ml1m is not None:
            install_raw(home, "ml-1m", ml1m)
        return home

    def run(self, args: list[str], home: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run([*FLIPCTR, *args], env={**self.env, "FLIPCTR_DATA": str(home)}, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"flipctr {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return proc

    def kill_when(self, args: list[str], home: Path, ready: Callable[[], bool], timeout: float = 600) -> dict:
        """Start ``flipctr args``; SIGKILL it as soon as ``ready()`` holds. Returns what happened."""
        proc = subprocess.Popen([*FLIPCTR, *args], env={**self.env, "FLIPCTR_DATA": str(home)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tick, deadline = time.perf_counter(), time.time() + timeout
        while proc.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return {"killed": proc.returncode == -signal.SIGKILL, "after_seconds": round(time.perf_counter() - tick, 2)}


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by content, timings aside (meta.json's and report.json's seconds)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name in ("meta.json", "report.json"):
            record = json.loads(data)
            record.pop("seconds", None)
            data = json.dumps(record, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


def only_cache(home: Path) -> Path:
    folders = [p for p in (home / "cache").iterdir() if not p.name.startswith(".")]
    if len(folders) != 1:
        raise RuntimeError(f"{home / 'cache'}: {len(folders)} cache folders")
    return folders[0]


def text_folder(cache: Path) -> Path:
    return next(p for p in cache.iterdir() if p.name.startswith("text-"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("flipctr: error:")]
    return lines[-1] if len(lines) == 1 and "Traceback" not in proc.stderr else ""


# ---- the faults -------------------------------------------------------------------------------

def kill_in_prepare(s: Scratch, clean: dict) -> dict:
    home = s.home("kill-prepare")
    kill = s.kill_when(["data", "prepare", str(s.clicks)], home,
                       lambda: (home / "cache").exists() and bool(list((home / "cache").glob(".*.tmp"))))
    whole = [p.name for p in (home / "cache").iterdir() if not p.name.startswith(".")]
    s.run(["data", "prepare", str(s.clicks)], home)
    same = digest(only_cache(home)) == clean["clicks"]
    left = temporaries(home / "cache")
    return {"survived": kill["killed"] and not whole and same and not left,
            "happened": f"killed {kill['after_seconds']} s in, while its temporary cache folder was being written; "
                        f"complete cache folders after the kill: {whole or 'none'}; the re-run built the cache "
                        f"{'byte-identical to' if same else 'DIFFERENT from'} an uninterrupted one; temporaries "
                        f"left after the re-run: {left or 'none'}"}


def two_prepares(s: Scratch, clean: dict) -> dict:
    home = s.home("two-prepares")
    env = {**s.env, "FLIPCTR_DATA": str(home)}
    procs = [subprocess.Popen([*FLIPCTR, "data", "prepare", str(s.clicks)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait(timeout=900) for p in procs]
    folders = [p.name for p in (home / "cache").iterdir() if not p.name.startswith(".")]
    same = len(folders) == 1 and digest(only_cache(home)) == clean["clicks"]
    left = temporaries(home / "cache")
    return {"survived": codes == [0, 0] and same and not left,
            "happened": f"exit codes {codes}; cache folders {len(folders)}, "
                        f"{'byte-identical to' if same else 'NOT equal to'} an uninterrupted build; temporaries "
                        f"left: {left or 'none'} (the second to finish keeps the first one's folder)"}


def kill_in_text_cache(s: Scratch, clean: dict) -> dict:
    home = s.home("kill-text", s.ml1m)
    s.run(["data", "prepare", "ml-1m"], home)  # the table first: the kill lands in the text cache
    cache = only_cache(home)
    kill = s.kill_when(["data", "prepare", "ml-1m", "--plm", str(s.plm)], home,
                       lambda: any(p.name.startswith(".text-") for p in cache.iterdir()))
    complete = [p.name for p in cache.iterdir() if p.name.startswith("text-")]
    s.run(["data", "prepare", "ml-1m", "--plm", str(s.plm)], home)
    same = digest(text_folder(cache)) == clean["text"]
    left = temporaries(cache)
    return {"survived": kill["killed"] and not complete and same and not left,
            "happened": f"killed {kill['after_seconds']} s in, while the tokenized prompts were being written; "
                        f"complete text caches after the kill: {complete or 'none'}; the re-run built them "
                        f"{'byte-identical to' if same else 'DIFFERENT from'} an uninterrupted build; temporaries "
                        f"left: {left or 'none'}"}


def full_disk(s: Scratch, clean: dict) -> dict:
    mount = s.work / "full-disk"
    mount.mkdir(exist_ok=True)
    raw = sum(p.stat().st_size for p in s.train_log.parent.iterdir())
    size = f"size={raw // 1024 + 256}k"  # the raw log and 256 KiB: less than its cache needs
    if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mount)], capture_output=True).returncode:
        return {"survived": None, "happened": "not run: mounting a small tmpfs needs root"}
    try:
        shutil.copytree(s.train_log.parent, mount / "log")
        proc = s.run(["data", "prepare", str(mount / "log" / "log.yaml")], mount, check=False)
        error = one_line_error(proc)
        cache = mount / "cache"
        written = [p.name for p in cache.iterdir()] if cache.exists() else []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    return {"survived": proc.returncode == 2 and "MiB free on its disk" in error and not written,
            "happened": f"exit code {proc.returncode}; the user saw: `{error or proc.stderr.strip()[-300:]}`; "
                        f"left in the cache folder: {written or 'nothing'}"}


def read_only_run_folder(s: Scratch, clean: dict) -> dict:
    mount = s.work / "read-only"
    mount.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True).returncode:
        return {"survived": None, "happened": "not run: mounting a read-only tmpfs needs root"}
    try:
        proc = s.run(["train", "--dataset", str(s.train_log), "--model", "dcnv2", "--run-dir", str(mount / "run"),
                      *[x for t in TRAIN_SETS for x in ("--set", t)]], clean["home"], check=False)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    error = one_line_error(proc)
    return {"survived": proc.returncode == 2 and "Read-only file system" in error and str(mount) in error,
            "happened": f"exit code {proc.returncode}; the user saw: `{error or proc.stderr.strip()[-300:]}`"}


def _train(s: Scratch, run: Path, home: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return s.run(["train", "--dataset", str(s.train_log), "--model", "dcnv2", "--run-dir", str(run),
                  *[x for t in TRAIN_SETS for x in ("--set", t)], *extra], home, check=check)


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def kill_during_checkpoint_write(s: Scratch, clean: dict) -> dict:
    run = s.work / "runs" / "kill-checkpoint-write"
    shutil.rmtree(run, ignore_errors=True)
    kill = s.kill_when(["train", "--dataset", str(s.train_log), "--model", "dcnv2", "--run-dir", str(run),
                        *[x for t in TRAIN_SETS for x in ("--set", t)]], clean["home"],
                       lambda: run.exists() and bool(list(run.glob(".checkpoint-*.tmp"))))
    checkpoint = run / "checkpoint-train.pt"
    before = "absent" if not checkpoint.exists() else "present"
    proc = _train(s, run, clean["home"], "--resume")
    same = _test_metrics(run) == clean["train_test"]
    left = temporaries(run)
    return {"survived": kill["killed"] and same and not left,
            "happened": f"killed {kill['after_seconds']} s in, while a checkpoint's temporary file was being written; "
                        f"the last whole checkpoint was {before} (the half-written one never replaces it); "
                        f"`--resume` {'resumed from it' if 'resumed' in proc.stderr else 'started over'} and ended "
                        f"with test metrics {'equal to' if same else 'DIFFERENT from'} an uninterrupted run's; "
                        f"temporaries left: {left or 'none'}"}


def truncated_checkpoint(s: Scratch, clean: dict) -> dict:
    run = s.work / "runs" / "truncated-checkpoint"
    shutil.rmtree(run, ignore_errors=True)
    checkpoint = run / "checkpoint-train.pt"
    s.kill_when(["train", "--dataset", str(s.train_log), "--model", "dcnv2", "--run-dir", str(run),
                 *[x for t in TRAIN_SETS for x in ("--set", t)]], clean["home"], checkpoint.exists)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    proc = _train(s, run, clean["home"], "--resume", check=False)
    error = one_line_error(proc)
    checkpoint.unlink()
    _train(s, run, clean["home"], "--resume")
    same = _test_metrics(run) == clean["train_test"]
    return {"survived": proc.returncode == 2 and str(checkpoint) in error and "damaged checkpoint" in error and same,
            "happened": f"`--resume` exit code {proc.returncode}; the user saw: `{error[:300]}`; after deleting it, "
                        f"`--resume` started the stage over and ended {'equal to' if same else 'DIFFERENT from'} "
                        "an uninterrupted run"}


def truncated_cache_file(s: Scratch, clean: dict) -> dict:
    home = s.home("truncated-cache")
    s.run(["data", "prepare", str(s.train_log)], home)
    cache = only_cache(home)
    ids = cache / "encoding-fit-train" / "ids.npy"
    data = ids.read_bytes()
    ids.write_bytes(data[: len(data) // 2])
    run = s.work / "runs" / "truncated-cache"
    shutil.rmtree(run, ignore_errors=True)
    proc = _train(s, run, home, check=False)
    error = one_line_error(proc)
    shutil.rmtree(cache)
    shutil.rmtree(run, ignore_errors=True)
    _train(s, run, home)
    same = _test_metrics(run) == clean["train_test"]
    return {"survived": proc.returncode == 2 and str(ids) in error and "damaged cache file" in error and same,
            "happened": f"exit code {proc.returncode}; the user saw: `{error[:300]}`; after deleting the folder as it "
                        f"says, the run rebuilt it and ended {'equal to' if same else 'DIFFERENT from'} an "
                        "uninterrupted run"}


STAGES = ["pretrain", "scratch", "flip_id", "flip_plm", "flip"]


def flip_run_kills(s: Scratch, clean: dict) -> dict[str, dict]:
    """One `flipctr run` killed in each of its five stages in turn, resumed after each kill."""
    run = s.work / "runs" / "flip-killed"
    shutil.rmtree(run, ignore_errors=True)
    args = ["run", "--dataset", "ml-1m", "--profile", "cpu", "--plm", str(s.plm), "--run-dir", str(run),
            *[x for t in RUN_SETS for x in ("--set", t)]]
    kills = {}
    for i, stage in enumerate(STAGES):
        if stage == "pretrain":  # mid-epoch: its first epoch's checkpoint is written, the second epoch runs
            ready = (run / "pretrain" / "pretrain_state.pt").exists
        else:
            ready = lambda folder=run / stage: folder.exists() and bool(list(folder.glob("checkpoint-*.pt")))  # noqa: E731
        kills[stage] = s.kill_when(args + (["--resume"] if i else []), clean["flip_home"], ready)
        if stage == "pretrain":
            epochs = len(json.loads((run / "pretrain" / "pretrain_history.json").read_text()))
            kills[stage]["stage_unfinished"] = epochs < 3
        else:
            kills[stage]["stage_unfinished"] = not (run / stage / "metrics.json").exists()
    proc = s.run(args + ["--resume"], clean["flip_home"], check=False)
    results = json.loads((run / "results.json").read_text())
    out = {}
    for stage in STAGES:
        same = proc.returncode == 0 and all(results["results"][v]["test"] == clean["flip"][v] for v in clean["flip"])
        k = kills[stage]
        out[f"kill-in-{stage.replace('_', '-')}" + ("-mid-epoch" if stage == "pretrain" else "-finetuning")] = {
            "survived": k["killed"] and k["stage_unfinished"] and same,
            "happened": f"killed {k['after_seconds']} s into its process, the stage "
                        f"{'unfinished' if k['stage_unfinished'] else 'ALREADY FINISHED'}; resumed with `--resume` "
                        f"(one run killed in each of the five stages in turn); the four test AUCs at the end "
                        f"{'equal' if same else 'DIFFER from'} the uninterrupted run's"}
    return out


def clean_builds(s: Scratch) -> dict:
    """The uninterrupted references."""
    clean: dict = {"home": s.home("clean"), "flip_home": s.home("clean-flip", s.small_ml1m)}
    s.run(["data", "prepare", str(s.clicks)], clean["home"])
    clean["clicks"] = digest(only_cache(clean["home"]))
    text_home = s.home("clean-text", s.ml1m)
    s.run(["data", "prepare", "ml-1m", "--plm", str(s.plm)], text_home)
    clean["text"] = digest(text_folder(only_cache(text_home)))
    run = s.work / "runs" / "clean-train"
    shutil.rmtree(run, ignore_errors=True)
    _train(s, run, clean["home"])
    clean["train_test"] = _test_metrics(run)
    flip = s.work / "runs" / "clean-flip"
    shutil.rmtree(flip, ignore_errors=True)
    s.run(["run", "--dataset", "ml-1m", "--profile", "cpu", "--plm", str(s.plm), "--run-dir", str(flip),
           *[x for t in RUN_SETS for x in ("--set", t)]], clean["flip_home"])
    clean["flip"] = {v: r["test"] for v, r in json.loads((flip / "results.json").read_text())["results"].items()}
    return clean


FAULTS: dict[str, tuple[str, Callable[[Scratch, dict], dict]]] = {
    "kill-in-data-prepare": ("SIGKILL while `data prepare` writes the cache", kill_in_prepare),
    "kill-in-text-cache": ("SIGKILL while the tokenized prompts are written", kill_in_text_cache),
    "kill-during-checkpoint-write": ("SIGKILL while a checkpoint's file is being written", kill_during_checkpoint_write),
    "two-prepares-at-once": ("two `data prepare` of one dataset started together", two_prepares),
    "full-disk": ("the data home on a disk 256 KiB larger than the raw log (ENOSPC)", full_disk),
    "read-only-run-folder": ("`train --run-dir` on a read-only file system", read_only_run_folder),
    "truncated-checkpoint": ("a checkpoint cut to half its bytes, then `--resume`", truncated_checkpoint),
    "truncated-cache-file": ("the cache's ids.npy cut to half its bytes, then `train`", truncated_cache_file),
}
RUN_FAULTS = {f"kill-in-{st.replace('_', '-')}" + ("-mid-epoch" if st == "pretrain" else "-finetuning"):
              f"SIGKILL in `flipctr run`'s {st} stage" for st in STAGES}


def render(report: dict) -> str:
    survived = sum(f["survived"] is True for f in report["faults"])
    lines = ["# Fault table", "", f"Command: `{report['command']}` ({report['seconds']:.0f} s; {report['machine']})", "",
             f"{survived} of {len(report['faults'])} injected faults survived "
             "(a clear error naming the file, or a re-run that ends as an uninterrupted run; nothing half-written read).",
             "", "| fault | injected | survived | what happened |", "|---|---|---|---|"]
    for f in report["faults"]:
        mark = {True: "yes", False: "**NO**", None: "not run"}[f["survived"]]
        lines.append(f"| {f['name']} | {f['injected']} | {mark} | {f['happened']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/flipctr-faults"))
    parser.add_argument("--only", nargs="+", help="fault names (the flip-run kills: kill-in-<stage>...)")
    parser.add_argument("--name", default="faults")
    args = parser.parse_args()
    tick = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    scratch = Scratch(args.work)
    clean = clean_builds(scratch)
    faults = []
    for name, (injected, inject) in FAULTS.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        outcome = inject(scratch, clean)
        faults.append({"name": name, "injected": injected, **outcome, "seconds": round(time.perf_counter() - start, 1)})
        print(f"[faults] {name}: survived={outcome['survived']}", file=sys.stderr)
    if not args.only or set(args.only) & set(RUN_FAULTS):
        for name, outcome in flip_run_kills(scratch, clean).items():
            faults.append({"name": name, "injected": RUN_FAULTS[name], **outcome})
            print(f"[faults] {name}: survived={outcome['survived']}", file=sys.stderr)
    report = {"command": "python benchmarks/faults.py" + "".join(f" {a}" for a in sys.argv[1:]),
              "seconds": time.perf_counter() - tick, "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
              "faults": faults}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
