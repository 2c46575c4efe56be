"""One model's protocol, prepared data -> run folder: select on validation and refit on
train+valid (``clean``), or select on test as the paper's code did (``paper``). The folder's
layout is :class:`~flipctr.runtime.folder.RunFolder`'s; ``metrics.json`` is :func:`train_run`'s."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config
from ..data.cache import prepare, resolve_data_config
from ..data.encoder import FeatureMap
from ..models import CTRModule, build_ctr_model
from ..models.language import LanguageModel
from ..runtime.checkpoints import load_weights, save_weights, seed_everything
from ..runtime.device import Runtime
from ..runtime.distributed import barrier, is_main, rank_world
from ..runtime.environment import environment_info, pin_deterministic
from ..runtime.folder import RunFolder
from ..training.optim import lr_scales, resolve_train_config
from ..training.tracking import Tracker, setup_logging
from ..training.trainer import EpochRecord, FitResult, Trainer
from .inference import write_inference_files
from .inputs import ModelInputs, model_sides, side_texts

log = logging.getLogger("flipctr")
PROTOCOLS = ("clean", "paper")
ModelFactory = Callable[[FeatureMap], CTRModule]


def pinned(cfg: Config) -> Config:
    """``train.deterministic``: the process's kernels pinned (:mod:`flipctr.runtime.environment`) and
    every stage in fp32; else ``cfg`` as it is."""
    if not cfg.train.deterministic:
        return cfg
    pin_deterministic()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="off"),
                               pretrain=dataclasses.replace(cfg.pretrain, amp="off"))


def fast_paths(cfg: Config, device: torch.device) -> dict[str, str]:
    """The fast paths a run on ``device`` takes, for its ``environment.json``."""
    return {"plm_attention_mask": LanguageModel.mask_kind(cfg.model.plm_attention_mask, device)}


def start_run(cfg: Config, folder: RunFolder, runtime: Runtime, **facts: Any) -> None:
    """What every run writes first (rank 0): ``config.yaml`` and ``environment.json`` (versions,
    device, precision, seed, fast paths, world size and ``facts``)."""
    if not is_main():
        return
    folder.write_config(cfg)
    folder.write_environment({**environment_info(str(runtime.device), runtime.amp_dtype), "seed": cfg.train.seed,
                              "fast_paths": fast_paths(cfg, runtime.device), "amp": runtime.amp_name,
                              "world_size": rank_world()[1], **facts})


def train_run(cfg: Config, run_dir: str | Path, data_root: Path | None = None,
              model_factory: ModelFactory | None = None, encoding: str | None = None,
              train_rows: int | None = None, valid_rows: int | None = None,
              refit_factory: ModelFactory | None = None, resume: bool = False,
              on_epoch_end: Callable[[EpochRecord], None] | None = None, select_only: bool = False) -> dict:
    """Train one model under ``cfg.train.protocol`` and write the run folder.

    ``metrics.json``: ``{"protocol", "selected_on", "valid": {auc, logloss}, "test": {auc, logloss},
    "test_before_refit", "train_samples_per_second", "epochs", "best_epoch", "history", ...}``.

    ``model_factory(feature_map)`` builds the model (default: by ``cfg.model``; FLIP passes
    one that loads pretrained weights); ``encoding`` fixes the encoding for every stage
    (default: ``train`` for selection, ``train+valid`` for refit and the paper protocol);
    ``train_rows``/``valid_rows`` keep only the most recent rows of those splits (test is whole;
    the refit then trains on the most recent ``train_rows`` rows of train+valid);
    ``refit_factory`` builds the refit stage's model (default: ``model_factory``). Each training
    stage checkpoints after every epoch (removed when the run is complete); with ``resume`` a
    killed run goes on from its last epoch and ends with the metrics of an uninterrupted one, and
    a finished run is read back. ``on_epoch_end`` sees each selection epoch's record (its
    validation evaluations; a search prunes a trial by raising from it); ``select_only`` (clean
    protocol) ends after the selection stage: validation metrics only, no test evaluation, no
    refit, no weights kept.
    """
    if select_only and cfg.train.protocol != "clean":
        raise ValueError("select_only is the clean protocol's selection stage: train.protocol=clean")
    if cfg.train.protocol not in PROTOCOLS:
        raise ValueError(f"train.protocol must be one of {PROTOCOLS}, not {cfg.train.protocol!r}")
    cfg = dataclasses.replace(pinned(cfg), data=resolve_data_config(cfg.data))
    folder = RunFolder(run_dir)
    if resume and folder.finished:
        log.info("%s: finished earlier, read back", folder.path)
        return folder.read_metrics()
    run = ProtocolRun(cfg, folder, data_root, model_factory, refit_factory, encoding)
    if cfg.train.protocol == "paper":
        run.select_on_test(train_rows, resume)
    else:
        run.select_on_valid(train_rows, valid_rows, resume, on_epoch_end, select_only)
    return run.finish(select_only)


class ProtocolRun:
    """One :func:`train_run`: its data, runtime, models, stages and metrics. Under torchrun every
    rank trains its shard of each batch (:class:`~flipctr.training.trainer.Trainer`); rank 0
    alone writes."""

    def __init__(self, cfg: Config, folder: RunFolder, data_root: Path | None, model_factory: ModelFactory | None,
                 refit_factory: ModelFactory | None, encoding: str | None):
        self.folder, self.started = folder, time.perf_counter()
        if is_main():
            folder.create()
            setup_logging(folder.log)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.runtime = Runtime.of(cfg.train)
        if not is_main():
            barrier()  # rank 0 builds the caches first
        self.data = data = prepare(cfg.data, data_root)
        if is_main():
            barrier()
        # the paper protocol trains on the whole 90 %, so its encoding is fitted there
        self.select_fit = encoding or ("train+valid" if cfg.train.protocol == "paper" else "train")
        self.refit_fit = encoding or "train+valid"
        sides, side_index = side_texts(data, cfg, self.runtime)
        self.factory = model_factory or (lambda fm: build_ctr_model(cfg.model, fm, sides=sides, scales=lr_scales(cfg)))
        self.refit_factory = refit_factory or self.factory
        self.cfg = cfg
        self.model = self.new_model(data.encoding(self.select_fit).feature_map)
        self.cfg = cfg = dataclasses.replace(cfg, train=resolve_train_config(cfg.train, self.model))
        start_run(cfg, folder, self.runtime)
        log.info("%s: %d train / %d valid / %d test samples, %d fields; model %s on %s, protocol %s",
                 data.name, data.sizes.train, data.sizes.valid, data.sizes.test, len(data.fields),
                 cfg.model.name, self.runtime.device, cfg.train.protocol)
        self.inputs = ModelInputs.for_model(data, cfg, self.runtime, self.model)
        self.inputs.side_index = side_index
        self.trainer = Trainer(cfg.train, self.runtime)
        self.tracker = Tracker(folder.tensorboard)
        self.metrics: dict[str, Any] = {"protocol": cfg.train.protocol, "dataset": data.name, "model": cfg.model.name}
        self.fit = self.final_fit = FitResult()
        self.refitted = False

    def new_model(self, fm: FeatureMap, refit: bool = False) -> CTRModule:
        seed_everything(self.cfg.train.seed)
        return (self.refit_factory if refit else self.factory)(fm)

    def select_on_test(self, train_rows: int | None, resume: bool) -> None:
        """The paper protocol: early-stop on TEST, as the official code did."""
        test = self.inputs.split("test", self.select_fit)
        self.fit = self.final_fit = self.trainer.fit(
            self.model, self.inputs.split("train+valid", self.select_fit, train_rows), eval_split=test,
            tracker=self.tracker, checkpoint=self.folder.checkpoint("train"), resume=resume)
        self.metrics.update(selected_on="test", note="selected on test (paper protocol; not a clean estimate)",
                            valid=None, test=self.trainer.evaluate(self.model, test), test_before_refit=None)

    def select_on_valid(self, train_rows: int | None, valid_rows: int | None, resume: bool,
                        on_epoch_end: Callable[[EpochRecord], None] | None, select_only: bool) -> None:
        """The clean protocol: select the epoch count on validation, then (``train.refit``) retrain
        on train+valid for as many epochs at the same per-epoch lr and test once."""
        inputs, trainer = self.inputs, self.trainer
        valid = inputs.split("valid", self.select_fit, valid_rows)
        self.fit = self.final_fit = trainer.fit(
            self.model, inputs.split("train", self.select_fit, train_rows), eval_split=valid, tracker=self.tracker,
            checkpoint=self.folder.checkpoint("train"), resume=resume, on_epoch_end=on_epoch_end)
        test_select = None if select_only else trainer.evaluate(self.model, inputs.split("test", self.select_fit))
        self.metrics.update(selected_on="valid", valid=self.fit.best_eval, test_before_refit=test_select)
        if select_only or not self.cfg.train.refit:
            self.metrics["test"] = test_select
            return
        if is_main():
            save_weights(self.model, self.folder.selected_model)
        log.info("refit on train+valid for %g epochs", self.fit.best_epoch)
        self.model = self.new_model(self.data.encoding(self.refit_fit).feature_map, refit=True)
        # a training subset refits on as many rows, the most recent of train+valid: the selected
        # number of epochs was chosen for that much data
        self.final_fit = trainer.fit(self.model, inputs.split("train+valid", self.refit_fit, train_rows),
                                     epochs=self.fit.best_epoch, lr_schedule=self.fit.lr_per_epoch, tracker=self.tracker,
                                     stage="refit", checkpoint=self.folder.checkpoint("refit"), resume=resume)
        self.refitted = True
        self.metrics["test"] = trainer.evaluate(self.model, inputs.split("test", self.refit_fit))

    def finish(self, select_only: bool) -> dict:
        """The metrics, the weights and what scoring needs into the run folder; checkpoints gone."""
        cfg, fit, final_fit, metrics = self.cfg, self.fit, self.final_fit, self.metrics
        metrics.update(self.model.summary())
        metrics.update(
            encoding=self.refit_fit if (cfg.train.protocol == "paper" or self.refitted) else self.select_fit,
            train_samples_per_second=round(fit.samples_per_second, 1),
            epochs=len(fit.history), best_epoch=fit.best_epoch,
            refit_epochs=fit.best_epoch if final_fit is not fit else 0,
            # why training ended: "patience", "budget" (train.max_seconds), None (all epochs ran)
            stopped=fit.stopped, refit_stopped=final_fit.stopped if final_fit is not fit else None,
            max_seconds=cfg.train.max_seconds, fit_seconds=round(fit.seconds, 1),
            wall_seconds=round(time.perf_counter() - self.started, 1),
            history=[vars(r) for r in fit.history],
        )
        self.tracker.close()
        if is_main():
            if not select_only:
                write_inference_files(self.folder, cfg, self.data, metrics["encoding"], self.runtime,
                                      self.inputs.max_length, model_sides(cfg.model.name, self.data.name))
                save_weights(self.model, self.folder.model)
            self.folder.write_metrics(metrics)
            self.folder.remove_checkpoints()
        barrier()  # the run folder is complete before any rank goes on (a next stage may read it)
        if select_only:
            log.info("valid AUC %.4f  Logloss %.4f  (selection only: no test)", metrics["valid"]["auc"],
                     metrics["valid"]["logloss"])
        else:
            log.info("test AUC %.4f  Logloss %.4f  (%s protocol, selected on %s)", metrics["test"]["auc"],
                     metrics["test"]["logloss"], metrics["protocol"], metrics["selected_on"])
        return metrics


def evaluate_run(run_dir: str | Path, data_root: Path | None = None) -> dict:
    """Re-evaluate a run folder's final model on its test split (and valid, when its encoding allows)."""
    folder = RunFolder(run_dir)
    if not folder.model.exists():
        raise FileNotFoundError(f"{folder.path}: no model.safetensors (not a finished run folder)")
    cfg, saved = folder.read_config(), folder.read_metrics()
    runtime = Runtime.of(cfg.train)
    data = prepare(cfg.data, data_root)
    sides, side_index = side_texts(data, cfg, runtime)
    model = build_ctr_model(cfg.model, FeatureMap.load(folder.feature_map), sides=sides)
    model.load_state_dict(load_weights(folder.model))
    model.to(runtime.device)
    inputs = ModelInputs.for_model(data, cfg, runtime, model)
    inputs.side_index = side_index
    trainer = Trainer(cfg.train, runtime)
    encoding = saved.get("encoding", "train")
    out = {"run_dir": str(folder.path), "protocol": saved["protocol"], "selected_on": saved["selected_on"],
           "test": trainer.evaluate(model, inputs.split("test", encoding))}
    if encoding == "train":
        out["valid"] = trainer.evaluate(model, inputs.split("valid", "train"))
    return out
