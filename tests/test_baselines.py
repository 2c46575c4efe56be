"""The paper's other baselines on tiny data: MoRec (item text as a field), CTR-BERT (two text towers)."""

import dataclasses

import pytest
import torch

from flipctr.data.cache import PreparedData
from flipctr.runs.protocol import evaluate_run, train_run

from conftest import assert_predicts_as_evaluated, tiny_config


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """The number of texts of each pass of a frozen language model."""
    from flipctr.models.language import LanguageModel

    calls = []
    original = LanguageModel.sentence_vectors
    monkeypatch.setattr(LanguageModel, "sentence_vectors",
                        lambda self, ids, lengths, bs: calls.append(len(ids)) or original(self, ids, lengths, bs))
    return calls


def test_morec_encodes_each_distinct_item_once_and_reads_it_as_a_field(ml1m_root, tiny_plm, tmp_path, encoded):
    calls = encoded
    cfg = tiny_config(epochs=2)
    cfg.model.name, cfg.model.plm, cfg.model.plm_trainable_layers = "morec", str(tiny_plm), 0
    metrics = train_run(cfg, tmp_path / "morec", data_root=ml1m_root)
    folder = next((ml1m_root / "cache").iterdir())
    items = PreparedData(folder).values()["movie ID"].nunique()
    assert calls == [items]  # one pass, one row per distinct movie
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    again = evaluate_run(tmp_path / "morec", data_root=ml1m_root)  # the cached vectors are read back
    assert calls == [items] and again["test"] == pytest.approx(metrics["test"])
    assert_predicts_as_evaluated(tmp_path / "morec", ml1m_root, metrics)  # new rows: their items' text


def test_morec_item_text_changes_the_prediction(tiny_plm):
    from flipctr.data.encoder import FeatureMap, FieldInfo
    from flipctr.models.morec import MoRecModel
    from flipctr.models.text_sides import SideText

    fmap = FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)], 31, 1, 100)
    cfg = tiny_config().model
    torch.manual_seed(0)
    model = MoRecModel(cfg, fmap, SideText(vectors=torch.randn(5, 16))).eval()
    ids = torch.tensor([[1, 11, 21], [1, 11, 21]])
    out = model(ids, torch.tensor([0, 1])).logits
    assert out.shape == (2,) and not torch.allclose(out[0], out[1])  # same ids, other item text
    assert model.backbone.num_fields == 4 and not hasattr(model.backbone, "dense_fields")  # an argument, no state


@pytest.mark.parametrize("name", ["morec", "ctr_bert"])
def test_a_trained_encoder_is_finetuned_end_to_end(name, ml1m_root, tiny_plm, tmp_path):
    from safetensors.torch import load_file

    from flipctr.data.encoder import FeatureMap, FieldInfo
    from flipctr.models import LrScales, build_ctr_model
    from flipctr.models.language import LanguageModel
    from flipctr.training.optim import make_optimizer, resolve_train_config

    cfg = tiny_config(epochs=1)
    cfg.model.name, cfg.model.plm = name, str(tiny_plm)  # plm_trainable_layers None: every layer trains
    cfg.text_finetune.lr = 1e-2
    metrics = train_run(cfg, tmp_path / name, data_root=ml1m_root)
    saved = load_file(str(tmp_path / name / "model.safetensors"))
    start = LanguageModel.from_pretrained(str(tiny_plm)).state_dict()
    assert any(not torch.equal(saved[f"language_model.{k}"], v) for k, v in start.items())  # the encoder learned
    again = evaluate_run(tmp_path / name, data_root=ml1m_root)
    assert again["test"] == pytest.approx(metrics["test"], abs=1e-5)
    assert_predicts_as_evaluated(tmp_path / name, ml1m_root, metrics)

    # the encoder learns at scales.text times the model's lr
    sides = {side: {"tokens": torch.ones(k, 4, dtype=torch.int32), "lengths": torch.full((k,), 4)}
             for side, k in (("user", 2), ("item", 3))}
    fmap = FeatureMap([FieldInfo("u", 1, 2), FieldInfo("i", 3, 3)], 6, 1, 10)
    model = build_ctr_model(dataclasses.replace(cfg.model, embedding_dim=4, dnn_hidden=[8]), fmap, sides=sides,
                            scales=LrScales(text=0.05))
    encoder = {id(p) for p in model.language_model.parameters()}
    optimizer = make_optimizer(model, resolve_train_config(cfg.train, model))
    lrs = {id(p): group["lr"] for opt in optimizer.optimizers for group in opt.param_groups for p in group["params"]}
    assert sorted({round(lrs[p], 12) for p in encoder}) == pytest.approx([5e-5])
    assert sorted({round(lr, 12) for lr in lrs.values()}) == pytest.approx([5e-5, 1e-3])
    inputs = {"ids": torch.tensor([[1, 3], [2, 4]]), "user_index": torch.tensor([0, 1]),
              "item_index": torch.tensor([0, 2])}
    logits = model(**{k: inputs[k] for k in model.input_names}).logits
    assert logits.shape == (2,) and logits.requires_grad


def test_ctr_bert_encodes_each_distinct_user_and_item_once(ml1m_root, tiny_plm, tmp_path, encoded):
    calls = encoded
    cfg = tiny_config(epochs=2)
    cfg.model.name, cfg.model.plm, cfg.model.plm_trainable_layers = "ctr_bert", str(tiny_plm), 0
    metrics = train_run(cfg, tmp_path / "ctr_bert", data_root=ml1m_root)
    values = PreparedData(next((ml1m_root / "cache").iterdir())).values()
    assert calls == [values["user ID"].nunique(), values["movie ID"].nunique()]  # one pass per tower
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    again = evaluate_run(tmp_path / "ctr_bert", data_root=ml1m_root)  # the cached vectors are read back
    assert len(calls) == 2 and again["test"] == pytest.approx(metrics["test"])
    assert_predicts_as_evaluated(tmp_path / "ctr_bert", ml1m_root, metrics)


def test_ctr_bert_reads_both_towers():
    from flipctr.models.ctr_bert import CTRBertModel
    from flipctr.models.text_sides import SideText

    torch.manual_seed(0)
    model = CTRBertModel(tiny_config().model, SideText(vectors=torch.randn(3, 16)),
                         SideText(vectors=torch.randn(4, 16))).eval()
    logits = model(torch.tensor([0, 1, 0]), torch.tensor([2, 2, 3])).logits
    assert logits.shape == (3,)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    assert not any("vectors" in k for k in model.state_dict())  # rebuilt from the cached vectors, not saved
