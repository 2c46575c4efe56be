"""The method's wiring, pinned: which of the four states — clean text w, masked text ŵ, clean
table v, masked table v̂ — each head of the real ``FlipPretrainModel.forward`` receives, what
it is scored against, that nothing masked leaks, and the equations by hand (Eq. 6, 7, 12 and
13-15 through the trainer's real step). ``benchmarks/mutation_check.py`` shows these tests
fail on deliberate faults of the wiring."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from flipctr.runtime.device import Runtime
from flipctr.config import FlipSettings
from flipctr.data.batching import DeviceRows
from flipctr.data.encoder import MASK_ID, FeatureMap, FieldInfo
from flipctr.models.backbones import build_model
from flipctr.models.flip import FlipCTRModel, FlipPretrainModel, MTMHead
from flipctr.models.language import LanguageModel
from flipctr.training.trainer import Trainer

from conftest import tiny_config

TEXT_MASK = 4
# 2 samples, 3 fields: [CLS] a is X . b is Y Y . c is Z . [SEP]; sample 2's value of c was cut
INPUT_IDS = torch.tensor([[2, 10, 11, 20, 12, 13, 11, 21, 22, 12, 14, 11, 23, 12, 3],
                          [2, 10, 11, 24, 12, 13, 11, 25, 26, 12, 14, 11, 27, 12, 3]])
SPANS = torch.tensor([[[3, 4], [7, 9], [12, 13]], [[3, 4], [7, 9], [0, 0]]])
IDS = torch.tensor([[1, 15, 29], [2, 16, 30]])
TEXT_FIELDS = torch.tensor([[0, 1], [1, 2]])  # sample 2's field 2 has no tokens: no target
TAB_FIELDS = torch.tensor([[1], [0]])
MASKED_TOKENS = [[3, 7, 8], [7, 8]]  # the value tokens of TEXT_FIELDS, by hand from SPANS


def _language_model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel.from_config(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=16,
                                                max_position_embeddings=32, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0, initializer_range=0.5))


def _backbone():
    """A tiny DCNv2 whose embeddings are large enough (std 1) for every input to show."""
    torch.manual_seed(1)
    model = build_model(tiny_config().model, FeatureMap([FieldInfo(f"f{i}", 1 + 10 * i, 10) for i in range(3)],
                                                        31, 1, 100))
    torch.nn.init.normal_(model.embedding.weight)
    return model


def _pretrain_model(**switches) -> FlipPretrainModel:
    model = FlipPretrainModel(_backbone(), _language_model(), torch.arange(31).float(),
                              FlipSettings(text_mask_ratio=0.67, tab_mask_ratio=0.34, **switches),
                              tab_mask_id=MASK_ID, text_mask_id=TEXT_MASK, vocab_size=30, cls_id=2, sep_id=3)
    return model.eval()  # no dropout: every pass is a function of its inputs


def _forward(model, ids=IDS, input_ids=INPUT_IDS, tab_fields=TAB_FIELDS, text_fields=TEXT_FIELDS):
    """The real forward with the fields chosen ahead (as pretraining passes them), recording
    what each head and the language model receive."""
    seen: dict[str, list] = {"lm": []}
    hooks = [model.language_model.register_forward_pre_hook(lambda m, a: seen["lm"].append(a[0].clone())),
             *(getattr(model, f"{name}_head").register_forward_pre_hook(
                 lambda m, a, name=name: seen.__setitem__(name, a))
               for name in ("mlm", "mtm", "icl") if getattr(model, f"{name}_head") is not None)]
    targets = int(model.masker.text_targets(SPANS, text_fields).sum())
    out = model(ids, input_ids, torch.ones_like(input_ids), SPANS, torch.Generator().manual_seed(0),
                text_targets=targets, tab_fields=tab_fields, text_fields=text_fields)
    for hook in hooks:
        hook.remove()
    return out, seen


def _states(model, ids=IDS, input_ids=INPUT_IDS):
    """The four states computed by hand: w, ŵ (hidden states), v, v̂, and [CLS] of w."""
    attention = torch.ones_like(input_ids)
    masked_text = input_ids.clone()
    for b, positions in enumerate(MASKED_TOKENS):
        masked_text[b, positions] = TEXT_MASK
    masked_ids = ids.clone()
    for b, fields in enumerate(TAB_FIELDS):
        masked_ids[b, fields] = MASK_ID
    with torch.no_grad():
        w = model.language_model(input_ids, attention)
        w_hat = model.language_model(masked_text, attention).hidden_states
        return {"w": w.hidden_states, "cls": w.cls, "w_hat": w_hat, "masked_text": masked_text,
                "v": model.backbone.encode(ids), "v_hat": model.backbone.encode(masked_ids), "masked_ids": masked_ids}


def test_mlm_golden_by_hand():
    """Eq. 6 and 12: g_PLM reads ŵ at the masked positions joined with the clean table's v;
    targets are the original token ids; mean over each sample's masked tokens, then over B."""
    model = _pretrain_model(mtm=False, icl=False)
    out, _ = _forward(model)
    s = _states(model)
    per_sample = []
    with torch.no_grad():
        for b, positions in enumerate(MASKED_TOKENS):
            losses = [F.cross_entropy(model.mlm_head.net(torch.cat([s["w_hat"][b, p], s["v"][b]]))[None],
                                      INPUT_IDS[b, p][None]) for p in positions]
            per_sample.append(sum(losses) / len(losses))
    torch.testing.assert_close(out.mlm, sum(per_sample) / len(per_sample))
    torch.testing.assert_close(out.loss, out.mlm)


def test_each_head_receives_its_states():
    """MLM ← [ŵ ⊕ v], MTM ← [v̂ ⊕ attend(v̂, w)] scored against the original ids, ICL ← ([CLS] of w, v)."""
    model = _pretrain_model()
    out, seen = _forward(model)
    s = _states(model)
    rows = torch.tensor([b for b, p in enumerate(MASKED_TOKENS) for _ in p])
    cols = torch.tensor([c for p in MASKED_TOKENS for c in p])
    tokens, reference = seen["mlm"]
    torch.testing.assert_close(tokens, s["w_hat"][rows, cols])
    torch.testing.assert_close(reference, s["v"][rows])
    v_hat, u, fields, targets = seen["mtm"][:4]
    torch.testing.assert_close(v_hat, s["v_hat"])
    with torch.no_grad():
        torch.testing.assert_close(u, model.mtm_head.attend(s["v_hat"], s["w"], torch.ones_like(INPUT_IDS)))
    assert torch.equal(fields, TAB_FIELDS) and torch.equal(targets, IDS)
    assert seen["mtm"][4] == model.config.nce_noise
    cls, v = seen["icl"]
    torch.testing.assert_close(cls, s["cls"])
    torch.testing.assert_close(v, s["v"])
    with torch.no_grad():
        # MTM: the mean over the batch of each sample's loss (the fields were chosen ahead, so the
        # generator's first draws are the noise)
        per_sample = model.mtm_head(s["v_hat"], u, TAB_FIELDS, IDS, model.config.nce_noise,
                                    torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.mtm, per_sample.mean())
        # ICL (Eq. 11) with the configured τ, both directions
        z_text, z_tab = model.icl_head.text_proj(s["cls"]), model.icl_head.tab_proj(s["v"])
        logits = z_text @ z_tab.t() / 0.7
        pairs = torch.arange(len(IDS))
        torch.testing.assert_close(out.icl, (F.cross_entropy(logits, pairs) + F.cross_entropy(logits.t(), pairs)) / 2)
    assert model.config.temperature == 0.7
    torch.testing.assert_close(out.loss, out.mlm + out.mtm + out.icl)  # Eq. 12


def _moves(model, loss: str, **inputs) -> bool:
    """Whether ``loss`` changes when the forward gets ``inputs`` instead of the defaults."""
    return not torch.isclose(getattr(_forward(model, **inputs)[0], loss), getattr(_forward(model)[0], loss))


def test_changing_one_input_moves_only_the_losses_that_read_it():
    ids = IDS.clone()
    ids[0, 1] = 19  # a masked field's original id (TAB_FIELDS)
    unmasked_field = IDS.clone()
    unmasked_field[0, 2] = 25
    masked_token = INPUT_IDS.clone()
    masked_token[0, 3] = 27  # a masked token's original id (MASKED_TOKENS)
    unmasked_token = INPUT_IDS.clone()
    unmasked_token[0, 12] = 27
    other_fields = {"tab_fields": torch.tensor([[2], [1]]), "text_fields": torch.tensor([[1, 2], [0, 1]])}
    # MLM alone, without the table (no joint reconstruction): ŵ and the original tokens only
    mlm = _pretrain_model(mtm=False, icl=False, joint_reconstruction=False)
    assert _moves(mlm, "mlm", input_ids=masked_token) and _moves(mlm, "mlm", input_ids=unmasked_token)
    assert not _moves(mlm, "mlm", ids=ids) and not _moves(mlm, "mlm", ids=unmasked_field)
    # MTM alone, without the text: v̂ and the original ids only
    mtm = _pretrain_model(mlm=False, icl=False, joint_reconstruction=False)
    assert _moves(mtm, "mtm", ids=ids) and _moves(mtm, "mtm", ids=unmasked_field)
    assert not _moves(mtm, "mtm", input_ids=masked_token) and not _moves(mtm, "mtm", input_ids=unmasked_token)
    # with joint reconstruction MLM reads the clean table (a masked field's value included), MTM the clean text
    full = _pretrain_model()
    assert _moves(full, "mlm", ids=ids) and _moves(full, "mtm", input_ids=masked_token)
    # ICL reads the clean pair: every value counts, which fields are masked does not
    icl = _pretrain_model(mlm=False, mtm=False)
    assert _moves(icl, "icl", ids=ids) and _moves(icl, "icl", input_ids=masked_token)
    assert not _moves(icl, "icl", **other_fields) and not _moves(full, "icl", **other_fields)
    assert _moves(full, "mlm", **other_fields) and _moves(full, "mtm", **other_fields)


def test_no_leakage_of_what_was_masked():
    """v̂ is the same whatever a masked field held; the encoder's masked input holds no masked
    token's original id, and ŵ is the same whatever those tokens were."""
    model = _pretrain_model()
    _, seen = _forward(model)
    ids = IDS.clone()
    ids[0, 1] = 19  # sample 0's masked field (TAB_FIELDS) holds another value
    moved, other = _forward(model, ids=ids)
    torch.testing.assert_close(other["mtm"][0], seen["mtm"][0])  # v̂
    assert torch.equal(other["mtm"][3], ids)  # scored against what the field really held
    base, _ = _forward(model)
    assert not torch.isclose(moved.mtm, base.mtm)

    masked_half = seen["lm"][0][len(IDS):]  # the one encoder pass: clean rows, then masked rows
    torch.testing.assert_close(masked_half, _states(model)["masked_text"])
    for b, positions in enumerate(MASKED_TOKENS):
        assert (masked_half[b, positions] == TEXT_MASK).all()
        assert not set(INPUT_IDS[b, positions].tolist()) & set(masked_half[b].tolist())
    text = INPUT_IDS.clone()
    text[1, 7:9] = torch.tensor([27, 28])  # sample 1's masked value tokens
    _, changed = _forward(model, input_ids=text)
    torch.testing.assert_close(changed["lm"][0][len(IDS):], masked_half)


def test_cross_attention_by_hand():
    """Eq. 7: u = Σ_l softmax_l(q · w_l / √Dt) w_l with q = Q v̂, padded positions excluded."""
    head = MTMHead(tab_dim=2, text_dim=4, num_fields=1, counts=torch.ones(3), dim=2)
    with torch.no_grad():
        head.query.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    v_hat = torch.tensor([[1.0, 2.0]])  # q = (1, 2, 3, 0)
    w = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0], [9.0, 9.0, 9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    scores = [1.0 / 2.0, 5.0 / 2.0, 0.0 / 2.0]  # q · w_l / √4
    weights = [math.exp(x) / sum(math.exp(y) for y in scores) for x in scores]
    expected = [sum(p * w[0, l, d].item() for l, p in enumerate(weights)) for d in range(4)]
    torch.testing.assert_close(head.attend(v_hat, w, mask)[0], torch.tensor(expected))


def test_finetuning_loss_is_eq_15_through_the_trainers_step():
    """Eq. 13-15: the joint logit α ℓ_ID + (1 − α) ℓ_PLM with α on the ID side, and the loss
    BCE(joint) + BCE(ID) + BCE(PLM), as the trainer's real step computes it."""
    model = FlipCTRModel(_backbone(), _language_model(), alpha=0.8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (6, 3), generator=g)
    input_ids = torch.randint(5, 30, (6, 15), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    hand = copy.deepcopy(model).train()
    with torch.no_grad():
        id_logit = hand.backbone.logit(hand.backbone.encode(ids))
        plm_logit = hand.plm_head(hand.language_model(input_ids, torch.ones_like(input_ids)).cls).squeeze(-1)
        joint = 0.8 * id_logit + 0.2 * plm_logit
        bce = F.binary_cross_entropy_with_logits
        expected = bce(joint, labels) + bce(id_logit, labels) + bce(plm_logit, labels)
        out = hand(ids, input_ids, torch.ones_like(input_ids))
    torch.testing.assert_close(out.logits, joint)
    cfg = tiny_config(batch_size=6, epochs=1, lr=1e-3, length_buckets=0)
    split = DeviceRows(labels, {"ids": ids, "input_ids": input_ids, "lengths": torch.full((6,), 15)})
    result = Trainer(cfg.train, Runtime.of(cfg.train, "cpu")).fit(model, split)
    assert result.history[0].train_loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("ahead", [True, False])
def test_text_and_table_fields_are_drawn_independently(ahead):
    """Each side draws its own fields (3.3.1): with one field of eight masked per side, they
    coincide in about 1/8 of the rows, not always. Both ways of drawing: ahead on the host
    (pretraining's) and inside the forward."""
    from flipctr.data.masking import FieldMasker

    rows, fields = 4000, 8
    masker = FieldMasker(fields, MASK_ID, TEXT_MASK, 0.15, 0.15)
    generator = torch.Generator().manual_seed(0)
    if ahead:
        tab, text = masker.choose(rows, generator)
    else:  # one token per field at position f + 1: the masked token gives the text field
        spans = torch.stack([torch.arange(1, fields + 1), torch.arange(2, fields + 2)], -1).expand(rows, -1, -1)
        masked = masker(torch.ones(rows, fields, dtype=torch.long), torch.full((rows, fields + 2), 9),
                        torch.ones(rows, fields + 2, dtype=torch.long), spans, generator)
        tab, text = masked.tab_fields, masked.text_positions.long().argmax(1, keepdim=True) - 1
    assert tab.shape == text.shape == (rows, 1)
    same = (tab == text).float().mean().item()
    assert abs(same - 1 / fields) < 0.03  # sd of the fraction ~0.005


def test_a_pretraining_step_is_bitwise_repeatable_on_several_threads():
    """Same inputs and seeds, two threads: the same gradients to the last bit (indexing with
    repeated ids must not sum in a thread-dependent order; Adam would make that lr-sized)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = 64
        ids, input_ids, spans = IDS.repeat(rows, 1), INPUT_IDS.repeat(rows, 1), SPANS.repeat(rows, 1, 1)
        tab, text = TAB_FIELDS.repeat(rows, 1), TEXT_FIELDS.repeat(rows, 1)

        def gradients():
            model = _pretrain_model().train()
            torch.manual_seed(5)
            out = model(ids, input_ids, torch.ones_like(input_ids), spans, torch.Generator().manual_seed(0),
                        text_targets=int(model.masker.text_targets(spans, text).sum()), tab_fields=tab,
                        text_fields=text)
            out.loss.backward()
            return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        first, second = gradients(), gradients()
        assert [n for n in first if not torch.equal(first[n], second[n])] == []
    finally:
        torch.set_num_threads(threads)
