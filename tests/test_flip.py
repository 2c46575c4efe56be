"""FLIP pieces on tiny tensors: masking, the three objectives, the joint finetuning model."""

import math

import numpy as np
import pytest
import torch

from flipctr.runtime.device import Runtime
from flipctr.config import FlipSettings
from flipctr.data.encoder import MASK_ID, FeatureMap, FieldInfo
from flipctr.data.masking import FieldMasker, choose_fields, field_mask, span_token_mask
from flipctr.runs.inference import Scorer
from flipctr.models.backbones import build_model
from flipctr.models.flip import (FlipCTRModel, FlipPretrainModel, MTMHead, info_nce,
                                 nce_loss)
from flipctr.models.language import LanguageModel

from conftest import assert_predicts_as_evaluated, tiny_config


def test_nce_loss_by_hand():
    # one target with score 1.0, K=2 noise with scores 0.5 and -1.0; log q = log(0.1), log(0.2), log(0.3)
    k = 2
    loss = nce_loss(torch.tensor([1.0]), torch.tensor([[0.5, -1.0]]), torch.log(torch.tensor([0.1])),
                    torch.log(torch.tensor([[0.2, 0.3]])), k)
    sig = lambda x: 1 / (1 + math.exp(-x))
    pos = 1.0 - math.log(k * 0.1)
    n1, n2 = 0.5 - math.log(k * 0.2), -1.0 - math.log(k * 0.3)
    expected = -math.log(sig(pos)) - math.log(1 - sig(n1)) - math.log(1 - sig(n2))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_by_hand():
    # z_a = [[1, 0], [0, 1]], z_b = [[3, 0], [2, 1]], τ = 0.5: logits = z_a z_bᵀ / τ = [[6, 4], [0, 2]]
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [2.0, 1.0]])
    text_to_id = (math.log(1 + math.exp(4 - 6)) + math.log(1 + math.exp(0 - 2))) / 2  # rows
    id_to_text = (math.log(1 + math.exp(0 - 6)) + math.log(1 + math.exp(4 - 2))) / 2  # columns
    assert info_nce(a, b, 0.5).item() == pytest.approx(0.5 * (text_to_id + id_to_text), rel=1e-6)


def test_info_nce_is_symmetric_and_minimal_for_aligned_pairs():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    assert info_nce(a, b, 0.7).item() == pytest.approx(info_nce(b, a, 0.7).item(), rel=1e-6)
    aligned = torch.eye(6) * 5
    shuffled = aligned[torch.tensor([1, 0, 3, 2, 5, 4])]
    assert info_nce(aligned, aligned, 0.7) < info_nce(aligned, shuffled, 0.7)
    assert info_nce(aligned, aligned, 0.7) < info_nce(a, b, 0.7)


def test_choose_fields_exact_count_per_row():
    chosen = choose_fields(100, 8, 0.15, torch.Generator().manual_seed(0))
    assert chosen.shape == (100, 1)  # round(0.15 * 8) = 1
    assert choose_fields(50, 8, 0.5).shape == (50, 4)
    assert choose_fields(50, 3, 0.01).shape == (50, 1)  # at least one
    assert choose_fields(50, 3, 0.6).shape == (50, 2)  # rounded, not truncated: 1.8 -> 2
    four = choose_fields(50, 8, 0.5)
    assert (field_mask(four, 8).sum(1) == 4).all()  # distinct fields within a row
    assert set(chosen.flatten().tolist()) == set(range(8))  # every field gets chosen somewhere


def _batch():
    # 2 samples, 3 fields; tokens: [CLS] a is X . b is Y Y . c is Z . [SEP] (value spans given)
    input_ids = torch.tensor([[2, 10, 11, 20, 12, 13, 11, 21, 22, 12, 14, 11, 23, 12, 3],
                              [2, 10, 11, 24, 12, 13, 11, 25, 26, 12, 14, 11, 27, 12, 3]])
    spans = torch.tensor([[[3, 4], [7, 9], [12, 13]], [[3, 4], [7, 9], [0, 0]]])  # sample 2: field c cut
    ids = torch.tensor([[1, 5, 9], [2, 6, 10]])
    return ids, input_ids, torch.ones_like(input_ids), spans


def test_field_masking_touches_only_value_tokens_of_chosen_fields():
    ids, input_ids, attention, spans = _batch()
    masker = FieldMasker(3, tab_mask_id=MASK_ID, text_mask_id=4, text_ratio=0.67, tab_ratio=0.34)
    out = masker(ids, input_ids, attention, spans, torch.Generator().manual_seed(1))
    value_positions = span_token_mask(spans, torch.ones(2, 3, dtype=torch.bool), input_ids.shape[1])
    assert not (out.text_positions & ~value_positions).any()  # field names, [CLS], [SEP] stay
    changed = out.masked_input_ids != input_ids
    assert torch.equal(changed, out.text_positions)
    assert (out.masked_input_ids[out.text_positions] == 4).all()
    # exactly round(0.67 * 3) = 2 fields chosen per sample, each chosen value masked whole;
    # sample 2's field c was cut by truncation: if chosen, it is counted as lost instead
    masked_fields = []
    for i in range(2):
        masked_fields.append([f for f in range(3) if spans[i, f, 1] > 0 and out.text_positions[i, spans[i, f, 0]]])
        for f in masked_fields[i]:
            assert out.text_positions[i, spans[i, f, 0]:spans[i, f, 1]].all()
    assert len(masked_fields[0]) == 2
    assert len(masked_fields[1]) + out.text_fields_lost == 2
    assert out.tab_fields.shape == (2, 1)  # round(0.34 * 3) = 1
    assert torch.equal(out.masked_ids == MASK_ID, field_mask(out.tab_fields, 3))


def test_tabular_mask_id_is_shared_across_fields():
    ids, input_ids, attention, spans = _batch()
    masker = FieldMasker(3, tab_mask_id=MASK_ID, text_mask_id=4, tab_ratio=1.0)
    out = masker(ids, input_ids, attention, spans)
    assert (out.masked_ids == MASK_ID).all()  # every field, one id


def test_truncated_field_gives_no_target_and_is_counted():
    ids, input_ids, attention, spans = _batch()
    masker = FieldMasker(3, tab_mask_id=MASK_ID, text_mask_id=4, text_ratio=1.0)
    out = masker(ids, input_ids, attention, spans)
    assert out.text_fields_lost == 1
    assert out.text_positions[1].sum() == 3 and out.text_positions[0].sum() == 4


def test_token_level_masking_variant():
    ids, input_ids, attention, spans = _batch()
    attention = attention.clone()
    attention[1, 11:] = 0  # sample 2 is padded after its 11th token
    masker = FieldMasker(3, MASK_ID, 4, text_ratio=0.3, token_level=True, cls_id=2, sep_id=3)
    allowed = attention.bool() & (input_ids != 2) & (input_ids != 3)
    touched = torch.zeros_like(allowed)
    for seed in range(50):
        out = masker(ids, input_ids, attention, spans, torch.Generator().manual_seed(seed))
        assert out.text_positions.any(1).all()
        assert not (out.text_positions & ~allowed).any()  # never [CLS], [SEP] or padding
        touched |= out.text_positions
    # unlike field-level masking, any real token may be chosen, field names included
    assert torch.equal(touched, allowed)


def _tiny_pair(config: FlipSettings | None = None):
    from transformers import BertConfig

    fmap = FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)], 31, 1, 100)
    torch.manual_seed(0)
    backbone = build_model(tiny_config().model, fmap)
    lm = LanguageModel.from_config(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=16,
                                              max_position_embeddings=32))
    counts = torch.arange(31).float()
    model = FlipPretrainModel(backbone, lm, counts, config or FlipSettings(text_mask_ratio=0.67, tab_mask_ratio=0.34),
                              tab_mask_id=MASK_ID, text_mask_id=4, vocab_size=30, cls_id=2, sep_id=3)
    return model, backbone, lm


def test_sparse_embeddings_leave_the_language_models_embeddings_dense():
    from flipctr.training.optim import use_sparse_embeddings

    model, backbone, lm = _tiny_pair()
    sparse = {id(p) for p in use_sparse_embeddings(model, "on")}
    assert id(backbone.embedding.weight) in sparse and backbone.embedding.sparse
    assert not sparse & {id(p) for p in lm.parameters()}
    assert not any(m.sparse for m in lm.modules() if isinstance(m, torch.nn.Embedding))


def test_mlm_logits_only_at_masked_positions(monkeypatch):
    model, _, _ = _tiny_pair()
    ids, input_ids, attention, spans = _batch()
    seen = {}
    original = model.mlm_head.forward

    def spy(tokens, reference):
        seen["rows"] = tokens.shape[0]
        return original(tokens, reference)

    monkeypatch.setattr(model.mlm_head, "forward", spy)
    gen = torch.Generator().manual_seed(3)
    model(ids, input_ids, attention, spans, gen)
    masked = model.masker(ids, input_ids, attention, spans, torch.Generator().manual_seed(3)).text_positions
    assert seen["rows"] == int(masked.sum()) < input_ids.numel()


def test_one_pretraining_step_moves_both_models():
    model, backbone, lm = _tiny_pair()
    ids, input_ids, attention, spans = _batch()
    before_id = backbone.embedding.weight.detach().clone()
    before_lm = lm.encoder.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(0))
    assert out.mlm is not None and out.mtm is not None and out.icl is not None
    torch.testing.assert_close(out.loss, out.mlm + out.mtm + out.icl)
    out.loss.backward()
    opt.step()
    assert not torch.equal(before_id, backbone.embedding.weight)
    assert not torch.equal(before_lm, lm.encoder.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("switch", ["mlm", "mtm", "icl", "joint_reconstruction", "token_level_masking"])
def test_ablation_switches(switch):
    value = switch == "token_level_masking"
    config = FlipSettings(text_mask_ratio=0.67, tab_mask_ratio=0.34, **{switch: value})
    model, _, _ = _tiny_pair(config)
    out = model(*_batch(), generator=torch.Generator().manual_seed(0))
    if switch in ("mlm", "mtm", "icl"):
        assert getattr(out, switch) is None and getattr(model, f"{switch}_head") is None
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_without_joint_reconstruction_heads_see_one_modality(monkeypatch):
    model, backbone, lm = _tiny_pair(FlipSettings(text_mask_ratio=0.67, tab_mask_ratio=0.34, joint_reconstruction=False))
    dt, dv = lm.hidden_size, backbone.output_dim
    assert model.mlm_head.net[0].in_features == dt  # MLM reads ŵ only
    assert model.mtm_head.query is None and model.mtm_head.field_proj.shape[1] == dv  # MTM reads v̂ only
    seen = {}
    original = model.mtm_head.forward
    monkeypatch.setattr(model.mtm_head, "forward",
                        lambda v_hat, u, *a, **k: seen.setdefault("u", u) is None and original(v_hat, u, *a, **k))
    model(*_batch(), generator=torch.Generator().manual_seed(0))
    assert "u" in seen and seen["u"] is None
    joint, backbone, lm = _tiny_pair()
    assert joint.mlm_head.net[0].in_features == dt + dv
    assert joint.mtm_head.field_proj.shape[1] == dv + dt


def test_cross_attention_ignores_padded_positions():
    torch.manual_seed(0)
    head = MTMHead(6, 8, 3, torch.ones(10), 4)
    v_hat, w = torch.randn(3, 6), torch.randn(3, 7, 8)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    u = head.attend(v_hat, w, mask)
    other = w.clone()
    other[mask == 0] = torch.randn(int((mask == 0).sum()), 8) * 100  # different padding content
    torch.testing.assert_close(head.attend(v_hat, other, mask), u)
    other[0, 0] += 1.0  # a real position does count
    assert not torch.allclose(head.attend(v_hat, other, mask)[0], u[0])


def test_nce_noise_follows_training_frequency_and_skips_unseen_features():
    counts = torch.tensor([0.0, 10.0, 0.0, 30.0, 60.0, 0.0])  # id 0 is <MASK>; ids 2, 5 never seen
    head = MTMHead(4, 8, 2, counts, 4)
    draws = head.sample_noise(20_000, 5, torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert freq[0] == 0 and freq[2] == 0 and freq[5] == 0
    expected = counts.double() / counts.sum()
    # 100k draws: the standard error of each frequency is below 0.0016; allow 4 of them
    assert (freq - expected).abs().max() < 0.0065


def test_no_objective_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        _tiny_pair(FlipSettings(mlm=False, mtm=False, icl=False))


def test_mtm_bias_starts_at_log_frequency():
    head = MTMHead(4, 8, 3, torch.tensor([0.0, 1.0, 3.0]), 2)
    q = torch.tensor([1.0, 1.0, 3.0]) / 5  # counts of zero are smoothed to one
    torch.testing.assert_close(head.bias.detach(), q.log())


def test_flip_joint_model_alpha_gets_gradient():
    _, backbone, lm = _tiny_pair()
    model = FlipCTRModel(backbone, lm)
    ids, input_ids, attention, _ = _batch()
    out = model(ids=ids, input_ids=input_ids, attention_mask=attention)
    assert out.logits.shape == (2,) and len(out.aux_logits) == 2
    torch.testing.assert_close(out.logits, 0.5 * out.aux_logits[0] + 0.5 * out.aux_logits[1])
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(x, torch.ones(2))
               for x in (out.logits, *out.aux_logits))
    loss.backward()
    assert model.alpha_logit.grad is not None and model.alpha_logit.grad.abs() > 0


def _joint_on_one_informative_side(informative: str, steps_seed: int = 0):
    """Train the joint model (frozen-text mode) where only the ``informative`` side carries the label."""
    from flipctr.config import TrainConfig
    from flipctr.data.encoder import FeatureMap, FieldInfo
    from flipctr.data.batching import DeviceRows
    from flipctr.training.trainer import Trainer

    g = torch.Generator().manual_seed(steps_seed)
    n = 2048
    labels = torch.randint(0, 2, (n,), generator=g).float()
    informative_ids = torch.stack([1 + labels.long(), 3 + labels.long()], 1)
    noise_ids = torch.randint(1, 5, (n, 2), generator=g)
    text = torch.randn(n, 8, generator=g)
    if informative == "text":
        text[:, 0] += 3 * (2 * labels - 1)
    ids = informative_ids if informative == "id" else noise_ids
    fmap = FeatureMap([FieldInfo("a", 1, 2), FieldInfo("b", 3, 2)], 5, 1, n)
    torch.manual_seed(0)
    model = FlipCTRModel(build_model(tiny_config().model, fmap), None, hidden_size=8, alpha_lr_scale=10.0)
    cfg = TrainConfig(lr=1e-3, batch_size=64, epochs=3, progress=False, amp="off", seed=0)
    Trainer(cfg, Runtime.of(cfg, "cpu")).fit(model, DeviceRows(labels, {"ids": ids.int(), "text_cls": text}))
    return model


def test_alpha_stays_in_unit_interval_and_moves_toward_the_informative_side():
    towards_id = _joint_on_one_informative_side("id")
    towards_text = _joint_on_one_informative_side("text")
    assert 0.6 < towards_id.summary()["alpha"] <= 1.0
    assert 0.0 <= towards_text.summary()["alpha"] < 0.4
    with pytest.raises(ValueError, match="alpha"):
        FlipCTRModel(towards_id.backbone, None, alpha=1.5, hidden_size=8)


def test_alpha_has_its_own_learning_rate():
    from flipctr.config import TrainConfig
    from flipctr.training.optim import make_optimizer

    _, backbone, lm = _tiny_pair()
    model = FlipCTRModel(backbone, lm, id_lr_scale=20.0, alpha_lr_scale=200.0)
    assert model.summary()["alpha"] == pytest.approx(0.5)  # the start: both sides weighted equally
    optimizer = make_optimizer(model, TrainConfig(lr=5e-5))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.alpha_logit)] == pytest.approx(1e-2)
    assert lr_of[id(backbone.embedding.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.plm_head.weight)] == pytest.approx(5e-5)


def test_one_builder_gives_every_caller_the_joint_models_lr_groups(tiny_plm):
    """`flipctr train --model flip` and `flipctr run` build the joint model the same way: the ID
    side at text_finetune.id_lr, α at text_finetune.alpha_lr, the rest at the base lr."""
    from flipctr.models import build_ctr_model
    from flipctr.training.optim import lr_scales, make_optimizer

    cfg = tiny_config(lr=5e-5)
    cfg.model.name, cfg.model.plm = "flip", str(tiny_plm)
    fmap = FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)], 31, 1, 100)
    model = build_ctr_model(cfg.model, fmap, scales=lr_scales(cfg))
    lr_of = {id(p): g["lr"] for g in make_optimizer(model, cfg.train).param_groups for p in g["params"]}
    assert lr_of[id(model.alpha_logit)] == pytest.approx(cfg.text_finetune.alpha_lr)
    assert lr_of[id(model.backbone.embedding.weight)] == pytest.approx(cfg.text_finetune.id_lr)
    assert lr_of[id(model.plm_head.weight)] == pytest.approx(5e-5)


def _pretrain_split(n=24):
    ids, input_ids, attention, spans = _batch()
    from flipctr.data.batching import DeviceRows

    rep = lambda t: t.repeat((n + 1) // 2, *([1] * (t.dim() - 1)))[:n]  # noqa: E731
    return DeviceRows(torch.zeros(n), {"ids": rep(ids), "input_ids": rep(input_ids),
                                  "lengths": torch.full((n,), input_ids.shape[1]), "value_spans": rep(spans)})


def test_pretraining_with_row_sparse_tables_equals_dense_adamw(tmp_path):
    """The ID embedding and MTM output table with row-sparse gradients (pretrain.sparse_embeddings,
    chunked AdamW) train to the weights and losses of dense gradients and plain AdamW (up to the
    order in which a row's repeated gradients are summed)."""
    import dataclasses

    from safetensors.torch import load_file

    from flipctr.config import PretrainConfig
    from flipctr.training.pretrain import Pretrainer
    from flipctr.training.optim import RowSparseAdamW

    cfg = PretrainConfig(lr=1e-2, batch_size=8, epochs=2, progress=False, amp="off", weight_decay=0.1)
    runs = {}
    for mode in ("off", "on"):
        model, _, _ = _tiny_pair()
        history = Pretrainer(dataclasses.replace(cfg, sparse_embeddings=mode), Runtime.of(cfg, "cpu"),
                             tmp_path / mode).fit(model, _pretrain_split())
        runs[mode] = history, load_file(str(tmp_path / mode / "pretrained.safetensors"))
        tables = [m for m in (model.backbone.embedding, model.mtm_head.output)]
        assert all(getattr(t, "sparse", False) == (mode == "on") for t in tables)
    for on, off in zip(runs["on"][0], runs["off"][0]):
        assert {k: on[k] for k in ("loss", "mlm", "mtm", "icl")} == pytest.approx(
            {k: off[k] for k in ("loss", "mlm", "mtm", "icl")}, rel=1e-6)
    assert runs["on"][1].keys() == runs["off"][1].keys()
    # the tables themselves; not every weight: where the true gradient is 0 (a bias before
    # BatchNorm, attention key biases) Adam normalizes float noise, which the summation order moves
    for name in ("backbone.embedding.weight", "mtm_head.output.weight"):
        torch.testing.assert_close(runs["on"][1][name], runs["off"][1][name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="pretrain.sparse_embeddings must be"):
        Pretrainer(dataclasses.replace(cfg, sparse_embeddings="yes"), Runtime.of(cfg, "cpu"),
                   tmp_path / "bad").fit(_tiny_pair()[0], _pretrain_split())
    # odd chunk boundaries: the same update
    emb = torch.nn.Embedding(50, 3, sparse=True)
    dense = torch.nn.Embedding(50, 3)
    dense.load_state_dict(emb.state_dict())
    a, b = RowSparseAdamW(emb.parameters(), chunk_rows=7, lr=0.1, weight_decay=0.1), \
        torch.optim.AdamW(dense.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    for ids in (torch.tensor([0, 6, 7, 49, 7]), torch.tensor([13, 14, 21])):
        for table, opt in ((emb, a), (dense, b)):
            opt.zero_grad()
            table(ids).pow(2).sum().backward()
            opt.step()
    assert torch.equal(emb.weight, dense.weight)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_pretraining_resume_after_kill_gives_the_same_next_step_loss(tmp_path, device):
    """On a GPU, dropout draws from CUDA's generator: its state is checkpointed and restored too."""
    from flipctr.config import PretrainConfig
    from flipctr.training.pretrain import Pretrainer

    device = torch.device(device)
    cfg = PretrainConfig(lr=1e-2, batch_size=8, epochs=2, progress=False, amp="off")
    full_losses = []
    model, _, _ = _tiny_pair()
    Pretrainer(cfg, Runtime.of(cfg, device), tmp_path / "a").fit(
        model, _pretrain_split().to(device), on_step=lambda e, s, loss: full_losses.append((e, s, loss)))
    # the "killed" run dies during epoch 2 (after epoch 1's checkpoint); a new process resumes it

    class Killed(Exception):
        pass

    def kill(epoch, step, loss):
        if epoch == 2:
            raise Killed

    model, _, _ = _tiny_pair()
    with pytest.raises(Killed):
        Pretrainer(cfg, Runtime.of(cfg, device), tmp_path / "b").fit(model, _pretrain_split().to(device), on_step=kill)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(12345)  # a new process starts from another CUDA state
    resumed_losses = []
    model, _, _ = _tiny_pair()
    history = Pretrainer(cfg, Runtime.of(cfg, device), tmp_path / "b").fit(
        model, _pretrain_split().to(device), resume=True,
        on_step=lambda e, s, loss: resumed_losses.append((e, s, loss)))
    assert [r["epoch"] for r in history] == [1, 2]
    epoch2 = [x for x in full_losses if x[0] == 2]
    assert resumed_losses[0][:2] == (2, 0)
    assert resumed_losses[0][2] == pytest.approx(epoch2[0][2], rel=1e-6)
    assert [x[2] for x in resumed_losses] == pytest.approx([x[2] for x in epoch2], rel=1e-5)
    assert (tmp_path / "b" / "pretrain_losses.png").stat().st_size > 0
    assert set(history[0]) >= {"loss", "mlm", "mtm", "icl", "text_fields_lost"}


def test_flip_run_end_to_end_on_tiny_data(ml1m_root, tiny_plm, tmp_path, monkeypatch, capsys):
    """data -> pretrain -> finetune scratch / FLIP_ID / FLIP_PLM / FLIP, through the CLI."""
    import json

    from flipctr.cli import main
    from flipctr.runs.protocol import evaluate_run

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=2",
            "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.rows=200", "pretrain.lr=1e-3",
            "text_finetune.epochs=1", "text_finetune.batch_size=32", "text_finetune.train_rows=120",
            "text_finetune.valid_rows=40", "model.plm_trainable_layers=null"]
    args = ["run", "--dataset", "ml-1m", "--profile", "cpu", "--run-dir", str(tmp_path / "run"),
            "--plm", str(tiny_plm), *[x for t in tiny for x in ("--set", t)]]
    assert main(args) == 0
    assert "FLIP_ID" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["pretrained"] and set(report["results"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    history = json.loads((tmp_path / "run" / "pretrain" / "pretrain_history.json").read_text())
    assert len(history) == 2 and {"mlm", "mtm", "icl"} <= set(history[0])
    from test_training import tensorboard_scalars

    curves = tensorboard_scalars(tmp_path / "run" / "pretrain" / "tensorboard")
    assert curves["pretrain/mlm"] == pytest.approx([r["mlm"] for r in history], rel=1e-6)
    assert {"pretrain/mtm", "pretrain/icl", "pretrain/lr"} <= set(curves)
    assert "model/alpha" in tensorboard_scalars(tmp_path / "run" / "flip" / "tensorboard")  # the joint model's α
    # FLIP_ID is exported without a language model; the joint model has one
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "flip_id" / "model.safetensors")).keys()
    assert not any("language_model" in k for k in keys)
    assert any(k.startswith("language_model.") for k in load_file(str(tmp_path / "run" / "flip" / "model.safetensors")))
    # FLIP_ID starts from the pretrained backbone, the scratch run does not
    assert report["results"]["flip_id"]["test"] != report["results"]["scratch"]["test"]
    again = evaluate_run(tmp_path / "run" / "flip", data_root=ml1m_root)
    assert again["test"] == pytest.approx(report["results"]["flip"]["test"])
    for variant in ("flip_plm", "flip", "flip_id"):  # text models build the prompts as in training
        assert_predicts_as_evaluated(tmp_path / "run" / variant, ml1m_root, report["results"][variant])
    # a FLIP run folder reports as its four finetuned models
    from flipctr.runs.report import find_runs, group_runs

    rows = group_runs(find_runs([tmp_path / "run"]))
    assert [r["model"] for r in rows] == ["dcnv2", "FLIP_ID", "FLIP_PLM", "FLIP"]
    assert rows[1]["test_auc_mean"] == report["results"]["flip_id"]["test"]["auc"]
    # FLIP_ID ships as an ID model: loaded in one line, exported to ONNX with the same scores
    import flipctr

    flip_id = flipctr.load(tmp_path / "run" / "flip_id")
    ids = np.load(ml1m_root / "cache" / next(p.name for p in (ml1m_root / "cache").iterdir())
                  / "encoding-fit-train-valid" / "ids.npy")[-50:].astype(np.int64)
    import onnxruntime as ort
    flip_id.export_onnx(tmp_path / "flip_id.onnx")
    onnx_scores = ort.InferenceSession(str(tmp_path / "flip_id.onnx")).run(None, {"ids": ids})[0]
    with torch.no_grad():
        torch_scores = Scorer(flip_id.model)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(onnx_scores, torch_scores, atol=1e-5)


def test_flip_run_ablation_without_pretraining(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    import json

    from flipctr.cli import main
    from flipctr.runs import flip as flip_run

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    trained = []
    original = flip_run.train_run
    monkeypatch.setattr(flip_run, "train_run", lambda cfg, run_dir, *a, **k: trained.append(run_dir.name)
                        or original(cfg, run_dir, *a, **k))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "train.epochs=1", "train.progress=false",
            "train.amp=off"]
    args = ["run", "--dataset", "ml-1m", "--run-dir", str(tmp_path / "r"), "--plm", str(tiny_plm),
            "--ablation", "no-pretraining", "--variants", "scratch", "flip_id",
            *[x for t in tiny for x in ("--set", t)]]
    assert main(args) == 0
    assert not (tmp_path / "r" / "pretrain").exists()
    # without pretraining FLIP_ID IS the backbone from scratch: trained once, same numbers
    assert trained == ["scratch"]
    results = json.loads((tmp_path / "r" / "results.json").read_text())["results"]
    assert results["flip_id"]["test"] == results["scratch"]["test"]
    assert (tmp_path / "r" / "flip_id" / "model.safetensors").read_bytes() == \
        (tmp_path / "r" / "scratch" / "model.safetensors").read_bytes()


def test_text_vectors_match_the_encoder_and_are_cached(tiny_plm, tmp_path):
    import numpy as np

    from flipctr.data.text import TokenizedPrompts
    from flipctr.models.language import LanguageModel
    from flipctr.training.text_vectors import TextVectors

    torch.manual_seed(0)
    lengths = np.array([5, 3, 7, 4, 6], dtype=np.int32)
    input_ids = np.zeros((5, 8), dtype=np.int32)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = np.random.default_rng(i).integers(5, 20, n)
    text = TokenizedPrompts(input_ids, lengths, np.zeros((5, 1, 2), np.int32), {}, tmp_path)
    lm = LanguageModel.from_pretrained(str(tiny_plm))
    with pytest.raises(ValueError, match="frozen"):
        TextVectors(lm, text, Runtime(torch.device("cpu")))
    lm.freeze(0)
    vectors = TextVectors(lm, text, Runtime(torch.device("cpu")), batch_size=2)
    got = vectors(1, 4)
    expected = torch.stack([lm(torch.from_numpy(input_ids[i:i + 1, :n]).long(), torch.ones(1, n, dtype=torch.long)).cls[0]
                            for i, n in zip(range(1, 4), lengths[1:4])])
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-5)
    cached = list(vectors.folder.glob("*.npy"))
    assert [p.name for p in cached] == ["1-4.npy"]
    np.save(cached[0], np.full_like(got, 7.0))  # a second call reads the cache, it does not recompute
    assert (vectors(1, 4) == 7.0).all()
    assert not list(vectors.folder.glob("*.tmp"))


def test_frozen_encoder_builds_no_graph(tiny_plm):
    from flipctr.models.language import LanguageModel

    lm = LanguageModel.from_pretrained(str(tiny_plm))
    lm.freeze(0)
    out = lm(torch.tensor([[2, 7, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert not lm.trainable and not out.cls.requires_grad
    lm.train()  # a frozen encoder stays in eval mode (no dropout): its states are fixed features
    assert not lm.training and not any(m.training for m in lm.modules())


def test_flip_run_cpu_profile_with_frozen_encoder(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    """The cpu profile: a frozen encoder (text vectors computed once), FLIP started from the
    finetuned FLIP_ID and FLIP_PLM."""
    import json

    from safetensors.torch import load_file

    from flipctr.cli import main
    from flipctr.runs import flip as flip_run

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    starts = []
    original = flip_run.finetuned_weights
    monkeypatch.setattr(flip_run, "finetuned_weights",
                        lambda folder, stage: starts.append((folder.name, stage)) or original(folder, stage))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=2",
            "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=100", "text_finetune.epochs=2",
            "text_finetune.batch_size=32", "text_finetune.train_rows=120", "text_finetune.valid_rows=40"]
    args = ["run", "--dataset", "ml-1m", "--profile", "cpu", "--run-dir", str(tmp_path / "run"),
            "--plm", str(tiny_plm), *[x for t in tiny for x in ("--set", t)]]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(report["results"]) == {"scratch", "flip_id", "flip_plm", "flip"}
    for variant in ("flip_plm", "flip"):
        keys = load_file(str(tmp_path / "run" / variant / "model.safetensors")).keys()
        assert not any("language_model" in k for k in keys)
    assert sorted(set(starts)) == [("flip_id", "final"), ("flip_id", "selected"),
                                   ("flip_plm", "final"), ("flip_plm", "selected")]
    cache = list(ml1m_root.rglob("cls-*/*.npy"))
    # train subset, valid subset, refit rows (the last 120 of train+valid), whole test
    sizes = sorted(int(p.stem.split("-")[1]) - int(p.stem.split("-")[0]) for p in cache)
    assert len(sizes) == 4 and sizes.count(120) == 2 and 40 in sizes, sizes
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    assert main([*args[:6], str(tmp_path / "run2"), *args[7:], "--variants", "flip_id", "flip_plm"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps  # the second run reused them
    # a finished run resumed reads every stage back and reports the time they took, not its own
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert resumed["results"] == report["results"] and resumed["wall_seconds"] == report["wall_seconds"] > 0
    from flipctr.runs.protocol import evaluate_run

    again = evaluate_run(tmp_path / "run" / "flip", data_root=ml1m_root)
    assert again["test"] == pytest.approx(report["results"]["flip"]["test"])
    for variant in ("flip_plm", "flip"):  # the frozen encoder is loaded by name for the [CLS] vectors
        assert_predicts_as_evaluated(tmp_path / "run" / variant, ml1m_root, report["results"][variant])


def test_mlm_on_a_host_bound_of_targets_equals_the_exact_count():
    model, _, _ = _tiny_pair()
    model.eval()  # no dropout: both calls see the same network
    ids, input_ids, attention, spans = _batch()
    bound = model.masker.max_text_targets(spans, attention.sum(1))
    exact = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(5))
    bounded = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(5),
                    text_targets=int(bound.sum()) + 7)
    masked = model.masker(ids, input_ids, attention, spans, torch.Generator().manual_seed(5)).text_positions
    assert (masked.sum(1) <= bound).all()  # a bound, never exceeded
    torch.testing.assert_close(bounded.mlm, exact.mlm)
    torch.testing.assert_close(bounded.loss, exact.loss)


def test_field_level_bound_is_the_k_longest_values():
    masker = FieldMasker(3, MASK_ID, 4, text_ratio=0.67)  # k = 2
    spans = torch.tensor([[[3, 4], [7, 9], [12, 15]], [[3, 4], [7, 9], [0, 0]]])
    assert masker.max_text_targets(spans, torch.tensor([15, 15])).tolist() == [5, 3]


def test_clean_and_masked_text_share_one_encoder_pass(monkeypatch):
    model, _, lm = _tiny_pair()
    model.eval()
    ids, input_ids, attention, spans = _batch()
    calls = []
    original = lm.forward
    monkeypatch.setattr(lm, "forward", lambda i, m: calls.append(i.shape[0]) or original(i, m))
    out = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(0))
    assert calls == [2 * len(ids)]
    # rows of a batch do not see each other: the 2B pass equals two B passes
    masked = model.masker(ids, input_ids, attention, spans, torch.Generator().manual_seed(0))
    both = original(torch.cat([input_ids, masked.masked_input_ids]), torch.cat([attention, attention]))
    torch.testing.assert_close(both.hidden_states[:2], original(input_ids, attention).hidden_states)
    torch.testing.assert_close(both.hidden_states[2:], original(masked.masked_input_ids, attention).hidden_states)
    assert torch.isfinite(out.loss)


def test_mtm_loss_is_the_mean_over_each_samples_masked_fields():
    torch.manual_seed(0)
    head = MTMHead(6, 8, 4, torch.arange(1, 21).float(), 5)
    v_hat, u = torch.randn(3, 6), torch.randn(3, 8)
    targets = torch.randint(1, 20, (3, 4))
    fields = torch.tensor([[0, 2], [3, 1], [1, 0]])
    loss = head(v_hat, u, fields, targets, k=3, generator=torch.Generator().manual_seed(1))
    noise = head.sample_noise(6, 3, torch.Generator().manual_seed(1)).view(3, 2, 3)
    for b in range(3):
        per_field = []
        for m in range(2):
            f, t = fields[b, m], targets[b, fields[b, m]]
            h = torch.cat([v_hat[b], u[b]]) @ head.field_proj[f]
            pos = h @ head.output.weight[t] + head.bias[t]
            neg = head.output.weight[noise[b, m]] @ h + head.bias[noise[b, m]]
            per_field.append(nce_loss(pos, neg, head.log_q[t], head.log_q[noise[b, m]], 3))
        torch.testing.assert_close(loss[b], torch.stack(per_field).mean())


def test_ctrl_is_the_shared_pretraining_with_icl_alone(ml1m_root, tiny_plm, tmp_path, monkeypatch, capsys):
    import json

    from flipctr.cli import main
    from flipctr.runs.report import find_runs
    from flipctr.training import pretrain

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    heads = []
    original = pretrain.Pretrainer.fit
    monkeypatch.setattr(pretrain.Pretrainer, "fit", lambda self, model, data, **kw: heads.append(
        (model.mlm_head, model.mtm_head, model.icl_head)) or original(self, model, data, **kw))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=1",
            "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=64"]
    assert main(["run", "--dataset", "ml-1m", "--method", "ctrl", "--run-dir", str(tmp_path / "ctrl"),
                 "--plm", str(tiny_plm), *[x for t in tiny for x in ("--set", t)]]) == 0
    (mlm, mtm, icl), = heads  # the one pretraining loop, with only the ICL head
    assert mlm is None and mtm is None and icl is not None
    report = json.loads((tmp_path / "ctrl" / "results.json").read_text())
    assert report["method"] == "ctrl" and set(report["results"]) == {"scratch", "flip_id"}
    assert report["paper"]["flip_id"] == [0.8572, 0.3838]  # CTRL's row of the paper's Table 2
    assert "| CTRL |" in capsys.readouterr().out
    assert [r["model"] for r in find_runs([tmp_path / "ctrl"])] == ["dcnv2", "CTRL"]
    assert main(["run", "--dataset", "ml-1m", "--method", "ctrl", "--variants", "flip", "--run-dir",
                 str(tmp_path / "bad"), "--plm", str(tiny_plm)]) == 2


def test_ptab_is_the_shared_pretraining_with_token_mlm_alone(ml1m_root, tiny_plm, tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import load_file

    from flipctr.cli import main
    from flipctr.models.language import LanguageModel
    from flipctr.training import pretrain

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    seen = []
    original = pretrain.Pretrainer.fit
    monkeypatch.setattr(pretrain.Pretrainer, "fit", lambda self, model, data, **kw: seen.append(model) or original(
        self, model, data, **kw))
    tiny = ["train.epochs=1", "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=64", "pretrain.lr=1e-2",
            "text_finetune.train_rows=64", "text_finetune.valid_rows=64", "text_finetune.epochs=1",
            "model.plm_trainable_layers=null"]
    args = ["run", "--dataset", "ml-1m", "--method", "ptab", "--plm", str(tiny_plm), *[x for t in tiny for x in ("--set", t)]]
    assert main([*args, "--run-dir", str(tmp_path / "ptab")]) == 0
    model, = seen  # the one pretraining loop, with only the MLM head, on token-level masks of the text alone
    assert model.mtm_head is None and model.icl_head is None and model.mlm_head is not None
    assert model.config.token_level_masking and not model.config.joint_reconstruction
    pretrained = load_file(str(tmp_path / "ptab" / "pretrain" / "pretrained.safetensors"))
    start = LanguageModel.from_pretrained(str(tiny_plm)).state_dict()
    assert any(not torch.equal(pretrained[f"language_model.{k}"], v) for k, v in start.items())  # the encoder learned
    report = json.loads((tmp_path / "ptab" / "results.json").read_text())
    assert set(report["results"]) == {"flip_plm"} and report["paper"]["flip_plm"] == [0.8426, 0.4195]
    assert "| PTab |" in capsys.readouterr().out
    # a frozen encoder would leave PTab's pretraining nothing to learn
    assert main([*args, "--run-dir", str(tmp_path / "bad"), "--set", "model.plm_trainable_layers=0"]) == 2


def test_fields_chosen_ahead_give_the_exact_mlm_size_and_the_same_masking():
    ids, input_ids, attention, spans = _batch()
    masker = FieldMasker(3, MASK_ID, 4, text_ratio=0.67, tab_ratio=0.34)
    tab, text = masker.choose(2, torch.Generator().manual_seed(0))
    assert tab.shape == (2, 1) and text.shape == (2, 2)
    out = masker(ids, input_ids, attention, spans, tab_fields=tab, text_fields=text)
    assert torch.equal(masker.text_targets(spans, text), out.text_positions.sum(1))  # exact, per row
    assert torch.equal(out.tab_fields, tab) and torch.equal(out.masked_ids == MASK_ID, field_mask(tab, 3))
    model, _, _ = _tiny_pair()
    model.eval()
    exact = int(masker.text_targets(spans, text).sum())
    a = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(1), text_targets=exact,
              tab_fields=tab, text_fields=text)
    b = model(ids, input_ids, attention, spans, torch.Generator().manual_seed(1), tab_fields=tab, text_fields=text)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("world", [1, 2])
def test_masks_drawn_per_batch_are_the_epochs_draws_and_leave_the_generator_where_they_end(world):
    """Drawn a batch at a time on each rank, the masks are those of one draw over the epoch's
    whole order (rank ``r`` keeping every ``world``-th row from ``r``), each batch's MLM size is
    its exact count rounded up to 64, and the generator ends where that one draw leaves it."""
    n, fields, batch = 37, 5, 4  # 37 rows padded to equal shards as global_order does
    masker = FieldMasker(fields, MASK_ID, 4, text_ratio=0.4, tab_ratio=0.2)
    spans = torch.randint(0, 30, (n, fields, 2), generator=torch.Generator().manual_seed(0)).sort(-1).values
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    order = torch.cat([order, order[:-n % world]])
    reference = torch.Generator().manual_seed(7)
    tab, text = masker.choose(len(order), reference)
    for rank in range(world):
        generator = torch.Generator().manual_seed(7)
        plan = masker.plan_epoch(order, lambda name, rows: spans[rows], batch, generator, True,
                                 torch.device("cpu"), rank, world)
        mine = order[rank::world]
        drawn = [plan.batch(step) for step in range(-(-len(mine) // batch))]
        assert torch.equal(torch.cat([d["tab_fields"] for d in drawn]), tab[rank::world])
        assert torch.equal(torch.cat([d["text_fields"] for d in drawn]), text[rank::world])
        for step, d in enumerate(drawn):
            exact = int(masker.text_targets(spans[mine[step * batch:(step + 1) * batch]], d["text_fields"]).sum())
            assert d["text_targets"] == -(-exact // 64) * 64
        assert torch.equal(generator.get_state(), reference.get_state())
        with pytest.raises(RuntimeError, match="batch order"):
            plan.batch(0)


def test_a_pretraining_carried_as_shards_finetunes_as_one_run(ml1m_root, tiny_plm, tmp_path, monkeypatch):
    """The paper's setting in two commands on two machines: `flipctr run --pretrain-only`, its
    weights exported as shards small enough to carry (tensors split across them), then `flipctr
    run --pretrained DIR` elsewhere: carried in fp32 the four test AUCs are those of one run;
    carried in bf16 the installed weights are the pretraining's rounded to bf16."""
    import json

    from safetensors.torch import load_file

    from flipctr.cli import main
    from flipctr.runs.flip import export_pretraining

    monkeypatch.setenv("FLIPCTR_DATA", str(ml1m_root))
    tiny = ["model.embedding_dim=4", "model.dnn_hidden=[8]", "model.cross_layers=1", "train.epochs=1",
            "train.progress=false", "pretrain.progress=false", "train.amp=off", "pretrain.amp=off",
            "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.rows=120", "text_finetune.epochs=1",
            "text_finetune.batch_size=32", "text_finetune.train_rows=100", "text_finetune.valid_rows=40",
            "model.plm_trainable_layers=null"]

    def run(folder, *extra):
        assert main(["run", "--dataset", "ml-1m", "--profile", "cpu", "--plm", str(tiny_plm), "--run-dir",
                     str(tmp_path / folder), *[x for t in tiny for x in ("--set", t)], *extra]) == 0
        return json.loads((tmp_path / folder / "results.json").read_text())

    first = run("pretrained", "--pretrain-only")
    assert first["pretrained"] and first["results"] == {} and not first["complete"]
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir() if p.is_dir()) == ["pretrain"]
    weights = load_file(str(tmp_path / "pretrained" / "pretrain" / "pretrained.safetensors"))
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        shards = export_pretraining(tmp_path / "pretrained" / "pretrain", tmp_path / f"carried-{name}", 16384, dtype)
        assert len(shards) > 2 and all(p.stat().st_size <= 16384 for p in shards)
    carried = run("from-fp32", "--pretrained", str(tmp_path / "carried-fp32"))
    whole = run("whole")
    assert carried["complete"] and set(carried["results"]) == set(whole["results"]) == {"scratch", "flip_id",
                                                                                       "flip_plm", "flip"}
    for variant in whole["results"]:
        assert carried["results"][variant]["test"] == whole["results"][variant]["test"], variant
    run("from-bf16", "--pretrained", str(tmp_path / "carried-bf16"), "--variants", "flip_id")
    installed = load_file(str(tmp_path / "from-bf16" / "pretrain" / "pretrained.safetensors"))
    assert installed.keys() == weights.keys()
    for key, value in weights.items():
        assert installed[key].dtype == torch.float32
        assert torch.equal(installed[key], value.to(torch.bfloat16).float()), key
