"""The paper's other baselines on tiny data: MoRec (item text as a field), CTR-BERT (two text towers)."""

import pandas as pd
import pytest
import torch

from flipctr.training.runner import evaluate_run, train_run

from conftest import tiny_config


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
    items = pd.read_parquet(folder / "values.parquet")["movie ID"].nunique()
    assert calls == [items]  # one pass, one row per distinct movie
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    again = evaluate_run(tmp_path / "morec", data_root=ml1m_root)  # the cached vectors are read back
    assert calls == [items] and again["test"] == pytest.approx(metrics["test"])


def test_morec_item_text_changes_the_prediction(tiny_plm):
    from flipctr.data.encoder import FeatureMap, FieldInfo
    from flipctr.models.morec import MoRecModel

    fmap = FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)], 31, 1, 100)
    cfg = tiny_config().model
    torch.manual_seed(0)
    model = MoRecModel(cfg, fmap, torch.randn(5, 16)).eval()
    ids = torch.tensor([[1, 11, 21], [1, 11, 21]])
    out = model(ids, torch.tensor([0, 1])).logits
    assert out.shape == (2,) and not torch.allclose(out[0], out[1])  # same ids, other item text
    assert model.backbone.num_fields == 4 and model.backbone.dense_fields is None


def test_morec_needs_a_frozen_encoder(ml1m_root, tiny_plm, tmp_path):
    cfg = tiny_config(epochs=1)
    cfg.model.name, cfg.model.plm = "morec", str(tiny_plm)
    with pytest.raises(ValueError, match="plm_trainable_layers=0"):
        train_run(cfg, tmp_path / "m", data_root=ml1m_root)


def test_ctr_bert_encodes_each_distinct_user_and_item_once(ml1m_root, tiny_plm, tmp_path, encoded):
    calls = encoded
    cfg = tiny_config(epochs=2)
    cfg.model.name, cfg.model.plm, cfg.model.plm_trainable_layers = "ctr_bert", str(tiny_plm), 0
    metrics = train_run(cfg, tmp_path / "ctr_bert", data_root=ml1m_root)
    values = pd.read_parquet(next((ml1m_root / "cache").iterdir()) / "values.parquet")
    assert calls == [values["user ID"].nunique(), values["movie ID"].nunique()]  # one pass per tower
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    again = evaluate_run(tmp_path / "ctr_bert", data_root=ml1m_root)  # the cached vectors are read back
    assert len(calls) == 2 and again["test"] == pytest.approx(metrics["test"])


def test_ctr_bert_reads_both_towers():
    from flipctr.models.ctr_bert import CTRBertModel

    torch.manual_seed(0)
    model = CTRBertModel(tiny_config().model, torch.randn(3, 16), torch.randn(4, 16)).eval()
    logits = model(torch.tensor([0, 1, 0]), torch.tensor([2, 2, 3])).logits
    assert logits.shape == (3,)
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    assert "user_table" not in model.state_dict()  # rebuilt from the cached vectors, not saved
