"""The paper's analysis figures (Figs. 3-6) from tiny runs: each command writes a PNG and its numbers."""

import json

import pytest
import torch
from safetensors.torch import save_file

from flipctr.data.encoder import FeatureMap, FieldInfo

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=1",
        "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
        "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=64"]


def _sets(settings):
    return [x for s in settings for x in ("--set", s)]


def test_alignment_and_embedding_figures_of_a_run(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    from flipctr.runs.analysis import field_alignment
    from flipctr.cli import main

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    flip_run = tmp_path / "run"
    assert main(["run", "--dataset", "ml-1m", "--variants", "scratch", "flip_id", "--run-dir", str(flip_run),
                 "--plm", str(tiny_plm), *_sets(TINY)]) == 0
    out = tmp_path / "fig5.png"
    assert main(["figure", "alignment", str(flip_run), "--rows", "40", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    result = json.loads(out.with_suffix(".json").read_text())
    n = len(result["fields"])
    assert n == 8 and result["rows"] == 40 and len(result["similarity"]) == n
    sim = torch.tensor(result["similarity"])
    assert sim.shape == (n, n) and bool((sim.abs() <= 1 + 1e-6).all())  # means of unit-vector dot products
    assert len(set(sim.flatten().tolist())) > 1  # masking different fields changes the representations
    # the same numbers whatever the batching
    again = field_alignment(flip_run, rows=40, batch_size=7, data_root=ml1m_root)
    torch.testing.assert_close(torch.tensor(again["similarity"]), sim, atol=1e-4, rtol=0)

    out = tmp_path / "fig6.png"
    assert main(["figure", "embeddings", str(flip_run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    panels = json.loads(out.with_suffix(".json").read_text())["panels"]
    assert [p["model"] for p in panels] == ["from scratch", "pretrained", "FLIP_ID"]
    assert len(panels[0]["points"]) == len(panels[0]["field"]) and set(panels[0]["field"]) == set(range(8))


def test_embedding_projection_of_a_rank_one_table(tmp_path):
    from flipctr.runs.analysis import embedding_projection

    fmap = FeatureMap([FieldInfo("a", 1, 3), FieldInfo("b", 4, 2)], 6, 1, 10)
    (tmp_path / "run" / "scratch").mkdir(parents=True)
    fmap.save(tmp_path / "run" / "scratch" / "feature_map.json")
    u, v = torch.arange(1.0, 7.0), torch.tensor([3.0, 4.0, 0.0])  # every row a multiple of v
    save_file({"embedding.weight": torch.outer(u, v)}, str(tmp_path / "run" / "scratch" / "model.safetensors"))
    panel, = embedding_projection([tmp_path / "run"])["panels"]
    assert panel["singular_value_share"][0] == pytest.approx(1.0)
    points = torch.tensor(panel["points"])  # rows 1..5 (the mask id left out) on the first axis: |u_i| * |v|
    torch.testing.assert_close(points[:, 0].abs(), u[1:] * 5, rtol=1e-4, atol=1e-4)
    assert panel["field"] == [0, 0, 0, 1, 1]


def test_sweep_figure_runs_each_point_once(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    from flipctr.cli import main

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    out = tmp_path / "fig34.png"
    args = ["figure", "sweep", "--dataset", "ml-1m", "--run-dir", str(tmp_path / "sweep"), "--text-mask", "0.15",
            "0.3", "--temperature", "0.7", "--out", str(out), "--set", f"model.plm={tiny_plm}", *_sets(TINY)]
    assert main(args) == 0
    assert out.read_bytes()[:8] == PNG
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [(p["setting"], p["value"]) for p in points] == [("text_mask_ratio", 0.15), ("text_mask_ratio", 0.3),
                                                            ("temperature", 0.7)]
    assert points[0]["run_dir"] == points[2]["run_dir"]  # the default point, shared by both curves
    assert len(list((tmp_path / "sweep").iterdir())) == 2
    folder = tmp_path / "sweep" / "text_mask_ratio=0.3-tab_mask_ratio=0.15-temperature=0.7"
    assert json.loads((folder / "results.json").read_text())["flip"]["text_mask_ratio"] == 0.3
