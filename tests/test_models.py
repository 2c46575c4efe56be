import numpy as np
import pytest
import torch

from flipctr.config import ModelConfig
from flipctr.data.encoder import FeatureMap, FieldInfo
from flipctr.models.backbones import MODELS, build_model
from flipctr.models.layers import CrossNetMix, CrossNetV1, CrossNetV2, fm_interaction

from conftest import tiny_config


def _feature_map(num_fields=5, size=7):
    fields = [FieldInfo(f"f{i}", 1 + i * size, size) for i in range(num_fields)]
    return FeatureMap(fields, 1 + num_fields * size, 1, 100)


def _ids(fmap, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = [f.offset + torch.randint(0, f.size, (batch,), generator=g) for f in fmap.fields]
    return torch.stack(cols, 1).to(torch.int32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backbone_shapes_and_interface(name):
    cfg = tiny_config().model
    cfg.name = name
    fmap = _feature_map()
    torch.manual_seed(0)
    model = build_model(cfg, fmap)
    ids = _ids(fmap)
    emb = model.embed(ids)
    assert emb.shape == (6, 5, cfg.embedding_dim)
    assert model.embedding.weight.shape == (fmap.num_features, cfg.embedding_dim)
    v = model.encode(ids)
    assert v.shape == (6, model.output_dim)
    out = model(ids)
    assert out.logits.shape == (6,)
    torch.testing.assert_close(out.logits, model.logit(v))
    out.logits.sum().backward()
    assert model.embedding.weight.grad is not None and model.embedding.weight.grad.abs().sum() > 0


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model(ModelConfig(name="nope"), _feature_map())


def test_dcnv2_mix_and_stacked_variants():
    fmap = _feature_map()
    for variant, structure in (("mix", "parallel"), ("full", "stacked")):
        cfg = tiny_config().model
        cfg.cross_variant, cfg.structure, cfg.cross_rank, cfg.cross_experts = variant, structure, 3, 2
        model = build_model(cfg, fmap)
        assert model(_ids(fmap)).logits.shape == (6,)
        assert (variant == "mix") == isinstance(model.cross, CrossNetMix)


def test_cross_v2_golden_numbers_by_hand():
    """x1 = x0 ⊙ (W x0 + b) + x0 ; x2 = x0 ⊙ (W x1 + b) + x1, worked out on paper."""
    net = CrossNetV2(2, 2)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            layer.bias.copy_(torch.tensor([0.5, -0.5]))
    out = net(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[59.5, 245.0]]))


def test_cross_v2_fixed_seed_matches_formula():
    torch.manual_seed(7)
    net = CrossNetV2(4, 3)
    for layer in net.layers:
        torch.nn.init.normal_(layer.bias)
    x0 = torch.randn(3, 4)
    x = x0.double().numpy()
    ref = x.copy()
    for layer in net.layers:
        W, b = layer.weight.double().detach().numpy(), layer.bias.double().detach().numpy()
        ref = x * (ref @ W.T + b) + ref
    np.testing.assert_allclose(net(x0).detach().numpy(), ref, rtol=1e-5)


def test_cross_v1_and_fm_by_hand():
    net = CrossNetV1(2, 1)
    with torch.no_grad():
        net.w[0].copy_(torch.tensor([1.0, -1.0]))
        net.b[0].copy_(torch.tensor([0.0, 1.0]))
    # x0 (x0·w) + b + x0 with x0 = [3, 1]: [3,1]*2 + [0,1] + [3,1] = [9, 4]
    torch.testing.assert_close(net(torch.tensor([[3.0, 1.0]])), torch.tensor([[9.0, 4.0]]))
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    # Σ_{i<j} e_i ⊙ e_j = [1*3 + 1*5 + 3*5, 2*4 + 2*6 + 4*6]
    torch.testing.assert_close(fm_interaction(emb), torch.tensor([[23.0, 44.0]]))
