"""Data parallelism through torchrun, two gloo ranks on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flipctr.runtime.device import Runtime

HERE = Path(__file__).parent


def _torchrun(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def collective_threads() -> list[str]:
    """The gloo (``pt_gloo_runloop``, ``gloo_tcp_loop``) and NCCL threads of this process
    (Linux thread names). None may outlive ``leave()``: one that releases a collective's
    tensors while the interpreter shuts down aborts the process."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return [n for n in names if "gloo" in n or "nccl" in n.lower()]


def test_one_pretraining_step_under_torchrun_with_two_ranks(tmp_path):
    proc = _torchrun(HERE / "ddp_pretrain_step.py", tmp_path / "pretrain")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" ok") == 4
    assert proc.stdout.count("no collective thread left ok") == 2
    assert (tmp_path / "pretrain" / "pretrained.safetensors").exists()  # written by rank 0


def deterministic_pair(**flip):
    """A tiny FLIP pretraining model whose step has no randomness: every field masked in both
    modalities, no dropout, no BatchNorm (its batch statistics are per rank), MTM off (its
    noise is random); MLM and ICL, whose negatives cross ranks, are on. ``flip``:
    other settings (e.g. MTM on and random masks, for a whole pretraining)."""
    from transformers import BertConfig

    from flipctr.data.encoder import MASK_ID, FeatureMap, FieldInfo
    from flipctr.models.backbones import build_model
    from flipctr.config import FlipSettings
    from flipctr.models.flip import FlipPretrainModel
    from flipctr.models.language import LanguageModel

    from conftest import tiny_config

    fmap = FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)], 31, 1, 100)
    torch.manual_seed(0)
    model_cfg = tiny_config().model
    model_cfg.batch_norm = False
    backbone = build_model(model_cfg, fmap)
    lm = LanguageModel.from_config(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=16, max_position_embeddings=32,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = FlipSettings(**{"text_mask_ratio": 1.0, "tab_mask_ratio": 1.0, "mtm": False, "mlm_dropout": 0.0, **flip})
    return FlipPretrainModel(backbone, lm, torch.arange(31).float(), config, tab_mask_id=MASK_ID, text_mask_id=4,
                             vocab_size=30, cls_id=2, sep_id=3)


@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))])
def test_ddp_step_equals_one_process_on_the_global_batch(tmp_path, backend):
    from test_flip import _pretrain_split

    split = _pretrain_split(8)
    batch = split.batch(torch.arange(8), ("ids", "input_ids", "attention_mask", "value_spans"))
    batch["ids"][:, 0] = torch.arange(1, 9)  # distinct rows, so that every ICL pair differs
    batch["input_ids"][:, 3] = torch.arange(20, 28)
    model = deterministic_pair()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({**batch, "loss": out.loss.detach(), "grads": grads}, tmp_path / "reference.pt")
    proc = _torchrun(HERE / "ddp_equal_step.py", tmp_path / "reference.pt", backend)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("equal ok") == 2
    assert proc.stdout.count("no collective thread left ok") == 2


def finetune_setup(batch_size: int):
    """A tiny deterministic finetuning task: no dropout, no BatchNorm (per-rank statistics),
    dense embedding gradients; 128 train rows (4 global batches of 32), 51 eval rows (odd: the
    gathered evaluation must drop the padding)."""
    from flipctr.data.batching import DeviceRows
    from flipctr.data.encoder import FeatureMap, FieldInfo
    from flipctr.models.backbones import build_model
    from flipctr.training.trainer import Trainer

    from conftest import tiny_config

    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4, (179,), generator=g), torch.randint(0, 4, (179,), generator=g)
    ids = torch.stack([1 + a, 6 + b], 1).to(torch.int32)
    labels = ((a + b + torch.randint(0, 2, (179,), generator=g)) % 2 == 0).float()
    cfg = tiny_config(batch_size=batch_size, epochs=2, sparse_embeddings="off", lr=1e-2, patience=5)
    cfg.model.name, cfg.model.batch_norm = "dcnv2", False
    torch.manual_seed(0)
    model = build_model(cfg.model, FeatureMap([FieldInfo("a", 1, 5), FieldInfo("b", 6, 5)], 11, 1, 179))
    return (model, Trainer(cfg.train, Runtime.of(cfg.train, "cpu")), DeviceRows(labels[:128], {"ids": ids[:128]}),
            DeviceRows(labels[128:], {"ids": ids[128:]}))


def test_ddp_finetuning_equals_one_process_on_the_global_batch(tmp_path):
    from flipctr.training.trainer import predict

    model, trainer, train, valid = finetune_setup(batch_size=32)
    fit = trainer.fit(model, train, eval_split=valid)
    proc = _torchrun(HERE / "ddp_finetune.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("no collective thread left ok") == 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], weight, atol=1e-5, rtol=1e-5, msg=name)
    reference = torch.from_numpy(predict(model, valid))
    for r in ranks:  # both ranks hold every row's score, in order, and agree on the metrics
        assert r["scores"].shape == (51,)
        torch.testing.assert_close(r["scores"], reference, atol=1e-5, rtol=1e-5)
        assert r["best"]["auc"] == pytest.approx(fit.best_eval["auc"], abs=1e-6)


def test_flipctr_train_under_torchrun_writes_one_run_folder(ml1m_root, tmp_path, monkeypatch):
    env = {**os.environ, "FLIPCTR_DATA": str(ml1m_root)}
    proc = _torchrun("-m", "flipctr.cli", "train", "--dataset", "ml-1m", "--model", "dcnv2", "--run-dir",
                     tmp_path / "runs" / "dcnv2", "--set", "model.embedding_dim=4", "--set", "model.dnn_hidden=[8]",
                     "--set", "train.epochs=2", "--set", "train.progress=false", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports
    assert "still referenced" not in proc.stderr  # the group was destroyed, its threads joined
    folder = tmp_path / "runs" / "dcnv2"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["dcnv2"]
    assert json.loads((folder / "environment.json").read_text())["world_size"] == 2
    metrics = json.loads((folder / "metrics.json").read_text())
    # the saved model, re-evaluated by one process, gives the test AUC the two ranks gathered
    from flipctr.runs.protocol import evaluate_run

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    assert evaluate_run(folder)["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def test_flip_run_under_torchrun_writes_one_run_folder(ml1m_root, tiny_plm, tmp_path):
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=1",
            "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=101", "text_finetune.epochs=1",
            "text_finetune.batch_size=32", "text_finetune.train_rows=100", "text_finetune.valid_rows=40",
            "model.plm_trainable_layers=null"]
    env = {**os.environ, "FLIPCTR_DATA": str(ml1m_root)}
    proc = _torchrun("-m", "flipctr.cli", "run", "--dataset", "ml-1m", "--profile", "cpu", "--plm", tiny_plm,
                     "--run-dir", tmp_path / "runs" / "run", *[x for t in tiny for x in ("--set", t)], env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("# FLIP on ml-1m") == 1  # rank 0 alone reports
    assert "still referenced" not in proc.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["run"]
    run = tmp_path / "runs" / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "environment.json", "flip", "flip_id",
                                                     "flip_plm", "pretrain", "results.json", "results.md",
                                                     "scratch", "train.log"]
    report = json.loads((run / "results.json").read_text())
    assert set(report["results"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    history = json.loads((run / "pretrain" / "pretrain_history.json").read_text())
    assert len(history) == 1


def test_frozen_text_vectors_under_ddp_are_one_pass_shared_by_the_ranks(tiny_plm, tmp_path):
    from flipctr.models.language import LanguageModel

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, 13).astype(np.int32)
    input_ids = np.zeros((13, 9), dtype=np.int32)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = rng.integers(5, 20, n)
    lm = LanguageModel.from_pretrained(str(tiny_plm))
    lm.freeze(0)
    reference = lm.sentence_vectors(torch.from_numpy(input_ids[1:12]), torch.from_numpy(lengths[1:12]), 11).numpy()
    np.savez(tmp_path / "reference.npz", input_ids=input_ids, lengths=lengths, vectors=reference)
    proc = _torchrun(HERE / "ddp_text_vectors.py", tiny_plm, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # 11 rows: each rank encodes 6 (one wraps round), once; both get all 11 (checked in the script)
    assert proc.stdout.count("encoded [6] ok") == 2
    assert [p.name for p in (tmp_path / "cache").rglob("*.npy")] == ["1-12.npy"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_time_budgets_stop_every_rank_at_the_same_point(tmp_path):
    proc = _torchrun(HERE / "ddp_budget.py", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # finetuning: rank 1's first interval (20 s) says the next would end past 35 s; rank 0 alone
    # would have gone on to 30 s. Pretraining: 6 steps an epoch per rank; rank 1's rate (0.5
    # steps/s) leaves room for 14 steps, rank 0's for 29: both stop at 14
    assert ranks[0] == ranks[1] == {"evals": [0.5], "stopped": "budget", "steps": 14}


def distinct_split(n: int):
    """``n`` pretraining rows that differ (ids and tokens), so that every ICL pair is its own."""
    from test_flip import _pretrain_split

    split = _pretrain_split(n)
    split.inputs["ids"][:, 0] = torch.arange(1, n + 1) % 10 + 1
    split.inputs["ids"][:, 1] = torch.arange(n) % 7 + 11
    split.inputs["input_ids"][:, 3] = torch.arange(n) % 10 + 20
    return split


def test_the_real_pretrainer_under_two_ranks_equals_one_process(tmp_path):
    """Masks and NCE noise are drawn per row, alike on every rank: two ranks with batch 4 each
    pretrain (MLM and MTM, fields masked at random) to the weights of one process with batch 8.
    ICL is off here: its gradients equal one process's (the step test above), but some of its
    components are zero in theory (a projection bias shifts a query's logits alike), and over
    several steps Adam turns their float noise into lr-sized moves that differ between runs."""
    from safetensors.torch import load_file

    from flipctr.config import PretrainConfig
    from flipctr.training.pretrain import Pretrainer

    cfg = PretrainConfig(lr=1e-3, batch_size=8, epochs=2, progress=False, amp="off")
    Pretrainer(cfg, Runtime.of(cfg, "cpu"), tmp_path / "one").fit(deterministic_pair(**PRETRAIN_EQUAL), distinct_split(16))
    proc = _torchrun(HERE / "ddp_pretrain_equal.py", tmp_path / "two")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one, two = (load_file(str(tmp_path / name / "pretrained.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(one[k], deterministic_pair(**PRETRAIN_EQUAL).state_dict()[k]) for k in one)


PRETRAIN_EQUAL = {"text_mask_ratio": 0.34, "tab_mask_ratio": 0.34, "mtm": True, "icl": False}
