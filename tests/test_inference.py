"""Using a trained run: flipctr.load, flipctr predict, flipctr export (ONNX)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

import flipctr
from flipctr.cli import main
from flipctr.data.errors import DataError
from flipctr.runs.protocol import evaluate_run, train_run

from conftest import tiny_config


def _custom_dataset(tmp_path, n=1200):
    """A click log whose label depends on the item (and a little on the user), with a text
    timestamp column; 10 % of the rows, the latest, are the test split."""
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 40, n), rng.integers(0, 60, n)
    p = 1 / (1 + np.exp(-(np.sin(items) * 2 + (users % 3 - 1) * 0.5)))
    frame = pd.DataFrame({"uid": [f"u{u}" for u in users], "item": items, "ts": rng.permutation(n) * 60,
                          "click": (rng.random(n) < p).astype(int)})
    frame.to_csv(tmp_path / "log.csv", index=False)
    schema = {"name": "log", "file": "log.csv", "fields": {"user ID": "uid", "item ID": "item"},
              "label": {"column": "click"}, "order": "ts"}
    (tmp_path / "log.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom")
    frame = _custom_dataset(tmp)
    cfg = tiny_config(epochs=3)
    cfg.data.dataset = str(tmp / "log.yaml")
    cfg.model.name = "dcnv2"
    train_run(cfg, tmp / "run", data_root=tmp / "home")
    return tmp, frame


def test_predict_on_held_out_rows_matches_evaluate(trained, tmp_path, capsys):
    tmp, frame = trained
    test_rows = frame.iloc[len(frame) - 120:]  # the last 10 % in time: the run's test split
    test_rows.to_csv(tmp_path / "held_out.csv", index=False)
    assert main(["predict", "--run-dir", str(tmp / "run"), "--input", str(tmp_path / "held_out.csv"),
                 "--output", str(tmp_path / "scores.csv")]) == 0
    out = pd.read_csv(tmp_path / "scores.csv")
    assert list(out.columns) == ["score", "label"] and len(out) == 120
    np.testing.assert_array_equal(out["label"], test_rows["click"])
    from sklearn.metrics import roc_auc_score

    expected = evaluate_run(tmp / "run", data_root=tmp / "home")["test"]["auc"]
    assert roc_auc_score(out["label"], out["score"]) == pytest.approx(expected, abs=1e-6)
    assert f"AUC {expected:.6f}" in capsys.readouterr().err
    # the same scores from Python, in one line
    scores = flipctr.load(tmp / "run").predict(test_rows)
    np.testing.assert_allclose(scores, out["score"], atol=1e-6)


def test_run_folder_reads_like_a_hugging_face_one(trained):
    tmp, _ = trained
    config = json.loads((tmp / "run" / "config.json").read_text())
    assert config["model"]["name"] == "dcnv2" and config["columns"] == {"user ID": "uid", "item ID": "item"}
    assert (tmp / "run" / "model.safetensors").exists() and (tmp / "run" / "vocab.parquet").exists()


def test_unseen_values_missing_columns_and_bad_files(trained, tmp_path):
    tmp, frame = trained
    model = flipctr.load(tmp / "run")
    unseen = pd.DataFrame({"uid": ["never-seen", "u1"], "item": [10_000, 3]})
    ids = model.encode(unseen)
    offsets = [f.offset for f in model.encoder.feature_map.fields]
    assert ids[0].tolist() == offsets  # every unseen value is its field's OOV id
    assert np.isfinite(model.predict(unseen)).all()
    with pytest.raises(DataError, match="missing column.*'item'"):
        model.predict(unseen[["uid"]])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    assert main(["predict", "--run-dir", str(tmp / "run"), "--input", str(tmp_path / "broken.parquet"),
                 "--output", str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "o.csv").exists()


def test_onnx_export_matches_pytorch(trained, tmp_path):
    import onnxruntime as ort
    tmp, frame = trained
    assert main(["export", "--run-dir", str(tmp / "run"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    model = flipctr.load(tmp / "run")
    before = model.predict(frame)
    model.export_onnx(tmp_path / "again.onnx")
    np.testing.assert_array_equal(model.predict(frame), before)  # exporting leaves the model as it was
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for rows in (frame.iloc[:1], frame.iloc[:333]):  # the batch size is dynamic
        ids = model.encode(rows).astype(np.int64)
        onnx_scores = session.run(None, {"ids": ids})[0]
        np.testing.assert_allclose(onnx_scores, model.predict(rows), atol=1e-5)


def test_train_killed_mid_run_resumes_to_the_same_metrics(tmp_path):
    """A `flipctr train` process is killed after its first checkpoint; `--resume` goes on from
    there and ends with the metrics of a run that was never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _custom_dataset(tmp_path, n=30_000)
    env = {**os.environ, "FLIPCTR_DATA": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    sets = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=6",
            "train.patience=10", "train.progress=false", "train.amp=off", "train.threads=1"]

    def command(run, *extra):
        return [sys.executable, "-m", "flipctr.cli", "train", "--dataset", str(tmp_path / "log.yaml"), "--model",
                "dcnv2", "--run-dir", str(tmp_path / run), *[x for s in sets for x in ("--set", s)], *extra]

    subprocess.run(command("whole"), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint-train.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()  # it really was stopped mid-run
    resumed = subprocess.run(command("killed", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed train after epoch" in resumed.stderr
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    again = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert again["test"] == whole["test"] and again["valid"] == whole["valid"]
    assert again["best_epoch"] == whole["best_epoch"]
    assert not (tmp_path / "killed" / "checkpoint-train.pt").exists()  # removed once complete


@pytest.mark.parametrize("model", ["plm", "flip"])
def test_predict_replays_the_runs_precision(ml1m_root, tiny_plm, tmp_path, monkeypatch, model):
    """A frozen encoder's [CLS] vectors are computed in bf16 weights when the run trains in bf16;
    scoring the run's test rows must use the same precision, or its scores (and Logloss) differ."""
    import flipctr
    from sklearn.metrics import log_loss, roc_auc_score

    from conftest import held_out_rows

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    sets = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=2",
            "train.progress=false", "train.amp=bf16", "model.plm_trainable_layers=0", "train.batch_size=64",
            "train.lr=1e-2"]
    run = tmp_path / model
    assert main(["train", "--dataset", "ml-1m", "--model", model, "--plm", str(tiny_plm), "--run-dir", str(run),
                 *[x for s in sets for x in ("--set", s)]]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "config.json").read_text())["amp"] == "bf16"
    rows = held_out_rows(ml1m_root)
    scores = flipctr.load(run).predict(rows)
    assert roc_auc_score(rows["label"], scores) == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert log_loss(rows["label"], scores.astype(np.float64)) == pytest.approx(metrics["test"]["logloss"], abs=1e-6)


def test_predict_applies_the_runs_label_rule_with_drop_equal(tmp_path, capsys):
    """A rating threshold with drop_equal: rows at the threshold are no samples in training, and
    `predict` (which reads the rule from the run folder) leaves their label empty and out of the
    metrics."""
    rng = np.random.default_rng(1)
    n = 600
    items = rng.integers(0, 30, n)
    rating = np.clip(np.round(3 + np.sin(items) * 2 + rng.normal(0, 0.7, n)), 1, 5).astype(int)
    frame = pd.DataFrame({"uid": [f"u{u}" for u in rng.integers(0, 20, n)], "item": items, "rating": rating})
    frame.to_csv(tmp_path / "log.csv", index=False)
    schema = {"file": "log.csv", "fields": {"user ID": "uid", "item ID": "item"},
              "label": {"column": "rating", "threshold": 3, "drop_equal": True}}
    (tmp_path / "log.yaml").write_text(yaml.safe_dump(schema))
    cfg = tiny_config(epochs=2)
    cfg.data.dataset = str(tmp_path / "log.yaml")
    train_run(cfg, tmp_path / "run", data_root=tmp_path / "home")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["label"] == {
        "column": "rating", "threshold": 3.0, "drop_equal": True}
    rows = frame.iloc[-100:]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert main(["predict", "--run-dir", str(tmp_path / "run"), "--input", str(tmp_path / "rows.csv"),
                 "--output", str(tmp_path / "scores.csv")]) == 0
    out = pd.read_csv(tmp_path / "scores.csv")
    at_threshold = (rows["rating"] == 3).to_numpy()
    assert 0 < at_threshold.sum() < 100 and len(out) == 100
    assert out["label"][at_threshold].isna().all()
    np.testing.assert_array_equal(out["label"][~at_threshold], (rows["rating"][~at_threshold] > 3).astype(int))
    assert f"({(~at_threshold).sum()} labelled rows)" in capsys.readouterr().err
