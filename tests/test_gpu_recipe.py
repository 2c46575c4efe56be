"""The offline GPU recipe, end to end on the CPU with tiny data and a tiny encoder:
`benchmarks/gpu/pack.py` builds the pack, `benchmarks/gpu/run.sh` runs the `gpu` profile from
it in calls that resume."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=1",
        "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
        "pretrain.epochs=1", "pretrain.batch_size=64", "text_finetune.epochs=1", "text_finetune.batch_size=64",
        "train.eval_batch_size=256"]


def _load_pack_module():
    spec = importlib.util.spec_from_file_location("gpu_pack", ROOT / "benchmarks" / "gpu" / "pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_then_run_in_resuming_steps(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    from flipctr.models.language import LanguageModel

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    pack = _load_pack_module().build_pack(tmp_path / "pack", "ml-1m", str(tiny_plm), limit_mib=60)
    assert (pack / "raw-ml-1m.tar.xz").exists() and (pack / "plm" / "tokenizer.json").exists()
    assert {v.dtype for v in load_file(str(pack / "plm" / "model.safetensors")).values()
            if v.is_floating_point()} == {torch.bfloat16}
    # the bf16 copy comes back as fp32 master weights
    assert {p.dtype for p in LanguageModel.from_pretrained(str(pack / "plm")).parameters()} == {torch.float32}

    # a fresh data folder, as on the GPU machine; python3 is this interpreter
    env = {**os.environ, "FLIPCTR_DATA": str(tmp_path / "gpu-data"), "FLIPCTR_NO_INSTALL": "1", "THROUGHPUT_BATCH": "8",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sets = [x for t in TINY for x in ("--set", t)]

    def call(*extra):
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(pack), str(tmp_path / "out"),
                               "300", *sets, *extra], env=env, capture_output=True, text=True, timeout=600)

    first = call("--variants", "scratch", "flip_id")  # a first step that ends after two models
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    second = call()
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "done:" in second.stdout
    assert "scratch: finished earlier" in second.stderr and "flip_id: finished earlier" in second.stderr
    assert "resumed pretraining" not in first.stderr
    assert "resumed pretraining after epoch 1" in second.stderr  # the finished pretraining is read back
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"scratch", "flip_id", "flip_plm", "flip"} and results["profile"] == "gpu"
    assert results["results"]["flip_id"]["test"] == json.loads((out / "flip_id_metrics.json").read_text())["test"]
    assert (out / "pretrain_pretrain_history.json").exists() and (out / "train.log").exists()
    throughput = json.loads((out / "pretrain_throughput.json").read_text())  # measured once, before the run
    assert [r["setting"] for r in throughput["results"]] == ["trained", "frozen"]
    assert all(r["ratio"] > 0 and r["batch_size"] == 8 for r in throughput["results"])
    assert first.stdout.count("FLIP pretraining throughput") == 1 and "throughput" not in second.stdout
    config = (out / "config.yaml").read_text()
    assert "plm_trainable_layers: null" in config  # the language model trains in the gpu profile
