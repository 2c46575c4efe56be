
import pytest

from flipctr.runtime.device import Runtime
from flipctr.config import Config, load_config


def test_overrides_keep_the_type_of_the_setting():
    cfg = load_config(None, ["train.amp=off", "train.lr=1e-3", "train.epochs=5", "model.dnn_hidden=[8, 4]",
                             "data.limit=1000", "train.refit=false", "train.eval_batch_size=1e4"])
    assert cfg.train.amp == "off"  # not YAML's False
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 5 and cfg.train.eval_batch_size == 10000
    assert cfg.model.dnn_hidden == [8, 4] and cfg.data.limit == 1000 and cfg.train.refit is False
    assert load_config(None, ["data.limit=1000", "data.limit=null"]).data.limit is None


def test_bad_overrides_are_clear_errors():
    with pytest.raises(ValueError, match="unknown key train.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ValueError, match="expected section.key=value"):
        load_config(None, ["lr=1"])
    with pytest.raises(ValueError, match="'2.5' is not a valid int"):
        load_config(None, ["train.epochs=2.5"])


def test_yaml_file_and_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: deepfm, embedding_dim: 16}\ntrain: {lr: 0.01}\n")
    cfg = load_config(path, ["train.lr=0.02"])
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.train.lr) == ("deepfm", 16, 0.02)
    assert Config.from_dict(cfg.to_dict()) == cfg
    path.write_text("optim: {lr: 1}\n")
    with pytest.raises(ValueError, match="unknown section 'optim'"):
        load_config(path)


def test_the_auto_profile_is_gpu_where_cuda_is_present(monkeypatch):
    import torch

    from flipctr.cli import build_parser
    from flipctr.profiles import resolve_profile

    assert build_parser().parse_args(["run", "--run-dir", "x"]).profile == "auto"  # what `make run` passes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_profile("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile("auto") == "gpu"
    assert resolve_profile("paper") == "paper"


def test_a_bad_amp_setting_is_named_as_the_user_wrote_it():

    from flipctr.config import PretrainConfig

    with pytest.raises(ValueError, match="pretrain.amp must be 'auto', 'bf16' or 'off', not 'fp8'"):
        Runtime.of(PretrainConfig(amp="fp8"), "cpu")
