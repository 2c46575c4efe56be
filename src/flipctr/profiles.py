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
    # `gpu`: the paper's hyperparameters with the pretraining epochs that fit in about 8 minutes
    # on one H100, ESTIMATED (no GPU has run it yet): ~7 GFLOP per row (two MiniLM-L6 passes
    # forward+backward over ~52 tokens, the MLM head at the masked tokens), 665k train+valid
    # rows, so ~4.7 PFLOP per epoch; at 10-25 % of the H100's ~790 bf16 TFLOP/s that is
    # 25-60 s per epoch (the loop no longer waits on the host per step). 5 epochs.
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

def profile_config(profile: str, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = base or Config()
    for assignment in [*PROFILES[profile], *(overrides or [])]:
        apply_override(cfg, assignment)
    return cfg
