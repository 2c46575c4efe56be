"""``flipctr run``: data -> FLIP pretraining -> finetuning of the backbone from scratch,
FLIP_ID, FLIP_PLM and FLIP -> ``results.{json,md}``.

All stages use one encoding, fitted on train+valid: pretraining reads the (unlabelled)
train+valid rows, so every finetuned model must share its feature ids. Test rows are never
seen before the final evaluation; model selection uses the validation split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config
from ..data.batching import DeviceRows
from ..data.cache import prepare, resolve_data_config
from ..data.encoder import MASK_ID, FeatureMap
from ..data.lm_files import load_tokenizer
from ..models import build_ctr_model
from ..models.flip import FlipCTRModel, FlipPretrainModel
from ..models.language import LanguageModel
from ..models.plm import PLMCTRModel
from ..paper import table2
from .report import render_results
from ..runtime.checkpoints import load_shards, load_weights, save_shards, seed_everything
from ..runtime.device import Runtime, autocast_dtype, resolve_device
from ..runtime.distributed import barrier, is_main, rank_world
from ..runtime.environment import environment_info
from ..utils import atomic_path, write_json, write_text
from ..training.optim import lr_scales, text_finetune_settings
from ..training.pretrain import Pretrainer
from .protocol import RunData, fast_paths, pinned, train_run
from ..training.tracking import setup_logging

log = logging.getLogger("flipctr")
VARIANTS = ("scratch", "flip_id", "flip_plm", "flip")
ENCODING = "train+valid"


@dataclass(frozen=True)
class Method:
    """A recipe of the one pretraining loop and finetuning runner (``flipctr run --method``): the
    objectives it fixes, the finetuned variants it may report, and their names there (the
    paper's Table 2 row, where it is not the variant's own)."""

    title: str
    objectives: dict[str, bool]
    variants: tuple[str, ...]
    reported: dict[str, tuple[str, str]] = field(default_factory=dict)  # variant -> (name, Table 2 key)
    trains_text: bool = False  # its pretraining trains the language model alone: a frozen one is refused

    def overrides(self) -> list[str]:
        return [f"flip.{key}={str(value).lower()}" for key, value in self.objectives.items()]


METHODS = {
    "flip": Method("FLIP", {}, VARIANTS),
    # CTRL: instance-level contrastive alignment alone, then the ID model finetuned alone
    "ctrl": Method("CTRL", {"mlm": False, "mtm": False, "icl": True}, ("scratch", "flip_id"),
                   {"flip_id": ("CTRL", "ctrl")}),
    # PTab: token-level MLM of the prompts (the text alone), then the language model finetuned for CTR
    "ptab": Method("PTab", {"mlm": True, "mtm": False, "icl": False, "joint_reconstruction": False,
                            "token_level_masking": True}, ("flip_plm",), {"flip_plm": ("PTab", "ptab")},
                   trains_text=True),
}


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def finetuned_weights(folder: Path, stage: str) -> dict[str, torch.Tensor]:
    """A finetuned run's weights at ``stage``: "selected" (trained on train only, picked on
    valid) or "final" (after the refit; the selected ones when the run did not refit)."""
    path = folder / "model-selected.safetensors"
    if stage == "final" or not path.exists():
        path = folder / "model.safetensors"
    return load_weights(path)


def pretraining_model(cfg: Config, encoding) -> FlipPretrainModel:
    """The pretraining model as ``cfg`` says: the backbone, the language model (its top
    ``plm_trainable_layers`` layers trainable) and the heads of the objectives that are on."""
    tokenizer = load_tokenizer(cfg.model.plm)
    lm = LanguageModel.from_pretrained(cfg.model.plm, cfg.model.plm_attention_mask)
    lm.freeze(cfg.model.plm_trainable_layers)
    backbone_cfg = dataclasses.replace(cfg.model, name=cfg.model.backbone)
    return FlipPretrainModel(build_ctr_model(backbone_cfg, encoding.feature_map), lm,
                             torch.from_numpy(encoding.counts), cfg.flip, MASK_ID, tokenizer.mask_token_id,
                             lm.encoder.config.vocab_size, tokenizer.cls_token_id, tokenizer.sep_token_id)


def pretraining_setup(cfg: Config, rd: RunData, encoding, device: torch.device,
                      folder: Path) -> tuple[FlipPretrainModel, DeviceRows, Pretrainer]:
    """The pretraining model, its train+valid rows and the loop, as ``cfg`` says
    (``benchmarks/pretrain_throughput.py`` measures exactly this)."""
    seed_everything(cfg.pretrain.seed)
    model = pretraining_model(cfg, encoding)
    pretrainer = Pretrainer(cfg.pretrain, Runtime.of(cfg.pretrain, device), folder)
    if not model.language_model.trainable:
        pretrainer.runtime.frozen(model.language_model)  # weights in the autocast dtype: no per-op casts
    if cfg.pretrain.rows_from == "last":
        split = rd.split("train+valid", ENCODING, cfg.pretrain.rows, spans=True)
    else:
        split = rd.split("train+valid", ENCODING, spans=True, sample=cfg.pretrain.rows, seed=cfg.pretrain.seed)
    return model, split, pretrainer


def _pretrain(cfg: Config, rd: RunData, encoding, device: torch.device, folder: Path, resume: bool) -> list[dict]:
    """FLIP pretraining into ``folder`` (resumed from its last epoch with ``resume``; a finished one
    is read back): the weights, and the encoding the backbone's ids follow (figures read it)."""
    model, split, pretrainer = pretraining_setup(cfg, rd, encoding, device, folder)
    log.info("pretraining on %d train+valid rows (%s) for %d epochs", len(split),
             cfg.pretrain.rows_from if cfg.pretrain.rows else "all", cfg.pretrain.epochs)
    history = pretrainer.fit(model, split, resume=resume)
    if is_main():
        encoding.feature_map.save(folder / "feature_map.json")
    barrier()  # rank 0 has written the weights
    return history


def pretrain_once(cfg: Config, folder: Path, data_root: Path | None = None) -> None:
    """FLIP pretraining alone into ``folder``, or read back where it finished there: the one
    pretraining that a search's finetuning trials share (``flipctr tune --method flip``)."""
    cfg = dataclasses.replace(cfg, data=resolve_data_config(cfg.data))
    device = resolve_device(cfg.train.device)
    data = prepare(cfg.data, data_root)
    _pretrain(cfg, RunData(data, cfg, device, text=True), data.encoding(ENCODING), device, folder, resume=True)


def joint_model(cfg: Config, fm: FeatureMap, pretrained: dict[str, torch.Tensor] | None) -> FlipCTRModel:
    """The joint FLIP model (Eq. 13-15), its backbone and language model from the pretraining's
    weights ``pretrained`` (None: as built)."""
    model = build_ctr_model(dataclasses.replace(cfg.model, name="flip"), fm, scales=lr_scales(cfg),
                            text_state=_prefixed(pretrained, "language_model.") if pretrained else None)
    if pretrained is not None:
        model.backbone.load_state_dict(_prefixed(pretrained, "backbone."))
    return model


def finetune_flip(cfg: Config, pretrain_dir: Path, run_dir: Path, data_root: Path | None = None,
                  resume: bool = False, **options) -> dict:
    """The joint FLIP model finetuned from the pretraining in ``pretrain_dir`` into ``run_dir``, as
    ``flipctr run`` finetunes its ``flip`` variant (``text_finetune`` settings, the pretraining's
    encoding); ``options`` go to :func:`~.protocol.train_run` (e.g. a search's ``select_only``)."""
    if cfg.text_finetune.joint_init != "pretrained":
        raise ValueError("finetuning FLIP alone starts from the pretraining: text_finetune.joint_init=pretrained")
    pretrained = load_weights(Path(pretrain_dir) / "pretrained.safetensors")
    train, rows = text_finetune_settings(cfg)
    variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="flip"), train=train)
    return train_run(variant, run_dir, data_root, model_factory=lambda fm: joint_model(cfg, fm, pretrained),
                     encoding=ENCODING, resume=resume, **rows, **options)


def install_pretraining(source: Path, folder: Path) -> list[dict]:
    """A pretraining made elsewhere, into ``folder`` as :func:`_pretrain` leaves one: ``source``
    holds its weights (``pretrained.safetensors``, or the shards :func:`export_pretraining`
    wrote, in any dtype: installed as fp32) and ``pretrain_history.json``. Returns the history."""
    source = Path(source)
    whole = source / "pretrained.safetensors"
    state = load_weights(whole) if whole.exists() else load_shards(source, "pretrained")
    if (source / "pretrain_history.json").exists():
        history = json.loads((source / "pretrain_history.json").read_text())
    else:  # the shards carry it in their first file's header
        with safe_open(str(sorted(source.glob("pretrained-*.safetensors"))[0]), "pt") as shard:
            history = json.loads((shard.metadata() or {})["pretrain_history"])
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "pretrained.safetensors") as tmp:
            save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
        write_json(folder / "pretrain_history.json", history)
    barrier()
    return history


def export_pretraining(folder: Path, out: Path, max_bytes: int, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """A finished pretraining's weights as shards of at most ``max_bytes`` in ``dtype``, its
    history in the first one's header, into ``out`` (what :func:`install_pretraining` reads)."""
    history = (folder / "pretrain_history.json").read_text()
    return save_shards(load_weights(folder / "pretrained.safetensors"), out, "pretrained", max_bytes, dtype,
                       metadata={"pretrain_history": history})


def run_flip(cfg: Config, run_dir: str | Path, variants: tuple[str, ...] = VARIANTS, resume: bool = False,
             data_root: Path | None = None, profile: str | None = None, method: str = "flip",
             pretrain_only: bool = False, pretrained_from: Path | None = None) -> dict | None:
    """``method``: see :data:`METHODS`; "ctrl" (instance-level contrastive alignment alone, then
    the ID model finetuned alone, reported as CTRL) and "ptab" (token-level MLM of the prompts,
    then the language model finetuned, reported as PTab) are baselines run through the same loop.
    ``pretrain_only``: stop after the pretraining (the results list no model); ``pretrained_from``:
    a pretraining made elsewhere (:func:`install_pretraining`) instead of pretraining here."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    recipe = METHODS[method]
    if any(getattr(cfg.flip, key) != value for key, value in recipe.objectives.items()):
        raise ValueError(f"{recipe.title} pretrains with {' '.join(recipe.overrides())}")
    if set(variants) - set(recipe.variants):
        raise ValueError(f"{recipe.title} reports the variants {list(recipe.variants)} only, not {list(variants)}")
    if recipe.trains_text and cfg.model.plm_trainable_layers == 0:
        raise ValueError(f"{recipe.title} pretrains the language model alone: model.plm_trainable_layers=0 "
                         "(a frozen encoder) would leave it nothing to learn")
    cfg = dataclasses.replace(pinned(cfg), data=resolve_data_config(cfg.data))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if cfg.pretrain.rows_from not in ("last", "random"):
        raise ValueError(f"pretrain.rows_from must be 'last' or 'random', not {cfg.pretrain.rows_from!r}")
    # under torchrun every stage is data-parallel (each rank a shard of every batch); rank 0 alone writes
    world = rank_world()[1]
    if is_main():
        setup_logging(run_dir)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if is_main():
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(run_dir / "environment.json", {**environment_info(str(device), autocast_dtype(cfg.train.amp, device)),
                                                  "profile": profile, "fast_paths": fast_paths(cfg, device),
                                                  "world_size": world})
    if not is_main():
        barrier()  # rank 0 builds the caches first
    data = prepare(cfg.data, data_root)
    encoding = data.encoding(ENCODING)
    backbone_cfg = dataclasses.replace(cfg.model, name=cfg.model.backbone)
    text_rd = RunData(data, cfg, device, text=True) if set(variants) & {"flip_id", "flip_plm", "flip"} else None
    prompts = text_rd.text.report if text_rd else None  # truncation of the prompts at data.max_length
    if is_main():
        barrier()
    pretrained: dict[str, torch.Tensor] | None = None
    pretrain_seconds = 0.0
    results: dict[str, dict] = {}

    def write_results() -> dict:
        """``results.{json,md}`` of the models finished so far (written before pretraining, then
        after each model: a run killed on a lent machine still leaves its table); ``complete``
        once all are in."""
        report = {
            "dataset": data.name, "profile": profile, "backbone": cfg.model.backbone, "plm": cfg.model.plm,
            "pretrained": pretrained is not None, "pretrain_seconds": round(pretrain_seconds, 1),
            "flip": dataclasses.asdict(cfg.flip), "prompts": prompts,
            # the stages' own times, those an earlier call ran included (a resumed run reads them back);
            # a FLIP_ID that is the scratch run (no pretraining, "note") is not counted twice
            "wall_seconds": round(pretrain_seconds + sum(r["wall_seconds"] for r in results.values()
                                                         if "note" not in r), 1),
            "complete": set(results) == set(variants), "variants": list(variants),
            "refit": {"id": cfg.train.refit, "text": cfg.text_finetune.refit},
            "max_seconds": {"pretrain": cfg.pretrain.max_seconds, "train": cfg.train.max_seconds,
                            "text_finetune": cfg.text_finetune.max_seconds},
            "results": results,
            "method": method, "title": recipe.title,
            "names": {v: recipe.reported[v][0] for v in results if v in recipe.reported},
            "paper": {v: table2(data.name, cfg.model.backbone if v == "scratch" else recipe.reported.get(v, (v, v))[1])
                      for v in results},
        }
        if is_main():
            write_json(run_dir / "results.json", report)
            write_text(run_dir / "results.md", render_results(report))
        return report

    write_results()  # the run's settings and budgets, before anything is trained
    wants_pretrain = cfg.pretrain.epochs > 0 and (cfg.flip.mlm or cfg.flip.mtm or cfg.flip.icl)
    if pretrained_from is not None:
        history = install_pretraining(pretrained_from, run_dir / "pretrain")
        if is_main():
            encoding.feature_map.save(run_dir / "pretrain" / "feature_map.json")
        pretrained = load_weights(run_dir / "pretrain" / "pretrained.safetensors")
        pretrain_seconds = sum(record["seconds"] for record in history)
    elif wants_pretrain and (pretrain_only or set(variants) & {"flip_id", "flip_plm", "flip"}):
        history = _pretrain(cfg, text_rd, encoding, device, run_dir / "pretrain", resume)
        pretrained = load_weights(run_dir / "pretrain" / "pretrained.safetensors")
        # its epochs' time, those of an earlier call included (a resumed or finished pretraining)
        pretrain_seconds = sum(record["seconds"] for record in history)
    if pretrain_only:
        return write_results() if is_main() else None

    def backbone(fmap: FeatureMap, load: bool) -> torch.nn.Module:
        model = build_ctr_model(backbone_cfg, fmap)
        if load and pretrained is not None:
            model.load_state_dict(_prefixed(pretrained, "backbone."))
        return model

    text_train, rows = text_finetune_settings(cfg)
    plm_cfg, flip_cfg = (dataclasses.replace(cfg.model, name=name) for name in ("plm", "flip"))

    def plm_model(fm: FeatureMap) -> PLMCTRModel:
        return build_ctr_model(plm_cfg, fm, text_state=_prefixed(pretrained, "language_model.") if pretrained else None)

    def flip_model(fm: FeatureMap, stage: str | None = None) -> FlipCTRModel:
        """From the pretrained backbone and language model; ``stage`` "selected"/"final": from
        that stage of the finetuned FLIP_ID and FLIP_PLM instead."""
        if stage is None:
            return joint_model(cfg, fm, pretrained)
        model = joint_model(cfg, fm, None)
        model.backbone.load_state_dict(finetuned_weights(run_dir / "flip_id", stage))
        plm = finetuned_weights(run_dir / "flip_plm", stage)
        model.plm_head.load_state_dict(_prefixed(plm, "head."))
        if model.language_model is not None:
            model.language_model.load_state_dict(_prefixed(plm, "language_model."))
        return model

    joint = {}
    if cfg.text_finetune.joint_init == "finetuned":
        if "flip" in variants and not {"flip_id", "flip_plm"} <= set(variants):
            raise ValueError("text_finetune.joint_init=finetuned needs the flip_id and flip_plm variants")
        joint = {"model_factory": lambda fm: flip_model(fm, "selected"),
                 "refit_factory": lambda fm: flip_model(fm, "final")}
    elif cfg.text_finetune.joint_init != "pretrained":
        raise ValueError(f"text_finetune.joint_init must be 'pretrained' or 'finetuned', "
                         f"not {cfg.text_finetune.joint_init!r}")
    plans = {
        "scratch": (dataclasses.replace(cfg, model=backbone_cfg), lambda fm: backbone(fm, load=False), {}),
        "flip_id": (dataclasses.replace(cfg, model=backbone_cfg), lambda fm: backbone(fm, load=True), {}),
        "flip_plm": (dataclasses.replace(cfg, model=plm_cfg, train=text_train), plm_model, rows),
        "flip": (dataclasses.replace(cfg, model=flip_cfg, train=text_train), flip_model, {**rows, **joint}),
    }

    for variant in variants:
        done = run_dir / variant / "metrics.json"
        if resume and done.exists():  # finished by an earlier call
            log.info("%s: finished earlier, read from %s", variant, done)
            results[variant] = {k: v for k, v in json.loads(done.read_text()).items() if k != "history"}
        elif variant == "flip_id" and pretrained is None and "scratch" in results:
            # without pretraining FLIP_ID is the backbone from scratch: the same run, not a second one
            if is_main():
                shutil.copytree(run_dir / "scratch", run_dir / "flip_id", dirs_exist_ok=True)
            results[variant] = {**results["scratch"], "note": "no pretraining: the scratch run"}
        else:
            variant_cfg, factory, options = plans[variant]
            metrics = train_run(variant_cfg, run_dir / variant, data_root, **{"model_factory": factory, **options},
                                encoding=ENCODING, resume=resume)
            if is_main():
                setup_logging(run_dir)  # train_run pointed the log at the variant's folder
            results[variant] = {k: v for k, v in metrics.items() if k != "history"}
        write_results()
    report = write_results()
    if not is_main():
        return None
    log.info("\n%s", render_results(report))
    return report
