"""The offline GPU recipe, end to end on the CPU with tiny data and a tiny encoder:
`benchmarks/gpu/pack.py` builds the pack, `benchmarks/gpu/oneshot.sh` runs the preflight and the
`gpu` profile under time budgets from it, with at most 8 files in OUT."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.amp=off", "pretrain.amp=off",
        "text_finetune.batch_size=64", "train.eval_batch_size=256"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pack(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    from flipctr.models.language import LanguageModel

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    pack = _load("pack").build_pack(tmp_path / "pack", "ml-1m", str(tiny_plm), limit_mib=60)
    assert (pack / "raw-ml-1m.tar.xz").exists() and (pack / "plm" / "tokenizer.json").exists()
    assert {v.dtype for v in load_file(str(pack / "plm" / "model.safetensors")).values()
            if v.is_floating_point()} == {torch.bfloat16}
    # the bf16 copy comes back as fp32 master weights
    assert {p.dtype for p in LanguageModel.from_pretrained(str(pack / "plm")).parameters()} == {torch.float32}
    return pack


def _oneshot(pack: Path, out: Path, work: Path, *options: str) -> tuple[subprocess.CompletedProcess, float]:
    # a fresh data folder, as on the GPU machine; python3 is this interpreter, flipctr comes from src
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WORLD_SIZE": "1"}
    tick = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "oneshot.sh"), str(pack), str(out),
                           "--work", str(work), "--expect-device", "cpu", *(x for t in TINY for x in ("--set", t)),
                           *options], env=env, capture_output=True, text=True, timeout=600)
    return done, time.monotonic() - tick


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_oneshot_runs_the_four_models_within_its_budgets(pack, tmp_path):
    out = tmp_path / "out"
    # budgets that cannot hold the epochs asked for: pretraining is cut by its budget (mid-epoch:
    # 60 steps an epoch), every finetuning stage by its own
    # a generous preflight limit: here it takes ~10 s, but a loaded machine must not fail the test
    done, seconds = _oneshot(pack, out, tmp_path / "work", "--seconds", "150", "--preflight-seconds", "90",
                             "--reserve", "40", "--every", "2",
                             "--run-set", "pretrain.epochs=500", "--run-set", "pretrain.batch_size=8",
                             "--run-set", "train.epochs=100000", "--run-set", "train.patience=100000",
                             "--run-set", "text_finetune.epochs=100000")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert seconds < 150
    files = sorted(p.name for p in out.iterdir())
    assert files == ["machine.txt", "oneshot.log", "preflight.tar.gz", "results.json", "results.md", "run.tar.gz"]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and set(results["results"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    assert results["refit"] == {"id": False, "text": False} and results["profile"] == "gpu"
    budgets = results["max_seconds"]
    assert all(budgets[k] > 0 for k in ("pretrain", "train", "text_finetune"))
    for variant, metrics in results["results"].items():
        assert metrics["stopped"] == "budget", variant
        # a stage ends before the evaluation that would come past its budget
        limit = budgets["text_finetune" if variant in ("flip_plm", "flip") else "train"]
        assert metrics["fit_seconds"] <= limit + 2, (variant, metrics["fit_seconds"], limit)
    log = (out / "oneshot.log").read_text()
    assert "preflight passed" in log and " preflight] " in log and " run] " in log and " prepare] " in log
    members = _members(out / "run.tar.gz")
    assert not any(name.endswith((".safetensors", ".pt")) for name in members)
    history = json.loads(members["run/pretrain/pretrain_history.json"])
    assert history[-1].get("stopped_by_budget") and len(history) < 500
    assert sum(r["seconds"] for r in history) <= budgets["pretrain"] + 3  # a step or two past it at most
    assert json.loads(members["run/results.json"]) == results
    preflight = _members(out / "preflight.tar.gz")
    assert set(json.loads(preflight["preflight/results.json"])["results"]) == set(results["results"])
    assert "Stopped by their budget: dcnv2 (from scratch), FLIP_ID, FLIP_PLM, FLIP." in (out / "results.md").read_text()
    # the benchmark result a GPU session commits, from what came back
    collect = _load("collect")
    result = collect.collect(out, "bash benchmarks/gpu/oneshot.sh gpu-pack OUT")
    assert result["complete"] and result["command_status"] == 0 and result["device"] == "cpu"
    assert result["pretraining"] == history and result["max_seconds"] == budgets
    assert {v: m["test"] for v, m in result["models"].items()} == {v: m["test"] for v, m in results["results"].items()}
    table = collect.render(result)
    assert "| flip_plm | " in table and "budget" in table and "α after training" in table


def test_a_failing_preflight_stops_the_command_at_once(pack, tmp_path):
    out = tmp_path / "out"
    done, seconds = _oneshot(pack, out, tmp_path / "work", "--preflight-set", "train.amp=fp8")
    assert done.returncode == 3, done.stdout[-3000:]
    assert seconds < 60
    assert sorted(p.name for p in out.iterdir()) == ["machine.txt", "oneshot.log", "preflight.tar.gz"]
    log = (out / "oneshot.log").read_text()
    assert "PREFLIGHT FAILED: exit status" in log and "train.amp must be" in log
    assert not (tmp_path / "work" / "run").exists()


def test_preflight_check_names_what_is_wrong(tmp_path):
    check = _load("oneshot").check_preflight
    assert check(tmp_path, "cuda") == ["no results.json"]
    (tmp_path / "results.json").write_text(json.dumps({"results": {"scratch": {"test": {"auc": 0.7}}}}))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "environment.json").write_text(json.dumps({"device": "cpu", "amp": "None"}))
    problems = check(tmp_path, "cuda")
    assert any("not all four models" in p for p in problems)
    assert "scratch: ran on 'cpu', not cuda" in problems and "scratch: autocast 'None', not bf16" in problems
    assert "FLIP reports no α" in problems and "no pretrained weights" in problems


def test_archive_keeps_small_files_only(tmp_path):
    archive = _load("oneshot").archive
    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "pretrain" / "pretrain_history.json").write_text("[]")
    (run / "pretrain" / "pretrained.safetensors").write_bytes(b"0" * 100)
    (run / "checkpoint-train.pt").write_bytes(b"0" * 100)
    (run / "big.log").write_bytes(b"0" * (3 << 20))
    archive({"run": run}, tmp_path / "out.tar.gz")
    assert set(_members(tmp_path / "out.tar.gz")) == {"run/results.json", "run/pretrain/pretrain_history.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_budgets_share_what_is_left():
    budgets = _load("oneshot").budgets
    shares = {"pretrain": 2, "scratch": 1, "flip_id": 1, "flip_plm": 3, "flip": 3}
    assert budgets(100.0, shares) == pytest.approx({"pretrain": 20.0, "train": 10.0, "text_finetune": 30.0})


def test_the_speed_script_measures_every_stage_on_both_paths(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    """benchmarks/gpu/speed.py on the CPU with tiny shapes: every stage, eager and fast, a
    samples/s and the epochs' losses, a profiler table for the fast path, the pretraining step's
    capture; both files written."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import speed

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    speed.main([str(tmp_path / "out"), "--plm", str(tiny_plm), "--rows", "400", "--steps", "1", "--device", "cpu",
                "--set", "pretrain.batch_size=32", "--set", "train.batch_size=64", "--set", "model.embedding_dim=4",
                "--set", "text_finetune.batch_size=64", "--set", "train.amp=off", "--set", "pretrain.amp=off"])
    report = json.loads((tmp_path / "out" / "speed.json").read_text())
    rows = {(r["stage"], r["path"]): r for r in report["results"]}
    assert set(rows) == {(s, p) for s in speed.STAGES for p in ("eager", "fast")}
    for (stage, path), r in rows.items():
        assert r["samples_per_second"] > 0 and len(r["losses"]) == 2, (stage, path)
        assert (r["profile"] is not None) == (path == "fast")
    # the fast path on a CPU is the eager one (the 4-D mask is CUDA's): the same losses
    assert rows[("pretrain", "fast")]["losses"] == rows[("pretrain", "eager")]["losses"]
    assert "| pretrain | fast |" in (tmp_path / "out" / "speed.md").read_text()
    # the real stage's first batch (masks, target count and noise drawn ahead) is captured whole
    assert report["trace"] == {"whole": True, "graphs": 1, "data_dependent": [], "host_reads": [], "error": None}
    assert "captured whole (one graph, static shapes, no host read): yes" in (tmp_path / "out" / "speed.md").read_text()


def test_the_paper_setting_in_two_stages_carries_the_pretraining_back_and_forth(pack, tmp_path):
    """`--stage pretrain` leaves the pretrained weights in OUT as bf16 shards under the size limit
    (at most 8 files); `--stage finetune` on a fresh machine (another work folder) finetunes the
    four models from those shards, refit as the paper profile says."""
    small = ["--set", "pretrain.batch_size=8", "--set", "pretrain.epochs=2", "--set", "pretrain.rows=48",
             "--set", "train.epochs=1",
             "--set", "text_finetune.epochs=1", "--set", "text_finetune.train_rows=200",
             "--set", "text_finetune.valid_rows=60", "--preflight-seconds", "90", "--reserve", "20"]
    out = tmp_path / "out-pretrain"
    done, _ = _oneshot(pack, out, tmp_path / "work-a", "--profile", "paper", "--stage", "pretrain",
                       "--seconds", "200", "--shard-mib", "0.035", *small)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("pretrained-")]
    assert len(files) <= 8 and len(shards) >= 2, files
    assert set(files) - set(shards) == {"machine.txt", "oneshot.log", "preflight.tar.gz", "run.tar.gz"}
    assert all((out / f).stat().st_size <= 0.035 * 2**20 for f in shards)
    history = json.loads(_members(out / "run.tar.gz")["run/pretrain/pretrain_history.json"])
    assert len(history) == 2
    out2 = tmp_path / "out-finetune"
    done, _ = _oneshot(pack, out2, tmp_path / "work-b", "--profile", "paper", "--stage", "finetune",
                       "--pretrained", str(out), "--seconds", "300", *small)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    results = json.loads((out2 / "results.json").read_text())
    assert results["complete"] and set(results["results"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    assert results["pretrained"] and results["profile"] == "paper" and results["refit"] == {"id": True, "text": True}
    assert "preflight.tar.gz" not in {p.name for p in out2.iterdir()}
