"""Run configuration: dataclasses with defaults from the paper, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    dataset: str = "ml-1m"  # a known name, or the path of a custom dataset's YAML schema
    test_fraction: float = 0.1  # last 10 % by order is test (paper)
    valid_fraction: float = 1 / 9  # carved from the END of the training part
    min_count: int = 1  # values seen fewer times in the fitting rows map to OOV
    limit: int | None = None  # only the first N labelled samples, in split order
    # split order: "time" (chronological), "shuffle" (seeded), "file" (as in the raw file);
    # None: the dataset's own (ML-1M, GoodReads: time; BookCrossing: shuffle). See data/splits.py.
    order: str | None = None
    shuffle_seed: int = 42  # the permutation of order="shuffle"
    max_length: int | None = None  # prompt tokens; None: the paper's (GoodReads 180, ML-1M and BookCrossing 100), for
    # other data the 99th percentile of its prompts' lengths (capped at the encoder's maximum)


@dataclass
class ModelConfig:
    name: str = "dcnv2"
    embedding_dim: int = 32
    dnn_hidden: list[int] = field(default_factory=lambda: [300, 300, 128])
    dropout: float = 0.0
    batch_norm: bool = True  # chosen on ML-1M validation AUC with DCNv2: 0.8300 vs 0.8240 without
    # DCN / DCNv2
    cross_layers: int = 3
    cross_variant: str = "full"  # "full" (DCNv2 paper) or "mix" (low-rank mixture, DCN-Mix)
    cross_experts: int = 4
    cross_rank: int = 32
    structure: str = "parallel"  # "parallel" or "stacked"
    # AutoInt
    attention_layers: int = 3
    attention_heads: int = 2
    attention_dim: int = 64
    attention_residual: bool = True
    autoint_dnn: bool = False
    # xDeepFM
    cin_layers: list[int] = field(default_factory=lambda: [64, 64])
    # AFM
    afm_attention_dim: int = 32
    # AFN
    afn_log_neurons: int = 64
    # language model (model "plm", and FLIP)
    plm: str = "minilm-l6"  # packaged name, local folder or hub id
    plm_trainable_layers: int | None = None  # None: all layers train; k: only the top k
    # how the padding mask reaches the encoder: "auto" (a prepared 4-D mask on CUDA, no host wait
    # per forward; the 2-D one elsewhere), "2d", "4d" (models.language.LanguageModel)
    plm_attention_mask: str = "auto"
    backbone: str = "dcnv2"  # the ID backbone inside the joint model (name "flip")


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # "adam" or "adamw"
    lr: float | None = None  # None: the model's default (1e-3 ID models, 5e-5 language models)
    weight_decay: float = 0.0
    sparse_embeddings: str = "auto"  # lazy Adam on sparse rows: "auto" (tables >= 100k rows), "on", "off"
    embedding_l2: float = 0.0  # L2 on the embedding rows a batch touches
    batch_size: int = 256
    eval_batch_size: int | None = None  # None: the model's default (8192 ID models, 256 language models)
    epochs: int = 20
    patience: int = 2  # evaluations without a validation-AUC gain before stopping
    evals_per_epoch: int = 1  # validation evaluations per epoch (finer choice of training length)
    # wall-clock seconds per training stage (selection, refit), checked at each evaluation: the
    # stage stops when the next evaluation would come past it (None: no limit)
    max_seconds: float | None = None
    reduce_lr_on_plateau: bool = False
    reduce_lr_factor: float = 0.1
    protocol: str = "clean"  # "clean" (select on valid) or "paper" (select on test)
    refit: bool = True  # clean protocol: retrain on train+valid for the selected epoch count
    seed: int = 2024
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    amp: str = "auto"  # bf16 autocast: "auto" (where the hardware has fast bf16), "bf16", "off"
    # the same digits on any x86-64 machine with AVX2 (same threads and versions): fp32, kernels
    # pinned at AVX2, MKL's COMPATIBLE branch, deterministic algorithms (flipctr.runtime.environment); for
    # the whole process, pretraining included
    deterministic: bool = False
    compile: bool = False  # torch.compile the training step
    length_buckets: int = 50  # text: batches of similar prompt length, sorted within chunks of N batches (0: off)
    progress: bool = True


@dataclass
class FlipSettings:
    """FLIP pretraining objectives and their switches (the ablations of paper Table 5)."""

    mlm: bool = True
    mtm: bool = True
    icl: bool = True
    joint_reconstruction: bool = True  # False: MLM sees only ŵ, MTM only v̂
    token_level_masking: bool = False  # True: BERT-style random 15 % tokens instead of fields
    text_mask_ratio: float = 0.15
    tab_mask_ratio: float = 0.15
    nce_noise: int = 25
    mtm_dim: int = 32
    icl_dim: int = 128
    temperature: float = 0.7
    mlm_dropout: float = 0.2


@dataclass
class PretrainConfig:
    """Modality-alignment pretraining schedule (paper 4.1.4: AdamW 5e-5 cosine, batch 1024, 30 epochs)."""

    lr: float = 5e-5
    weight_decay: float = 1e-3
    batch_size: int = 1024
    epochs: int = 30
    warmup_steps: int = 0
    rows: int | None = None  # pretrain on N rows of train+valid only (None: all)
    rows_from: str = "last"  # which N rows: "last" (the most recent) or "random" (a seeded uniform sample)
    # wall-clock seconds: the cosine schedule is sized to the steps that fit (measured after the
    # first steps) and pretraining stops, with a checkpoint, when they are done (None: no limit)
    max_seconds: float | None = None
    seed: int = 2024
    amp: str = "auto"
    length_buckets: int = 50  # batches of similar prompt length, sorted within chunks of N batches (0: off)
    compile: bool = False  # torch.compile the language model (widths come in multiples of 8: few shapes)
    # ID tables (backbone embedding, MTM output table) with row-sparse gradients, updated as AdamW
    # updates dense ones (every row, weight decay included; no table-sized gradient in memory):
    # "auto" (tables >= 100k rows, one process), "on", "off"
    sparse_embeddings: str = "auto"
    progress: bool = True


@dataclass
class TextFinetuneConfig:
    """Finetuning of the models with a language model inside (FLIP_PLM, FLIP), where it
    differs from ``train``: language-model passes cost far more than ID-model steps."""

    lr: float = 5e-5  # the language model and its head
    id_lr: float = 1e-3  # the joint model's ID backbone
    alpha_lr: float = 1e-2  # the joint model's α = sigmoid(a): a's learning rate
    batch_size: int = 256
    epochs: int = 10
    train_rows: int | None = None  # train on the last N training rows only (None: all)
    valid_rows: int | None = None  # select on the last N validation rows only (None: all); test is always whole
    refit: bool = True
    max_seconds: float | None = None  # per training stage of FLIP_PLM and FLIP, as train.max_seconds
    # FLIP's starting point: "pretrained" (paper: the pretraining checkpoint) or "finetuned"
    # (the finetuned FLIP_ID and FLIP_PLM, so that an ID side trained on all rows joins a text
    # side trained on a subset; each protocol stage starts from the same stage of those two)
    joint_init: str = "pretrained"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flip: FlipSettings = field(default_factory=FlipSettings)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    text_finetune: TextFinetuneConfig = field(default_factory=TextFinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        cfg = cls()
        apply_dict(cfg, raw)
        return cfg


def apply_dict(cfg: Config, raw: dict[str, Any], where: str = "config") -> None:
    for section, values in (raw or {}).items():
        if not hasattr(cfg, section) or not isinstance(values, dict):
            raise ValueError(f"{where}: unknown section {section!r} (expected data, model, train, flip, pretrain, text_finetune)")
        target = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{where}: unknown key {section}.{key} (known: {sorted(names)})")
            setattr(target, key, value)


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply ``section.key=value``, read as the type of the setting it replaces
    (strings stay verbatim, so ``train.amp=off`` is not YAML's False; lists and null are YAML)."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ValueError(f"--set {assignment!r}: expected section.key=value, e.g. train.lr=1e-3")
    dotted, text = assignment.split("=", 1)
    section, key = dotted.split(".", 1)
    current = getattr(getattr(cfg, section, None), key, None)
    try:
        if text.strip().lower() in ("null", "none", "~"):
            value: Any = None
        elif isinstance(current, str):
            value = text
        elif isinstance(current, bool):
            value = yaml.safe_load(text)
        elif isinstance(current, float):
            value = float(text)
        elif isinstance(current, int):
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            value = int(number)
        else:
            value = yaml.safe_load(text)
            if isinstance(value, str):  # YAML reads 1e-3 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
    except ValueError as err:
        raise ValueError(f"--set {assignment}: {text!r} is not a valid {type(current).__name__}") from err
    apply_dict(cfg, {section: {key: value}}, where=f"--set {assignment}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        apply_dict(cfg, yaml.safe_load(Path(path).read_text()) or {}, where=str(path))
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    return cfg
