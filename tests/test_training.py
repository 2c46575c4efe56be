import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from flipctr.models.contract import CTRModule
from flipctr.runtime.device import Runtime
from safetensors.torch import load_file

from flipctr.cli import main
from flipctr.data.batching import DeviceRows
from flipctr.models.backbones import build_model
from flipctr.runs.protocol import evaluate_run, train_run
from flipctr.training.trainer import Trainer

from conftest import tiny_config


def _toy_splits(n=512, seed=0):
    """Label = parity of two fields; the eval split has the labels FLIPPED, so eval AUC
    falls as the model learns and the best epoch is the first."""
    from flipctr.data.encoder import FeatureMap, FieldInfo

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    ids = torch.stack([1 + a, 6 + b], 1).to(torch.int32)
    labels = ((a + b) % 2 == 0).float()
    fmap = FeatureMap([FieldInfo("a", 1, 5), FieldInfo("b", 6, 5)], 11, 1, n)
    return fmap, DeviceRows(labels, {"ids": ids}), DeviceRows(1 - labels, {"ids": ids})


def test_early_stopping_restores_best_epoch():
    cfg = tiny_config(epochs=10, patience=2, lr=0.05)
    fmap, train, flipped = _toy_splits()
    torch.manual_seed(0)
    model = build_model(cfg.model, fmap)
    snapshots = {}
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(
        model, train, eval_split=flipped,
        on_epoch_end=lambda r: snapshots.__setitem__(r.epoch, {k: v.clone() for k, v in model.state_dict().items()}))
    aucs = [e["auc"] for r in result.history for e in r.evals]
    assert result.best_epoch == int(np.argmax(aucs)) + 1
    assert len(result.history) == result.best_epoch + cfg.train.patience  # stopped by patience
    final = model.state_dict()
    for key, value in snapshots[int(result.best_epoch)].items():
        torch.testing.assert_close(final[key], value)
    last = snapshots[len(result.history)]
    assert any(not torch.equal(final[k], last[k]) for k in final)


def test_evaluations_within_an_epoch_and_fractional_epochs():
    cfg = tiny_config(epochs=2, lr=0.05, evals_per_epoch=4, patience=100)
    fmap, train, _ = _toy_splits()
    torch.manual_seed(0)
    trainer = Trainer(cfg.train, Runtime.of(cfg.train, "cpu"))
    result = trainer.fit(build_model(cfg.model, fmap), train, eval_split=train)
    assert [e["epoch"] for r in result.history for e in r.evals] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    part = trainer.fit(build_model(cfg.model, fmap), train, epochs=1.5)
    assert [r.samples for r in part.history] == [512, 256]  # 16 batches of 32, then 8


def test_training_learns_the_toy_task():
    cfg = tiny_config(epochs=5, lr=0.05)
    fmap, train, _ = _toy_splits()
    torch.manual_seed(0)
    model = build_model(cfg.model, fmap)
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(model, train, eval_split=train)
    assert result.best_eval["auc"] > 0.95


def _run(ml1m_root, run_dir, **train):
    cfg = tiny_config(**train)
    return train_run(cfg, run_dir, data_root=ml1m_root)


def test_clean_protocol_writes_run_folder_and_refits(ml1m_root, tmp_path):
    metrics = _run(ml1m_root, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "environment.json", "train.log", "metrics.json", "feature_map.json",
                 "model.safetensors", "model-selected.safetensors"):
        assert (run / name).exists(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["protocol"] == "clean" and saved["selected_on"] == "valid"
    for key in ("valid", "test", "test_before_refit"):
        assert set(saved[key]) == {"auc", "logloss"}
    assert saved["refit_epochs"] == saved["best_epoch"] >= 1
    assert saved["train_samples_per_second"] > 0
    assert "seed" in json.loads((run / "environment.json").read_text())
    assert all(isinstance(v, torch.Tensor) for v in load_file(str(run / "model.safetensors")).values())
    again = evaluate_run(run, data_root=ml1m_root)
    assert again["test"] == pytest.approx(metrics["test"])
    # TensorBoard: the training curves as the log has them
    scalars = tensorboard_scalars(run / "tensorboard")
    assert {"train/loss", "train/lr", "valid/auc", "valid/logloss", "refit/loss"} <= set(scalars)
    assert scalars["train/loss"] == pytest.approx([r["train_loss"] for r in saved["history"]], rel=1e-6)
    assert scalars["valid/auc"] == pytest.approx([e["auc"] for r in saved["history"] for e in r["evals"]], rel=1e-6)


def tensorboard_scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_same_seed_gives_identical_metrics(ml1m_root, tmp_path):
    drop = ("wall_seconds", "fit_seconds", "train_samples_per_second", "history")
    a = {k: v for k, v in _run(ml1m_root, tmp_path / "a", seed=3).items() if k not in drop}
    b = {k: v for k, v in _run(ml1m_root, tmp_path / "b", seed=3).items() if k not in drop}
    assert a == b


def test_paper_protocol_is_labelled_selected_on_test(ml1m_root, tmp_path):
    metrics = _run(ml1m_root, tmp_path / "p", protocol="paper")
    assert metrics["selected_on"] == "test" and "selected on test" in metrics["note"]
    assert metrics["valid"] is None and metrics["test_before_refit"] is None


def test_cli_train_and_evaluate(ml1m_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    args = ["train", "--dataset", "ml-1m", "--model", "deepfm", "--run-dir", str(tmp_path / "r"),
            "--set", "model.embedding_dim=4", "--set", "model.dnn_hidden=[8]", "--set", "train.epochs=2",
            "--set", "train.progress=false", "--set", "train.amp=off", "--set", "train.lr=1e-2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "deepfm on ml-1m" in out and "test" in out
    assert main(["evaluate", "--run-dir", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["auc"] > 0
    assert main(["data", "stats", "ml-1m"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["fields"] == 8 and stats["prompt_max_length"] == 100 and stats["text_caches"] == {}
    assert main(["data", "prepare", "ml-1m"]) == 0  # the cache is there: its size and how long each step took
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["table_mib"] > 0 and list(prepared["table_seconds"]) == ["read", "order", "codes", "encode"]


def test_cli_reports_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLIPCTR_DATA", str(tmp_path / "empty"))
    assert main(["data", "stats", "ml-1m"]) == 2
    assert "run `flipctr data get ml-1m`" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--set", "train.nope=1"]) == 2
    assert "unknown key train.nope" in capsys.readouterr().err


def test_sparse_embeddings_use_lazy_adam_and_still_learn():
    from flipctr.training.optim import make_optimizer

    cfg = tiny_config(epochs=5, lr=0.05, sparse_embeddings="on")
    fmap, train, _ = _toy_splits()
    torch.manual_seed(0)
    model = build_model(cfg.model, fmap)
    opt = make_optimizer(model, cfg.train)
    assert [type(o).__name__ for o in opt.optimizers] == ["Adam", "SparseAdam"]
    model(ids=train.inputs["ids"][:8]).logits.sum().backward()
    assert model.embedding.weight.grad.is_sparse
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(build_model(cfg.model, fmap), train, eval_split=train)
    assert result.best_eval["auc"] > 0.95
    cfg.train.sparse_embeddings = "auto"  # a 11-row table stays dense
    assert [type(o).__name__ for o in make_optimizer(build_model(cfg.model, fmap), cfg.train).optimizers] == ["Adam"]


class _ScaledGroups(CTRModule):
    """An ID model whose first parameter group learns at 10 times the base lr (as FLIP's α)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.inner = inner

    def lr_groups(self) -> list[dict]:
        return [{"params": [self.bias], "lr_scale": 10.0}]

    def forward(self, ids):
        out = self.inner(ids=ids)
        return dataclasses.replace(out, logits=out.logits + self.bias)


def test_the_recorded_and_replayed_lr_is_the_base_lr_whatever_the_groups():
    """A refit replays the selection's per-epoch lr: it must be the base lr, not a scaled group's."""
    from flipctr.training.optim import make_optimizer

    cfg = tiny_config(epochs=3, lr=0.01, reduce_lr_on_plateau=True, reduce_lr_factor=0.5, patience=5)
    fmap, train, flipped = _toy_splits()
    torch.manual_seed(0)
    opt = make_optimizer(_ScaledGroups(build_model(cfg.model, fmap)), cfg.train)
    assert opt.lr == 0.01 and sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.01, 0.1])
    trainer = Trainer(cfg.train, Runtime.of(cfg.train, "cpu"))
    fit = trainer.fit(_ScaledGroups(build_model(cfg.model, fmap)), train, eval_split=flipped)
    assert fit.lr_per_epoch == pytest.approx([0.01, 0.01, 0.005])  # eval AUC falls: the plateau halves it
    seen = []
    refit = trainer.fit(_ScaledGroups(build_model(cfg.model, fmap)), train, epochs=3, lr_schedule=fit.lr_per_epoch,
                        on_epoch_end=lambda record: seen.append(record.lr))
    assert refit.lr_per_epoch == seen == pytest.approx([0.01, 0.01, 0.005])


def test_compiled_training_step_learns_the_toy_task():
    cfg = tiny_config(epochs=3, lr=0.05, compile=True)
    fmap, train, _ = _toy_splits()
    torch.manual_seed(0)
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(build_model(cfg.model, fmap), train, eval_split=train)
    assert result.best_eval["auc"] > 0.95


def test_run_data_splits_last_rows_and_seeded_samples(ml1m_root):
    import numpy as np

    from flipctr.config import DataConfig
    from flipctr.data.cache import prepare
    from flipctr.runs.inputs import ModelInputs

    data = prepare(DataConfig("ml-1m"), ml1m_root)
    rd = ModelInputs(data, tiny_config(), torch.device("cpu"), text=False)
    start, stop = data.sizes.bounds("train+valid")
    ids = data.encoding("train+valid").ids
    last = rd.split("train+valid", "train+valid", last=50)
    np.testing.assert_array_equal(last.host("ids").numpy(), ids[stop - 50:stop])
    assert isinstance(last.inputs["ids"].array, np.memmap)  # on the CPU a split stays in the cache file
    a = rd.split("train+valid", "train+valid", sample=50, seed=3)
    b = rd.split("train+valid", "train+valid", sample=50, seed=3)
    c = rd.split("train+valid", "train+valid", sample=50, seed=4)
    assert len(a) == 50 and torch.equal(a.host("ids"), b.host("ids"))
    assert not torch.equal(a.host("ids"), c.host("ids"))
    rows = np.sort(np.random.default_rng(3).choice(np.arange(start, stop), 50, replace=False))
    np.testing.assert_array_equal(a.host("ids").numpy(), ids[rows])
    np.testing.assert_array_equal(a.labels.numpy(), data.labels[rows])


class _SplitSpy:
    """Records which splits a run asks for and what the trainer does with them, in order."""

    def __init__(self, monkeypatch):
        from flipctr.runs import protocol as runner
        from flipctr.training import trainer

        self.events, self.fits = [], []
        original_split, original_fit = runner.ModelInputs.split, trainer.Trainer.fit
        original_evaluate = trainer.Trainer.evaluate
        spy = self

        def split(rd, name, fit, *args, **kwargs):
            out = original_split(rd, name, fit, *args, **kwargs)
            out.name = name
            return out

        def fit(trainer_self, model, train, eval_split=None, epochs=None, lr_schedule=None, **kwargs):
            spy.events.append(("fit", train.name, getattr(eval_split, "name", None)))
            result = original_fit(trainer_self, model, train, eval_split, epochs, lr_schedule, **kwargs)
            spy.fits.append({"rows": len(train), "epochs": epochs, "lr_schedule": lr_schedule, "result": result})
            return result

        def evaluate(trainer_self, model, split):
            spy.events.append(("evaluate", split.name))
            return original_evaluate(trainer_self, model, split)

        monkeypatch.setattr(runner.ModelInputs, "split", split)
        monkeypatch.setattr(trainer.Trainer, "fit", fit)
        monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)


def test_paper_protocol_selects_on_test(ml1m_root, tmp_path, monkeypatch):
    spy = _SplitSpy(monkeypatch)
    metrics = _run(ml1m_root, tmp_path / "p", protocol="paper", epochs=4, patience=4, lr=0.05)
    assert spy.events[0] == ("fit", "train+valid", "test")
    evals = [e for r in metrics["history"] for e in r["evals"]]
    # the weights kept are those of the best TEST evaluation: their test AUC is the reported one
    best = max(evals, key=lambda e: e["auc"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["test"]["auc"] == pytest.approx(best["auc"])


def test_clean_protocol_keeps_test_out_of_training_and_selection(ml1m_root, tmp_path, monkeypatch):
    spy = _SplitSpy(monkeypatch)
    _run(ml1m_root, tmp_path / "c", epochs=3, lr=0.05)
    fits = [e for e in spy.events if e[0] == "fit"]
    assert fits == [("fit", "train", "valid"), ("fit", "train+valid", None)]
    # test is only evaluated, and only once training for selection has finished
    first_test = spy.events.index(("evaluate", "test"))
    assert first_test > spy.events.index(("fit", "train", "valid"))
    assert all(e[0] == "evaluate" for e in spy.events if "test" in e)


def test_refit_replays_the_selected_epochs_and_lr_schedule_on_train_plus_valid(ml1m_root, tmp_path, monkeypatch):
    from flipctr.config import DataConfig
    from flipctr.data.cache import prepare

    spy = _SplitSpy(monkeypatch)
    # two evaluations per epoch and a plateau schedule: a fractional epoch count and changing lrs
    metrics = _run(ml1m_root, tmp_path / "r", epochs=6, lr=0.05, evals_per_epoch=2, patience=3,
                   reduce_lr_on_plateau=True, reduce_lr_factor=0.5)
    select, refit = spy.fits
    sizes = prepare(DataConfig("ml-1m"), ml1m_root).sizes
    assert select["rows"] == sizes.train and refit["rows"] == sizes.train + sizes.valid
    assert refit["epochs"] == select["result"].best_epoch == metrics["best_epoch"]
    assert refit["lr_schedule"] == select["result"].lr_per_epoch
    history = refit["result"].history
    assert [r.lr for r in history] == select["result"].lr_per_epoch[:len(history)]
    n = sizes.train + sizes.valid
    steps, total = math.ceil(n / 32), round(refit["epochs"] * math.ceil(n / 32))
    expected = [n if total - e * steps >= steps else (total - e * steps) * 32 for e in range(len(history))]
    assert [r.samples for r in history] == expected  # whole epochs of every row, then the fraction


@pytest.mark.parametrize("model_name", ["plm", "flip"])
def test_embedding_l2_works_for_text_models(model_name, ml1m_root, tiny_plm, tmp_path):
    cfg = tiny_config(epochs=1, embedding_l2=1e-3)
    cfg.model.name, cfg.model.plm = model_name, str(tiny_plm)
    cfg.data.limit = 200
    metrics = train_run(cfg, tmp_path / model_name, data_root=ml1m_root)
    assert 0 <= metrics["test"]["auc"] <= 1
    if model_name == "flip":
        assert 0 < metrics["alpha"] < 1


def test_report_pools_seeds_and_draws_figures(ml1m_root, tmp_path, capsys):
    import pandas as pd

    runs = [tmp_path / f"seed{s}" for s in (1, 2)]
    metrics = [_run(ml1m_root, run, seed=s, epochs=2) for s, run in zip((1, 2), runs)]
    _run(ml1m_root, tmp_path / "lr", seed=1, epochs=2, lr=5e-3)  # another setting: its own row
    assert main(["report", *map(str, runs), str(tmp_path / "lr"), "--out", str(tmp_path / "report")]) == 0
    table = pd.read_csv(tmp_path / "report" / "report.csv")
    assert len(table) == 2 and sorted(table["seeds"]) == ["1", "1 2"]
    pooled = table[table["seeds"] == "1 2"].iloc[0]
    aucs = [m["test"]["auc"] for m in metrics]
    assert pooled["test_auc_mean"] == pytest.approx(np.mean(aucs))
    assert pooled["test_auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert pooled["paper_auc"] == pytest.approx(0.8548)  # DCNv2 on ML-1M, paper Table 2
    for figure in ("test_auc.png", "curves.png"):
        assert (tmp_path / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "± " in (tmp_path / "report" / "report.md").read_text()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2


def test_a_broken_tensorboard_does_not_stop_training(tmp_path, monkeypatch, caplog):
    import torch.utils.tensorboard

    from flipctr.training.tracking import Tracker

    def broken(*args, **kwargs):
        raise TypeError("Descriptors cannot be created directly")  # e.g. a protobuf mismatch

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", broken)
    with caplog.at_level("WARNING", logger="flipctr"):
        tracker = Tracker(tmp_path / "tb")
    tracker.scalars(1, {"train/loss": 0.5})  # a no-op, not an error
    tracker.close()
    assert tracker.writer is None and "tensorboard unusable (TypeError" in caplog.text


def test_training_from_the_mapped_cache_equals_training_from_device_tensors(tmp_path):
    """A split left in its cache file (gathered per batch) trains to the same weights and
    metrics as the same split copied into tensors: same seed, same batches, same numbers."""
    from flipctr.data.batching import MappedArray

    cfg = tiny_config(epochs=2, evals_per_epoch=2)
    fmap, train, valid = _toy_splits()
    results = []
    for mapped in (False, True):
        splits = []
        for name, split in (("train", train), ("valid", valid)):
            ids = split.host("ids").numpy()
            np.save(tmp_path / f"{name}.npy", ids)  # a cache file, read back as a memory map
            splits.append(DeviceRows.from_arrays(split.labels.numpy(), torch.device("cpu"), mapped=mapped,
                                                 ids=np.load(tmp_path / f"{name}.npy", mmap_mode="r")))
        assert isinstance(splits[0].inputs["ids"], MappedArray) == mapped
        torch.manual_seed(0)
        model = build_model(cfg.model, fmap)
        fit = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(model, splits[0], eval_split=splits[1])
        results.append((fit, model.state_dict()))
    (tensors, weights), (mapped, mapped_weights) = results
    assert mapped.best_eval == tensors.best_eval and [r.train_loss for r in mapped.history] == [
        r.train_loss for r in tensors.history]
    for name, value in weights.items():
        assert torch.equal(mapped_weights[name], value), name


def test_a_checkpoint_resumes_whatever_the_device_of_the_runtime(tmp_path):
    """The resume path a GPU run takes, on a CPU: the engine of a CUDA runtime restores a
    checkpoint (weights, optimizer, every random state) without mapping it onto its device first,
    since ``set_rng_state`` takes CPU byte tensors only (a checkpoint loaded onto the GPU failed
    with "RNG state must be a torch.ByteTensor"). The checkpoint has ended, so no step runs."""
    from flipctr.training.engine import Engine, Stage
    from flipctr.runtime.device import Runtime

    class Tiny(Stage):
        def __init__(self, seed: int):
            torch.manual_seed(seed)
            self.model = self.wrapped = torch.nn.Linear(2, 1)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
            self.generators = {"shuffle": torch.Generator().manual_seed(seed)}
            self.names, self.batch_size, self.length_buckets, self.epochs = ("x",), 4, 1, 1
            self.progress, self.ended = False, None

        def begin_epoch(self, epoch, order):
            return 2

        def loss(self, step, batch, rows):
            return self.model(batch["x"]).pow(2).mean()

        def end_epoch(self, epoch, steps, seconds):
            return False

        def state(self):
            return {"tag": "saved"}

        def load_state(self, state):
            self.ended = state["tag"]

    data = DeviceRows(torch.zeros(8), {"x": torch.randn(8, 2)})
    saved = Tiny(seed=0)
    Engine(Runtime(torch.device("cpu"))).fit(saved, data, tmp_path / "state.pt")
    expected_rng = torch.get_rng_state()
    torch.manual_seed(123)  # a new process: other random states, other weights
    resumed = Tiny(seed=1)
    Engine(Runtime(torch.device("cuda"))).fit(resumed, data, tmp_path / "state.pt", resume=True)
    assert resumed.ended == "saved"
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert torch.equal(resumed.generators["shuffle"].get_state(), saved.generators["shuffle"].get_state())
    for name, weight in saved.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 2


def test_deterministic_runs_give_the_same_digits_whatever_the_machines_instruction_sets(tmp_path):
    """``train.deterministic=true`` under two instruction-set caps of this machine (the nearest
    thing to two machines a test has): the same metrics to the last digit, and the run folder
    says which kernels ran. Without it the caps are free to change the digits (not asserted:
    whether they do depends on the machine)."""
    import os
    import subprocess
    import sys

    from conftest import install_raw, write_ml1m

    root = tmp_path / "home"
    install_raw(root, "ml-1m", write_ml1m(tmp_path / "raw-ml", n_ratings=3000))
    sets = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=2", "train.epochs=2",
            "train.progress=false", "train.deterministic=true", "train.threads=1"]
    metrics = {}
    for cap in ("avx512", "avx2"):
        env = {**os.environ, "FLIPCTR_DATA": str(root), "ATEN_CPU_CAPABILITY": cap, "ONEDNN_MAX_CPU_ISA": cap.upper(),
               "MKL_ENABLE_INSTRUCTIONS": cap.upper()}
        run = tmp_path / cap
        proc = subprocess.run([sys.executable, "-m", "flipctr.cli", "train", "--dataset", "ml-1m", "--model", "dcnv2",
                               "--run-dir", str(run), *[x for s in sets for x in ("--set", s)]],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[cap] = json.loads((run / "metrics.json").read_text())
        arithmetic = json.loads((run / "environment.json").read_text())["arithmetic"]
        assert arithmetic["cpu_capability"] == "AVX2" and arithmetic["autocast"] == "off"
        assert arithmetic["deterministic_algorithms"] and arithmetic["env"]["MKL_CBWR"] == "COMPATIBLE"
        assert arithmetic["mkl_cbwr_branch"] in (None, "compatible")
    assert metrics["avx512"]["test"] == metrics["avx2"]["test"]
    digits = {cap: [(h["train_loss"], h["evals"]) for h in m["history"]] for cap, m in metrics.items()}
    assert digits["avx512"] == digits["avx2"]


def test_the_deterministic_setting_refuses_kernels_fixed_before_it(monkeypatch):
    """A process whose first tensor operation chose other kernels cannot be pinned afterwards:
    one clear error saying how to start it, never a run that only claims to be pinned."""
    from flipctr.runtime import environment

    for name in environment.DETERMINISTIC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    try:
        with pytest.raises(RuntimeError, match="ATen's CPU kernels run at AVX512.*ATEN_CPU_CAPABILITY=avx2"):
            environment.pin_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
