"""The GPU fast paths, checked on the CPU against the eager path they replace."""

import pytest
import torch
from transformers import BertConfig

from flipctr.models.language import LanguageModel, additive_mask


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
