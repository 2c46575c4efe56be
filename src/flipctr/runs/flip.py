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
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..config import Config
from ..data.batching import DeviceRows
from ..data.cache import prepare, resolve_data_config
from ..data.encoder import MASK_ID, FeatureMap
from ..data.lm_files import load_tokenizer
from ..models import CTRModule, build_ctr_model
from ..models.flip import FlipCTRModel, FlipPretrainModel
from ..models.language import LanguageModel
from ..paper import table2
from ..runtime.checkpoints import load_shards, load_weights, save_shards, seed_everything, shards_metadata
from ..runtime.device import Runtime, resolve_device
from ..runtime.distributed import barrier, is_main
from ..runtime.folder import PRETRAINED, RunFolder
from ..training.optim import lr_scales, text_finetune_settings
from ..training.pretrain import Pretrainer
from ..training.tracking import setup_logging
from ..utils import atomic_path, write_json
from .inputs import ModelInputs
from .protocol import pinned, start_run, train_run
from .recipes import METHODS, VARIANTS, Method
from .report import render_results

log = logging.getLogger("flipctr")
ENCODING = "train+valid"


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def finetuned_weights(folder: Path, stage: str) -> dict[str, torch.Tensor]:
    """A finetuned run's weights at ``stage``: "selected" (trained on train only, picked on
    valid) or "final" (after the refit; the selected ones when the run did not refit)."""
    run = RunFolder(folder)
    path = run.selected_model
    if stage == "final" or not path.exists():
        path = run.model
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


def pretraining_setup(cfg: Config, rd: ModelInputs, encoding, device: torch.device,
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


def _pretrain(cfg: Config, rd: ModelInputs, encoding, device: torch.device, folder: Path, resume: bool) -> list[dict]:
    """FLIP pretraining into ``folder`` (resumed from its last epoch with ``resume``; a finished one
    is read back): the weights, and the encoding the backbone's ids follow (figures read it)."""
    model, split, pretrainer = pretraining_setup(cfg, rd, encoding, device, folder)
    log.info("pretraining on %d train+valid rows (%s) for %d epochs", len(split),
             cfg.pretrain.rows_from if cfg.pretrain.rows else "all", cfg.pretrain.epochs)
    history = pretrainer.fit(model, split, resume=resume)
    if is_main():
        encoding.feature_map.save(RunFolder(folder).feature_map)
    barrier()  # rank 0 has written the weights
    return history


def pretrain_once(cfg: Config, folder: Path, data_root: Path | None = None) -> None:
    """FLIP pretraining alone into ``folder``, or read back where it finished there: the one
    pretraining that a search's finetuning trials share (``flipctr tune --method flip``)."""
    cfg = dataclasses.replace(cfg, data=resolve_data_config(cfg.data))
    device = resolve_device(cfg.train.device)
    data = prepare(cfg.data, data_root)
    _pretrain(cfg, ModelInputs(data, cfg, device, text=True), data.encoding(ENCODING), device, folder, resume=True)


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
    pretrained = load_weights(RunFolder(pretrain_dir).pretrained)
    train, rows = text_finetune_settings(cfg)
    variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="flip"), train=train)
    return train_run(variant, run_dir, data_root, model_factory=lambda fm: joint_model(cfg, fm, pretrained),
                     encoding=ENCODING, resume=resume, **rows, **options)


def install_pretraining(source: Path, folder: Path) -> list[dict]:
    """A pretraining made elsewhere, into ``folder`` as :func:`_pretrain` leaves one: ``source``
    holds its weights (``pretrained.safetensors``, or the shards :func:`export_pretraining`
    wrote, in any dtype: installed as fp32) and ``pretrain_history.json``. Returns the history."""
    source, target = RunFolder(source), RunFolder(folder)
    state = load_weights(source.pretrained) if source.pretrained.exists() else load_shards(source.path, PRETRAINED)
    if source.pretrain_history.exists():
        history = json.loads(source.pretrain_history.read_text())
    else:  # the shards carry it in their first file's header
        history = json.loads(shards_metadata(source.path, PRETRAINED)["pretrain_history"])
    if is_main():
        target.create()
        with atomic_path(target.pretrained) as tmp:
            save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp))
        write_json(target.pretrain_history, history)
    barrier()
    return history


def export_pretraining(folder: Path, out: Path, max_bytes: int, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """A finished pretraining's weights as shards of at most ``max_bytes`` in ``dtype``, its
    history in the first one's header, into ``out`` (what :func:`install_pretraining` reads)."""
    folder = RunFolder(folder)
    return save_shards(load_weights(folder.pretrained), out, PRETRAINED, max_bytes, dtype,
                       metadata={"pretrain_history": folder.pretrain_history.read_text()})


def run_flip(cfg: Config, run_dir: str | Path, variants: tuple[str, ...] = VARIANTS, resume: bool = False,
             data_root: Path | None = None, profile: str | None = None, method: str = "flip",
             pretrain_only: bool = False, pretrained_from: Path | None = None) -> dict | None:
    """``method``: see :data:`METHODS`; "ctrl" (instance-level contrastive alignment alone, then
    the ID model finetuned alone, reported as CTRL) and "ptab" (token-level MLM of the prompts,
    then the language model finetuned, reported as PTab) are baselines run through the same loop.
    ``pretrain_only``: stop after the pretraining (the results list no model); ``pretrained_from``:
    a pretraining made elsewhere (:func:`install_pretraining`) instead of pretraining here.
    Returns the report of ``results.json`` (None on ranks other than 0)."""
    recipe = _checked_recipe(cfg, variants, method)
    run = FlipRun(dataclasses.replace(pinned(cfg), data=resolve_data_config(cfg.data)), RunFolder(run_dir),
                  variants, recipe, method, profile, data_root)
    run.write_results()  # the run's settings and budgets, before anything is trained
    run.pretrain(resume, pretrain_only, pretrained_from)
    if not pretrain_only:
        for variant in variants:
            run.finetune(variant, resume)
            run.write_results()
    report = run.write_results()
    if not is_main():
        return None
    if not pretrain_only:
        log.info("\n%s", render_results(report))
    return report


def _checked_recipe(cfg: Config, variants: tuple[str, ...], method: str) -> Method:
    """The method's recipe, after checking that ``cfg`` and ``variants`` are what it runs."""
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
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if cfg.pretrain.rows_from not in ("last", "random"):
        raise ValueError(f"pretrain.rows_from must be 'last' or 'random', not {cfg.pretrain.rows_from!r}")
    if cfg.text_finetune.joint_init not in ("pretrained", "finetuned"):
        raise ValueError(f"text_finetune.joint_init must be 'pretrained' or 'finetuned', "
                         f"not {cfg.text_finetune.joint_init!r}")
    if (cfg.text_finetune.joint_init == "finetuned" and "flip" in variants
            and not {"flip_id", "flip_plm"} <= set(variants)):
        raise ValueError("text_finetune.joint_init=finetuned needs the flip_id and flip_plm variants")
    return recipe


class FlipRun:
    """One ``flipctr run``: the data and encoding all its stages share, the pretraining, the
    finetuned models' results so far. Under torchrun every stage is data-parallel (each rank a
    shard of every batch); rank 0 alone writes."""

    def __init__(self, cfg: Config, folder: RunFolder, variants: tuple[str, ...], recipe: Method, method: str,
                 profile: str | None, data_root: Path | None):
        self.cfg, self.folder, self.variants, self.recipe, self.method = cfg, folder, variants, recipe, method
        self.profile, self.data_root = profile, data_root
        folder.create()
        if is_main():
            setup_logging(folder.log)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        start_run(cfg, folder, Runtime.of(cfg.train, self.device), profile=profile)
        if not is_main():
            barrier()  # rank 0 builds the caches first
        self.data = prepare(cfg.data, data_root)
        self.encoding = self.data.encoding(ENCODING)
        texts = set(variants) & {"flip_id", "flip_plm", "flip"}
        self.text_inputs = ModelInputs(self.data, cfg, self.device, text=True) if texts else None
        if is_main():
            barrier()
        self.pretrained: dict[str, torch.Tensor] | None = None
        self.pretrain_seconds = 0.0
        self.results: dict[str, dict] = {}

    def write_results(self) -> dict:
        """``results.{json,md}`` of the models finished so far (written before pretraining, then
        after each model: a run killed on a lent machine still leaves its table); ``complete``
        once all are in."""
        cfg, results, recipe = self.cfg, self.results, self.recipe
        report = {
            "dataset": self.data.name, "profile": self.profile, "backbone": cfg.model.backbone, "plm": cfg.model.plm,
            "pretrained": self.pretrained is not None, "pretrain_seconds": round(self.pretrain_seconds, 1),
            "flip": dataclasses.asdict(cfg.flip),
            # truncation of the prompts at data.max_length
            "prompts": self.text_inputs.text.report if self.text_inputs else None,
            # the stages' own times, those an earlier call ran included (a resumed run reads them back);
            # a FLIP_ID that is the scratch run (no pretraining, "note") is not counted twice
            "wall_seconds": round(self.pretrain_seconds + sum(r["wall_seconds"] for r in results.values()
                                                              if "note" not in r), 1),
            "complete": set(results) == set(self.variants), "variants": list(self.variants),
            "refit": {"id": cfg.train.refit, "text": cfg.text_finetune.refit},
            "max_seconds": {"pretrain": cfg.pretrain.max_seconds, "train": cfg.train.max_seconds,
                            "text_finetune": cfg.text_finetune.max_seconds},
            "results": results,
            "method": self.method, "title": recipe.title,
            "names": {v: recipe.reported[v][0] for v in results if v in recipe.reported},
            "paper": {v: table2(self.data.name,
                                cfg.model.backbone if v == "scratch" else recipe.reported.get(v, (v, v))[1])
                      for v in results},
        }
        if is_main():
            self.folder.write_results(report, render_results(report))
        return report

    def pretrain(self, resume: bool, pretrain_only: bool, pretrained_from: Path | None) -> None:
        """The pretraining the finetuned models start from: installed from ``pretrained_from``,
        or run here (resumed with ``resume``) when its objectives are on and a model needs it."""
        cfg, folder = self.cfg, self.folder.pretrain
        if pretrained_from is not None:
            history = install_pretraining(pretrained_from, folder.path)
            if is_main():
                self.encoding.feature_map.save(folder.feature_map)
        elif (cfg.pretrain.epochs > 0 and (cfg.flip.mlm or cfg.flip.mtm or cfg.flip.icl)
              and (pretrain_only or set(self.variants) & {"flip_id", "flip_plm", "flip"})):
            history = _pretrain(cfg, self.text_inputs, self.encoding, self.device, folder.path, resume)
        else:
            return
        self.pretrained = load_weights(folder.pretrained)
        # its epochs' time, those of an earlier call included (a resumed or finished pretraining)
        self.pretrain_seconds = sum(record["seconds"] for record in history)

    def finetune(self, variant: str, resume: bool) -> None:
        """One finetuned model into its folder (read back where an earlier call finished it)."""
        done = self.folder.variant(variant)
        if resume and done.finished:
            log.info("%s: finished earlier, read from %s", variant, done.metrics)
            self.results[variant] = {k: v for k, v in done.read_metrics().items() if k != "history"}
        elif variant == "flip_id" and self.pretrained is None and "scratch" in self.results:
            # without pretraining FLIP_ID is the backbone from scratch: the same run, not a second one
            if is_main():
                shutil.copytree(self.folder.variant("scratch").path, done.path, dirs_exist_ok=True)
            self.results[variant] = {**self.results["scratch"], "note": "no pretraining: the scratch run"}
        else:
            variant_cfg, factory, options = self.plan(variant)
            metrics = train_run(variant_cfg, done.path, self.data_root, **{"model_factory": factory, **options},
                                encoding=ENCODING, resume=resume)
            if is_main():
                setup_logging(self.folder.log)  # train_run pointed the log at the variant's folder
            self.results[variant] = {k: v for k, v in metrics.items() if k != "history"}

    def plan(self, variant: str) -> tuple[Config, Callable[[FeatureMap], CTRModule], dict]:
        """How ``variant`` is finetuned: its configuration, its model factory, train_run's options."""
        cfg, pretrained = self.cfg, self.pretrained
        backbone_cfg = dataclasses.replace(cfg.model, name=cfg.model.backbone)
        if variant in ("scratch", "flip_id"):
            def backbone(fm: FeatureMap) -> CTRModule:
                model = build_ctr_model(backbone_cfg, fm)
                if variant == "flip_id" and pretrained is not None:
                    model.load_state_dict(_prefixed(pretrained, "backbone."))
                return model

            return dataclasses.replace(cfg, model=backbone_cfg), backbone, {}
        text_train, rows = text_finetune_settings(cfg)
        if variant == "flip_plm":
            plm_cfg = dataclasses.replace(cfg.model, name="plm")
            state = _prefixed(pretrained, "language_model.") if pretrained else None
            return (dataclasses.replace(cfg, model=plm_cfg, train=text_train),
                    lambda fm: build_ctr_model(plm_cfg, fm, text_state=state), rows)
        joint = {}
        if cfg.text_finetune.joint_init == "finetuned":
            joint = {"model_factory": lambda fm: self.finetuned_joint_model(fm, "selected"),
                     "refit_factory": lambda fm: self.finetuned_joint_model(fm, "final")}
        flip_cfg = dataclasses.replace(cfg.model, name="flip")
        return (dataclasses.replace(cfg, model=flip_cfg, train=text_train),
                lambda fm: joint_model(cfg, fm, pretrained), {**rows, **joint})

    def finetuned_joint_model(self, fm: FeatureMap, stage: str) -> FlipCTRModel:
        """The joint model from ``stage`` ("selected"/"final") of the finetuned FLIP_ID and FLIP_PLM."""
        model = joint_model(self.cfg, fm, None)
        model.backbone.load_state_dict(finetuned_weights(self.folder.variant("flip_id").path, stage))
        plm = finetuned_weights(self.folder.variant("flip_plm").path, stage)
        model.plm_head.load_state_dict(_prefixed(plm, "head."))
        if model.language_model is not None:
            model.language_model.load_state_dict(_prefixed(plm, "language_model."))
        return model
