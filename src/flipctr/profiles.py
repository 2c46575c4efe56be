"""Named run settings (``flipctr run --profile NAME``): overrides applied on top of the defaults."""

from __future__ import annotations

from .config import Config, apply_override

# Named settings. `paper`: the paper's hyperparameters (4.1.4; needs a GPU for ML-1M).
# `cpu`: a reduced schedule for a 2-core CPU (see README for every reduction).
PROFILES: dict[str, list[str]] = {
    "paper": [
        "pretrain.lr=5e-5", "pretrain.batch_size=1024", "pretrain.epochs=30", "pretrain.rows=null",
        "train.batch_size=256", "text_finetune.batch_size=256", "text_finetune.lr=5e-5",
        "text_finetune.train_rows=null", "text_finetune.valid_rows=null", "text_finetune.refit=true",
        "model.plm_trainable_layers=null", "text_finetune.joint_init=pretrained",
    ],
    # `gpu`: the paper's hyperparameters with 5 pretraining epochs. Measured on one H200
    # (benchmarks/results/flip_ml1m_gpu.md): ~39 s per epoch of 665k rows (17k rows/s).
    "gpu": [
        "pretrain.lr=5e-5", "pretrain.batch_size=1024", "pretrain.epochs=5", "pretrain.rows=null",
        "train.batch_size=256", "text_finetune.batch_size=256", "text_finetune.lr=5e-5",
        "text_finetune.train_rows=null", "text_finetune.valid_rows=null", "text_finetune.refit=true",
        "model.plm_trainable_layers=null", "text_finetune.joint_init=pretrained",
        "train.eval_batch_size=4096",
    ],
    "cpu": [
        "pretrain.lr=1e-3", "pretrain.batch_size=256", "pretrain.epochs=2", "pretrain.rows=25000",
        "pretrain.rows_from=random",
        "model.plm_trainable_layers=0", "train.batch_size=256",
        "text_finetune.batch_size=256", "text_finetune.lr=1e-3", "text_finetune.id_lr=1e-4",
        "text_finetune.epochs=5", "text_finetune.train_rows=10000", "text_finetune.valid_rows=10000",
        "text_finetune.refit=true", "text_finetune.joint_init=finetuned",
    ],
}

PROFILE_CHOICES = ["auto", *PROFILES]


def resolve_profile(name: str) -> str:
    """``auto``: ``gpu`` where CUDA is present, else ``cpu``; any other name as it is."""
    if name != "auto":
        return name
    import torch  # here: the command line imports this module and starts without torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def profile_config(profile: str, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = base or Config()
    for assignment in [*PROFILES[profile], *(overrides or [])]:
        apply_override(cfg, assignment)
    return cfg
