"""The paper's other baselines on tiny data: MoRec (item text as a field)."""

import pandas as pd
import pytest
import torch

from flipctr.training.runner import evaluate_run, train_run

from conftest import tiny_config


def test_morec_encodes_each_distinct_item_once_and_reads_it_as_a_field(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    from flipctr.models.language import LanguageModel

    calls = []
    original = LanguageModel.sentence_vectors
    monkeypatch.setattr(LanguageModel, "sentence_vectors",
                        lambda self, ids, lengths, bs: calls.append(len(ids)) or original(self, ids, lengths, bs))
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
