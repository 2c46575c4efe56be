"""Steps on a GPU in bf16 (skipped where CUDA is absent): the loops as a GPU run uses them."""

import dataclasses

import pytest
import torch

from flipctr.runtime.device import Runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_one_pretraining_step_on_cuda_in_bf16(tmp_path):
    from flipctr.config import PretrainConfig
    from flipctr.training.pretrain import Pretrainer

    from test_flip import _pretrain_split, _tiny_pair

    model, backbone, lm = _tiny_pair()
    before = lm.encoder.embeddings.word_embeddings.weight.detach().clone()
    cfg = PretrainConfig(lr=1e-2, batch_size=8, epochs=1, progress=False, amp="bf16")
    pretrainer = Pretrainer(cfg, Runtime.of(cfg, "cuda"), tmp_path)
    history = pretrainer.fit(model, _pretrain_split(16).to(torch.device("cuda")))
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert history[0]["peak_gpu_memory_mib"] > 0  # recorded per epoch on a GPU
    assert lm.encoder.embeddings.word_embeddings.weight.dtype == torch.float32  # fp32 master weights
    assert not torch.equal(before, lm.encoder.embeddings.word_embeddings.weight.detach().cpu())
    assert (tmp_path / "pretrained.safetensors").exists()


def test_one_finetuning_step_on_cuda_in_bf16():
    from flipctr.training.trainer import Trainer

    from test_ddp import finetune_setup

    model, trainer, train, valid = finetune_setup(batch_size=32)
    device = torch.device("cuda")
    cfg = dataclasses.replace(trainer.cfg, amp="bf16", epochs=1)
    trainer = Trainer(cfg, Runtime.of(cfg, device))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer.fit(model, train.to(device), eval_split=valid.to(device))
    assert 0.0 <= fit.best_eval["auc"] <= 1.0 and next(model.parameters()).is_cuda
    assert any(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())

