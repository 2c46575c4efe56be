"""The GPU fast paths, checked on the CPU against the eager path they replace."""

import pytest
import torch
from transformers import BertConfig

from flipctr.models.language import LanguageModel, additive_mask
from flipctr.training.trace import data_dependent_shapes, host_reads, traced


def _encoder(mask: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel.from_config(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=32,
                                                max_position_embeddings=64), attention_mask=mask)


def _padded_batch(rows: int = 9, width: int = 24):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, width + 1, (rows,), generator=g)
    lengths[0] = width  # one row unpadded, the others padded
    input_ids = torch.randint(5, 40, (rows, width), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    return input_ids * mask, mask


@pytest.mark.parametrize("autocast", [False, True])
def test_the_prepared_4d_mask_gives_the_2d_masks_states_and_gradients(autocast):
    """Padding handled by a mask built here (no look at its values) equals transformers' own
    mask: fp32 to 1e-6; bf16 autocast to bf16's resolution."""
    input_ids, mask = _padded_batch()
    out = {}
    for kind in ("2d", "4d"):
        lm = _encoder(kind)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = lm(input_ids, mask).hidden_states
        (hidden.float() * mask[..., None]).sum().backward()
        out[kind] = hidden.float(), {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}
    real = mask.bool()
    torch.testing.assert_close(out["4d"][0][real], out["2d"][0][real], **tol)
    assert out["4d"][1].keys() == out["2d"][1].keys()
    for name, grad in out["2d"][1].items():
        torch.testing.assert_close(out["4d"][1][name], grad, **tol, msg=name)


def test_the_4d_mask_never_asks_for_the_masks_values(monkeypatch):
    """The host wait the fast path removes: transformers' check whether any token is padding
    (``mask.all()``, a device-to-host read on a GPU) must not run with the 4-D mask."""
    from transformers import masking_utils

    def looked(*args, **kwargs):
        raise AssertionError("transformers inspected the mask's values")

    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", looked)
    input_ids, mask = _padded_batch()
    _encoder("4d")(input_ids, mask)
    with pytest.raises(AssertionError, match="inspected"):  # the 2-D path does (the test can fail)
        _encoder("2d")(input_ids, mask)


def test_auto_is_the_4d_mask_on_cuda_only():
    assert LanguageModel.mask_kind("auto", torch.device("cuda")) == "4d"
    assert LanguageModel.mask_kind("auto", torch.device("cpu")) == "2d"
    assert LanguageModel.mask_kind("2d", torch.device("cuda")) == "2d"
    with pytest.raises(ValueError, match="model.plm_attention_mask must be one of"):
        _encoder("3d")


def test_the_additive_mask_is_zero_where_attended_and_the_lowest_value_elsewhere():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = additive_mask(mask, torch.bfloat16)
    assert out.shape == (2, 1, 1, 3) and out.dtype == torch.bfloat16
    lowest = torch.finfo(torch.bfloat16).min
    assert out[:, 0, 0].tolist() == [[0.0, 0.0, lowest], [0.0, lowest, lowest]]


def _pretraining_step_inputs(mask: str = "auto"):
    """A tiny pretraining model and one batch with everything drawn ahead, as the pretraining
    stage hands it over: the masked fields, the MLM target count, the MTM noise."""
    from test_flip import _batch, _tiny_pair

    from flipctr.data.masking import choose_fields, field_mask, span_token_mask

    model, _, lm = _tiny_pair()
    lm.attention_mask = mask
    ids, input_ids, attention, spans = _batch()
    g = torch.Generator().manual_seed(0)
    tab = choose_fields(len(ids), 3, model.masker.tab_ratio, g)
    text = choose_fields(len(ids), 3, model.masker.text_ratio, g)
    targets = int(span_token_mask(spans, field_mask(text, 3), input_ids.shape[1]).sum())
    noise = model.mtm_head.sample_noise(tab.numel(), model.config.nce_noise, g)
    return model, (ids, input_ids, attention, spans), {"tab_fields": tab, "text_fields": text,
                                                       "text_targets": targets, "nce_noise": noise}


def test_noise_drawn_ahead_is_the_noise_the_forward_draws():
    """The stage draws MTM's noise before the forward from the generator the forward would use:
    the same numbers, so the same loss and gradients, bit for bit."""
    model, batch, ahead = _pretraining_step_inputs()
    results = []
    for drawn_ahead in (False, True):
        generator = torch.Generator().manual_seed(7)
        noise = model.mtm_head.sample_noise(ahead["tab_fields"].numel(), model.config.nce_noise, generator) \
            if drawn_ahead else None
        torch.manual_seed(1)  # dropout
        out = model(*batch, torch.Generator().manual_seed(7) if not drawn_ahead else None,
                    **{**ahead, "nce_noise": noise})
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.parametrize("mask", ["2d", "4d"])
def test_the_pretraining_step_traces_whole_with_static_shapes(mask):
    """With the masks, the MLM target count and the noise drawn ahead, the pretraining forward
    (and its backward) is one graph: no host sync, no data-dependent shape, nothing drawn from a
    generator inside, what CUDA graphs and ``torch.compile`` need. Its loss and gradients equal
    the eager step's (the same kernels: 1e-6)."""
    model, batch, ahead = _pretraining_step_inputs(mask)

    def step(*inputs):
        return model(*inputs, None, **ahead).loss

    torch.manual_seed(3)
    eager = step(*batch)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    torch.manual_seed(3)
    loss, graphs = traced(step, *batch)
    loss.backward()
    assert len(graphs) == 1 and not data_dependent_shapes(graphs) and not host_reads(graphs)
    torch.testing.assert_close(loss, eager, atol=1e-6, rtol=1e-6)
    for captured, plain in zip([p.grad for p in model.parameters() if p.grad is not None], grads, strict=True):
        torch.testing.assert_close(captured, plain, atol=1e-6, rtol=1e-6)


def test_the_trace_check_sees_a_data_dependent_shape_and_a_host_sync():
    """The checks above can fail: without the MLM target count the step gathers ``nonzero()``
    positions (a data-dependent shape); a value read on the host is seen in the graph, and
    branching on it breaks the graph."""
    model, batch, ahead = _pretraining_step_inputs()
    _, graphs = traced(lambda *inputs: model(*inputs, None, **{**ahead, "text_targets": None}).loss, *batch)
    assert data_dependent_shapes(graphs)

    def reads(*inputs):
        loss = model(*inputs, None, **ahead).loss
        return loss * loss.item()

    assert host_reads(traced(reads, *batch)[1])

    def branches(*inputs):
        loss = model(*inputs, None, **ahead).loss
        return loss * 2 if loss.item() > 0 else loss

    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        traced(branches, *batch)
