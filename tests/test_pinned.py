"""Numbers pinned before the training floor moved code: a tiny FLIP run (pretraining losses per
epoch, the four finetuned models' metrics) and a tiny DCNv2 run must stay what they were. A
change that alters them on purpose (e.g. the order of random draws) says so and updates them
with the evidence that the real runs stay within their noise.

The values come from this code on the test fixtures, amp off, in a process that runs one code
path on any x86-64 CPU (``REPRODUCIBLE``; checked here: the same digits with MKL held to SSE4.2).
The tolerance is for float noise only; a change of the computation or of the random draws
moves these numbers by far more."""

import json
import os
import subprocess
import sys

import pytest

# one code path on every x86-64 CPU: ATen's scalar kernels, oneDNN's SSE4.1 kernels, MKL's
# conditional numerical reproducibility, one thread; without them the ISA of the machine shows
# in the last bits, and Adam makes those lr-sized (AUCs of a tiny run move by ~0.01)
REPRODUCIBLE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def main(args: list[str]) -> int:
    """``flipctr ARGS`` in a process of its own with the reproducible settings."""
    env = {**os.environ, **REPRODUCIBLE, "FLIPCTR_DATA": os.environ["FLIPCTR_DATA"]}
    done = subprocess.run([sys.executable, "-m", "flipctr.cli", *args, "--set", "train.threads=1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode

TINY = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.progress=false",
        "pretrain.progress=false", "train.amp=off", "pretrain.amp=off", "train.epochs=3", "train.patience=2",
        "pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.rows=200", "pretrain.lr=1e-3",
        "text_finetune.epochs=2", "text_finetune.batch_size=32", "text_finetune.train_rows=120",
        "text_finetune.valid_rows=40", "train.eval_batch_size=256"]
PINNED_FLIP = {
    "pretrain": [
        {
            "loss": 11.53604016985212,
            "mlm": 4.000464030674526,
            "mtm": 4.2179911477225165,
            "icl": 3.3175858088902066
        },
        {
            "loss": 11.45382799421038,
            "mlm": 3.9442481994628906,
            "mtm": 4.189076287405832,
            "icl": 3.3205032348632812
        }
    ],
    "scratch": {
        "test": {
            "auc": 0.365,
            "logloss": 0.6931372172766358
        },
        "valid": {
            "auc": 0.6685606060606061,
            "logloss": 0.6919452786455031
        },
        "best_epoch": 1.0
    },
    "flip_id": {
        "test": {
            "auc": 0.3283333333333333,
            "logloss": 0.6935193371018665
        },
        "valid": {
            "auc": 0.6212121212121212,
            "logloss": 0.6915002673808825
        },
        "best_epoch": 1.0
    },
    "flip_plm": {
        "test": {
            "auc": 0.5916666666666667,
            "logloss": 0.6770340434695101
        },
        "valid": {
            "auc": 0.5093333333333333,
            "logloss": 0.6786216003341299
        },
        "best_epoch": 1.0
    },
    "flip": {
        "test": {
            "auc": 0.32999999999999996,
            "logloss": 0.6737723271144549
        },
        "valid": {
            "auc": 0.6293333333333334,
            "logloss": 0.6644661662867177
        },
        "best_epoch": 1.0
    },
    "alpha": 0.509419322013855
}
PINNED_DCNV2 = {
    "test": {
        "auc": 0.41000000000000003,
        "logloss": 0.6928806866990465
    },
    "valid": {
        "auc": 0.6988636363636365,
        "logloss": 0.690055030264487
    },
    "test_before_refit": {
        "auc": 0.505,
        "logloss": 0.6921409973034994
    },
    "best_epoch": 2.0,
    "train_loss": [
        0.687289081042326,
        0.6343264809137659,
        0.6133870185176028,
        0.6025465566900712
    ]
}


def _flat(tree, prefix: str = "") -> dict[str, float]:
    """Nested dicts and lists as {"a.b.0": number}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {k: v for key, sub in items for k, v in _flat(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def _close(value, pinned) -> None:
    assert _flat(value) == pytest.approx(_flat(pinned), rel=1e-4, abs=1e-5)


def test_tiny_flip_run_gives_the_pinned_numbers(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    args = ["run", "--dataset", "ml-1m", "--profile", "cpu", "--run-dir", str(tmp_path / "run"), "--plm",
            str(tiny_plm), "--set", "model.plm_trainable_layers=null", *[x for t in TINY for x in ("--set", t)]]
    assert main(args) == 0
    history = json.loads((tmp_path / "run" / "pretrain" / "pretrain_history.json").read_text())
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    got = {"pretrain": [{k: r[k] for k in ("loss", "mlm", "mtm", "icl")} for r in history],
           **{v: {"test": m["test"], "valid": m["valid"], "best_epoch": m["best_epoch"]}
              for v, m in report["results"].items()},
           "alpha": report["results"]["flip"]["alpha"]}
    _close(got, PINNED_FLIP)


def test_tiny_dcnv2_run_gives_the_pinned_numbers(ml1m_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    args = ["train", "--dataset", "ml-1m", "--model", "dcnv2", "--run-dir", str(tmp_path / "run"),
            *[x for t in TINY for x in ("--set", t)], "--set", "train.epochs=5", "--set", "train.seed=1"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    got = {k: metrics[k] for k in ("test", "valid", "test_before_refit", "best_epoch")}
    got["train_loss"] = [r["train_loss"] for r in metrics["history"]]
    _close(got, PINNED_DCNV2)
