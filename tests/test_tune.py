"""``flipctr tune``: the search space's errors, a search killed mid-trial that resumes with the
same command, best.yaml re-running the best trial, and workers sharing one study."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from flipctr.cli import main  # noqa: E402

TINY = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.progress=false",
        "train.epochs=3", "train.batch_size=64", "train.amp=off"]


def _args(run_dir: Path, space: Path, *extra: str) -> list[str]:
    return ["tune", "--dataset", "ml-1m", "--model", "dcnv2", "--space", str(space), "--run-dir", str(run_dir),
            *[x for s in TINY for x in ("--set", s)], *extra]


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("train.nope: [1, 2]\n", "unknown setting"),
    ("lr: [1, 2]\n", "unknown setting"),
    ("train.lr: []\n", "empty list"),
    ("train.lr: {low: 0.1, high: 0.01}\n", "low must be a number below high"),
    ("train.lr: {low: 0.0, high: 0.1, log: true}\n", "log range needs low > 0"),
    ("train.batch_size: [32, fast]\n", "not a valid value"),
    ("train.lr: 0.1\n", "list of values or a range"),
])
def test_a_bad_space_is_one_clear_error_before_any_trial(ml1m_root, tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, text)
    assert main(_args(tmp_path / "run", space)) == 2
    err = capsys.readouterr().err
    assert message in err and str(space) in err
    assert not (tmp_path / "run" / "trials").exists()


def test_the_grid_sampler_refuses_ranges(ml1m_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, "train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert main(_args(tmp_path / "run", space, "--sampler", "grid")) == 2
    assert "grid sampler needs lists" in capsys.readouterr().err


def test_resume_without_a_study_is_an_error(ml1m_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, "train.lr: [1.0e-3, 1.0e-2]\n")
    assert main(_args(tmp_path / "run", space, "--resume")) == 2
    assert "no study to resume" in capsys.readouterr().err


KILLER = """
import os, signal, sys
import flipctr.runs.tune as tune
real = tune.train_run
calls = []

def train_run(cfg, folder, *args, on_epoch_end=None, **kwargs):
    calls.append(folder)

    def report(record):
        on_epoch_end(record)
        if len(calls) == 3:  # the third trial, after its first epoch
            if os.environ["KILL"] == "hard":
                os._exit(9)  # nothing cleaned up: the trial stays "running"
            os.kill(os.getpid(), signal.SIGTERM)

    return real(cfg, folder, *args, on_epoch_end=report, **kwargs)

tune.train_run = train_run
from flipctr.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kill", ["hard", "term"])
def test_a_search_killed_mid_trial_resumes_with_the_same_command(ml1m_root, tmp_path, monkeypatch, kill):
    """Killed in its third trial (SIGKILL-like, or SIGTERM), the same command fails that trial,
    runs its settings again and ends with 4 trials and a refit test AUC; best.yaml re-runs the
    best trial's settings."""
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, """\
        train.lr: [1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]
        """)
    run_dir = tmp_path / "run"
    args = _args(run_dir, space, "--trials", "4", "--sampler", "grid", "--pruner", "none")
    env = {**os.environ, "KILL": kill, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode != 0 and (kill == "term" or killed.returncode == 9), killed.stderr[-2000:]
    assert not (run_dir / "tune.json").exists()
    import optuna

    before = optuna.load_study(study_name="flipctr-tune", storage=f"sqlite:///{run_dir / 'study.db'}")
    states = [t.state.name for t in before.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING" if kill == "hard" else "FAIL"]
    cut_off = before.trials[2].params

    assert main(args) == 0  # the same command
    rows = _rows(run_dir)
    assert [r["state"] for r in rows].count("COMPLETE") == 4
    assert [r["state"] for r in rows].count("FAIL") == 1  # the killed one, said so
    retried = [r for r in rows if r["state"] == "COMPLETE" and float(r["params_train.lr"]) == cut_off["train.lr"]]
    assert len(retried) == 1
    assert sorted(float(r["params_train.lr"]) for r in rows if r["state"] == "COMPLETE") == [1e-3, 3e-3, 1e-2, 3e-2]
    summary = json.loads((run_dir / "tune.json").read_text())
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: float(r["value"]))
    assert summary["best_valid_auc"] == pytest.approx(float(best["value"]))
    assert 0 < summary["test"]["auc"] < 1
    best_metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    assert best_metrics["test"] == summary["test"] and best_metrics["refit_epochs"] > 0
    # the trials never saw test: their folders hold validation metrics only
    trial_metrics = json.loads((Path(best["user_attrs_run_dir"]) / "metrics.json").read_text())
    assert trial_metrics["test"] is None and trial_metrics["test_before_refit"] is None
    assert not list(Path(best["user_attrs_run_dir"]).glob("*.safetensors"))
    for name in ("history.png", "best.yaml", "trials.csv"):
        assert (run_dir / name).stat().st_size > 0

    again = tmp_path / "again"  # best.yaml holds the best trial's settings
    assert main(["train", "--config", str(run_dir / "best.yaml"), "--run-dir", str(again)]) == 0
    rerun = json.loads((again / "metrics.json").read_text())
    assert rerun["valid"]["auc"] == pytest.approx(float(best["value"]), abs=1e-9)
    assert rerun["test"] == pytest.approx(summary["test"])

    assert main([*args, "--resume"]) == 0  # a finished search: nothing more runs
    assert len(_rows(run_dir)) == len(rows)


def test_another_search_in_the_same_folder_is_refused(ml1m_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, "train.lr: [1.0e-3, 1.0e-2]\n")
    assert main(_args(tmp_path / "run", space, "--trials", "2", "--sampler", "grid")) == 0
    other = tmp_path / "other.yaml"
    other.write_text("train.lr: [1.0e-3, 3.0e-2]\n")
    assert main(_args(tmp_path / "run", other, "--trials", "2", "--sampler", "grid")) == 2
    assert "another search" in capsys.readouterr().err


def test_workers_share_one_study(ml1m_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    space = _space(tmp_path, """\
        train.lr: {low: 1.0e-4, high: 3.0e-2, log: true}
        model.dropout: {low: 0.0, high: 0.3}
        """)
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, space, "--trials", "4", "--workers", "2", "--pruner", "halving")) == 0
    rows = _rows(run_dir)
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert 4 <= len(done) <= 5  # a worker may start one more while the other finishes the 4th
    # each worker samples with its own seed: no two trials propose the same settings
    assert len({(r["params_train.lr"], r["params_model.dropout"]) for r in rows}) == len(rows)
    assert all((Path(r["user_attrs_run_dir"]) / "train.log").exists() for r in done)
    assert (run_dir / "best" / "model.safetensors").exists()


def test_a_flip_search_pretrains_once_and_tunes_the_joint_models_finetuning(ml1m_root, tiny_plm, tmp_path,
                                                                             monkeypatch, capsys):
    import flipctr.runs.flip as flip_run

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    pretrainings = []
    real = flip_run._pretrain
    monkeypatch.setattr(flip_run, "_pretrain", lambda *a, **k: pretrainings.append(a[4]) or real(*a, **k))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.progress=false",
            "pretrain.progress=false", "train.amp=off", "pretrain.amp=off", "pretrain.epochs=1",
            "pretrain.batch_size=32", "pretrain.rows=200", "text_finetune.epochs=2", "text_finetune.batch_size=32",
            "text_finetune.train_rows=120", "text_finetune.valid_rows=40", "model.plm=" + str(tiny_plm)]
    space = _space(tmp_path, "train.model_lr: [1]\n")
    base = ["tune", "--method", "flip", "--dataset", "ml-1m", "--run-dir", str(tmp_path / "run"), "--trials", "2",
            "--sampler", "grid", *[x for s in tiny for x in ("--set", s)]]
    assert main([*base, "--space", str(space)]) == 2  # an unknown key, before any pretraining
    assert not pretrainings
    space = _space(tmp_path, "pretrain.lr: [1.0e-3, 1.0e-2]\n")
    assert main([*base, "--space", str(space)]) == 2
    assert "shares one pretraining" in capsys.readouterr().err
    space = _space(tmp_path, "text_finetune.lr: [1.0e-3, 1.0e-2]\ntext_finetune.alpha_lr: [1.0e-2]\n")
    assert main([*base, "--space", str(space)]) == 0
    out = capsys.readouterr().out
    assert pretrainings == [tmp_path / "run" / "pretrain"]  # once, before the trials
    rows = _rows(tmp_path / "run")
    assert sorted(float(r["params_text_finetune.lr"]) for r in rows) == [1e-3, 1e-2]
    for r in rows:  # every trial is the joint model's finetuning, validation only
        folder = Path(r["user_attrs_run_dir"])
        assert json.loads((folder / "metrics.json").read_text())["test"] is None
        assert "alpha" in json.loads((folder / "metrics.json").read_text())
    best = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert best["model"] == "flip" and 0 < best["test"]["auc"] < 1
    assert "flipctr run --profile cpu" in out and "--set text_finetune.joint_init=pretrained" in out
