"""A training run end to end: prepared data -> protocol (select, refit) -> run folder.

Run folder layout::

    config.yaml          resolved configuration
    environment.json     versions, device, seed
    train.log            the log
    feature_map.json     the encoding the saved model expects
    model.safetensors    final weights (after refit when refit is on)
    model-selected.safetensors   weights picked on the selection split (clean protocol)
    metrics.json         see :func:`train_run`
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from ..config import Config
from ..data.batching import DeviceRows
from ..data.cache import PreparedData, prepare, resolve_data_config
from ..data.datasets import prompt_length, side_fields
from ..data.encoder import FeatureMap
from .inference import write_inference_files
from ..models import TEXT_SIDES, build_ctr_model
from ..models.language import LanguageModel
from ..runtime.checkpoints import load_weights, save_weights, seed_everything
from ..runtime.device import Runtime
from ..runtime.distributed import barrier, is_main, rank_world
from ..runtime.environment import environment_info, pin_deterministic
from ..utils import write_json, write_text
from ..training.optim import lr_scales, resolve_train_config
from ..training.tracking import Tracker, setup_logging
from ..training.trainer import EpochRecord, Trainer

log = logging.getLogger("flipctr")
PROTOCOLS = ("clean", "paper")


def side_texts(data: PreparedData, cfg: Config, runtime: Runtime
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """:func:`~.text_vectors.side_tables` of ``cfg.model`` on the prepared data (a frozen
    ``cfg.model.plm``'s vectors cached beside it); both empty for models without text sides."""
    from ..data.lm_files import load_tokenizer
    from ..training.text_vectors import frozen_encoder, side_tables

    wanted = model_sides(cfg.model.name, data.name)
    if not wanted:
        return {}, {}
    frozen = frozen_encoder(cfg.model, runtime) if cfg.model.plm_trainable_layers == 0 else None
    return side_tables(data.values(), wanted, load_tokenizer(cfg.model.plm), prompt_length(cfg.data, data.name), frozen,
                       data.folder, cfg.train.eval_batch_size or 256)


def model_sides(model: str, dataset: str) -> dict[str, tuple[str, list[str]]]:
    """:func:`~flipctr.data.datasets.side_fields` of a text-side model (:data:`TEXT_SIDES`); empty
    for other models."""
    return side_fields(dataset, TEXT_SIDES.get(model, {}), model)


class RunData:
    """The arrays a model needs from a prepared dataset: ids, and tokenized prompts for
    language-model inputs (built once and cached beside the encoded table)."""

    def __init__(self, data: PreparedData, cfg: Config, device: torch.device, text: bool):
        self.data, self.device, self.text = data, device, None
        self.text_vectors: Callable[[int, int], np.ndarray] | None = None
        self.side_index: dict[str, np.ndarray] = {}  # MoRec, CTR-BERT: each row's user / item
        # the prompts' length as the model sees it (None: chosen from the data when its prompts are built)
        self.max_length = prompt_length(cfg.data, data.name)
        if text:
            from ..data.text import prompts_for

            self.text = prompts_for(data, cfg.data, cfg.model.plm)
            self.max_length = self.text.report["max_length"]

    @classmethod
    def for_model(cls, data: PreparedData, cfg: Config, runtime: Runtime, model: torch.nn.Module) -> "RunData":
        """The inputs ``model`` reads; ``text_cls``: the cached vectors of the frozen ``cfg.model.plm``."""
        names = model.input_names
        rd = cls(data, cfg, runtime.device, text="input_ids" in names or "text_cls" in names)
        if "text_cls" in names:
            from ..training.text_vectors import TextVectors, frozen_encoder

            rd.text_vectors = TextVectors(frozen_encoder(cfg.model, runtime), rd.text, runtime,
                                          cfg.train.eval_batch_size or 256)
        return rd

    def split(self, name: str, fit: str, last: int | None = None, spans: bool = False,
              sample: int | None = None, seed: int = 0) -> DeviceRows:
        """Split ``name`` under the encoding fitted on ``fit``; ``last``: only its most recent rows;
        ``sample``: a seeded uniform sample of that many of its rows (kept in time order). On the
        CPU, or where the split's arrays would take more than half of the device's free memory,
        they stay in the memory-mapped cache and each batch is gathered from it
        (:class:`~flipctr.data.batching.MappedArray`): the same batches, no copy of the split."""
        start, stop = self.data.sizes.bounds(name)
        if last is not None:
            start = max(start, stop - last)
        rows: slice | np.ndarray = slice(start, stop)
        if sample is not None and sample < stop - start:
            if self.text_vectors is not None:
                raise ValueError("text vectors are cached per row range: a random sample cannot use them")
            rows = np.sort(np.random.default_rng(seed).choice(np.arange(start, stop), sample, replace=False))
        labels = self.data.labels[rows]
        arrays = {"ids": self.data.encoding(fit).ids[rows]}
        if self.text is not None:
            arrays.update(input_ids=self.text.input_ids[rows], lengths=self.text.lengths[rows])
            if spans:
                arrays["value_spans"] = self.text.value_spans[rows]
        if self.text_vectors is not None:
            arrays["text_cls"] = self.text_vectors(start, stop)
        for side, index in self.side_index.items():
            arrays[f"{side}_index"] = index[rows]
        return DeviceRows.from_arrays(labels, self.device, mapped=self.mapped(arrays), **arrays)

    def mapped(self, arrays: dict[str, np.ndarray]) -> bool:
        """Whether a split's arrays stay on disk (see :meth:`split`)."""
        if self.device.type == "cpu":
            return True
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return sum(a.nbytes * (2 if a.dtype == np.uint16 else 1) for a in arrays.values()) > free / 2


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


def train_run(cfg: Config, run_dir: str | Path, data_root: Path | None = None,
              model_factory: Callable[[FeatureMap], torch.nn.Module] | None = None,
              encoding: str | None = None, train_rows: int | None = None,
              valid_rows: int | None = None,
              refit_factory: Callable[[FeatureMap], torch.nn.Module] | None = None, resume: bool = False,
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
    stage checkpoints after every epoch (``checkpoint-train.pt``, ``checkpoint-refit.pt``, removed
    when the run is complete); with ``resume`` a killed run goes on from its last epoch and ends
    with the metrics of an uninterrupted one, and a finished run is read back.
    ``on_epoch_end`` sees each selection epoch's record (its validation evaluations; a search
    prunes a trial by raising from it); ``select_only`` (clean protocol) ends after the selection
    stage: validation metrics only, no test evaluation, no refit, no weights kept.
    """
    if select_only and cfg.train.protocol != "clean":
        raise ValueError("select_only is the clean protocol's selection stage: train.protocol=clean")
    if cfg.train.protocol not in PROTOCOLS:
        raise ValueError(f"train.protocol must be one of {PROTOCOLS}, not {cfg.train.protocol!r}")
    # under torchrun every rank trains its shard of each batch (Trainer); rank 0 alone writes
    main = is_main()
    cfg = dataclasses.replace(pinned(cfg), data=resolve_data_config(cfg.data))
    run_dir = Path(run_dir)
    if resume and (run_dir / "metrics.json").exists():
        log.info("%s: finished earlier, read back", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime = Runtime.create(cfg.train.device, cfg.train.amp)
    device = runtime.device
    started = time.perf_counter()
    if not main:
        barrier()  # rank 0 builds the caches first
    data = prepare(cfg.data, data_root)
    if main:
        barrier()
    # the paper protocol trains on the whole 90 %, so its encoding is fitted there
    select_fit = encoding or ("train+valid" if cfg.train.protocol == "paper" else "train")
    refit_fit = encoding or "train+valid"
    sides, side_index = side_texts(data, cfg, runtime)
    factory = model_factory or (lambda fm: build_ctr_model(cfg.model, fm, sides=sides, scales=lr_scales(cfg)))

    def new_model(fm: FeatureMap, refit: bool = False) -> torch.nn.Module:
        seed_everything(cfg.train.seed)
        return (refit_factory or factory)(fm) if refit else factory(fm)

    fmap = data.encoding(select_fit).feature_map
    model = new_model(fmap)
    cfg = dataclasses.replace(cfg, train=resolve_train_config(cfg.train, model))
    if main:
        write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json(run_dir / "environment.json", {**environment_info(str(device), runtime.amp_dtype),
                                                  "seed": cfg.train.seed,
                                                  "fast_paths": fast_paths(cfg, device),
                                                  "amp": str(runtime.amp_dtype),
                                                  "world_size": rank_world()[1]})
    log.info("%s: %d train / %d valid / %d test samples, %d fields; model %s on %s, protocol %s",
             data.name, data.sizes.train, data.sizes.valid, data.sizes.test, len(data.fields),
             cfg.model.name, device, cfg.train.protocol)
    rd = RunData.for_model(data, cfg, runtime, model)
    rd.side_index = side_index
    trainer = Trainer(cfg.train, runtime)
    tracker = Tracker(run_dir / "tensorboard")
    metrics: dict = {"protocol": cfg.train.protocol, "dataset": data.name, "model": cfg.model.name}

    if cfg.train.protocol == "paper":
        # Paper protocol: early-stop on TEST, as the official code did.
        test = rd.split("test", select_fit)
        fit = trainer.fit(model, rd.split("train+valid", select_fit, train_rows), eval_split=test, tracker=tracker,
                          checkpoint=run_dir / "checkpoint-train.pt", resume=resume)
        metrics.update(selected_on="test", note="selected on test (paper protocol; not a clean estimate)",
                       valid=None, test=trainer.evaluate(model, test),
                       test_before_refit=None)
        final_fit = fit
    else:
        valid = rd.split("valid", select_fit, valid_rows)
        fit = trainer.fit(model, rd.split("train", select_fit, train_rows), eval_split=valid, tracker=tracker,
                          checkpoint=run_dir / "checkpoint-train.pt", resume=resume, on_epoch_end=on_epoch_end)
        test_select = None if select_only else trainer.evaluate(model, rd.split("test", select_fit))
        metrics.update(selected_on="valid", valid=fit.best_eval, test_before_refit=test_select)
        final_fit = fit
        if select_only:
            metrics["test"] = None
        elif cfg.train.refit:
            if main:
                save_weights(model, run_dir / "model-selected.safetensors")
            log.info("refit on train+valid for %g epochs", fit.best_epoch)
            fmap = data.encoding(refit_fit).feature_map
            model = new_model(fmap, refit=True)
            # a training subset refits on as many rows, the most recent of train+valid: the
            # selected number of epochs was chosen for that much data
            final_fit = trainer.fit(model, rd.split("train+valid", refit_fit, train_rows),
                                    epochs=fit.best_epoch, lr_schedule=fit.lr_per_epoch, tracker=tracker,
                                    stage="refit", checkpoint=run_dir / "checkpoint-refit.pt", resume=resume)
            metrics["test"] = trainer.evaluate(model, rd.split("test", refit_fit))
        else:
            metrics["test"] = test_select
    metrics.update(model.summary())
    metrics.update(
        encoding=refit_fit if (cfg.train.protocol == "paper" or (cfg.train.refit and not select_only)) else select_fit,
        train_samples_per_second=round(fit.samples_per_second, 1),
        epochs=len(fit.history), best_epoch=fit.best_epoch,
        refit_epochs=fit.best_epoch if final_fit is not fit else 0,
        # why training ended: "patience", "budget" (train.max_seconds), None (all epochs ran)
        stopped=fit.stopped, refit_stopped=final_fit.stopped if final_fit is not fit else None,
        max_seconds=cfg.train.max_seconds, fit_seconds=round(fit.seconds, 1),
        wall_seconds=round(time.perf_counter() - started, 1),
        history=[vars(r) for r in fit.history],
    )
    tracker.close()
    if main:
        if not select_only:
            write_inference_files(run_dir, cfg, data, metrics["encoding"], runtime, rd.max_length,
                                  model_sides(cfg.model.name, data.name))
            save_weights(model, run_dir / "model.safetensors")
        write_json(run_dir / "metrics.json", metrics)
        for stage in ("train", "refit"):  # the run is complete: its checkpoints are not needed
            (run_dir / f"checkpoint-{stage}.pt").unlink(missing_ok=True)
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
    run_dir = Path(run_dir)
    if not (run_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{run_dir}: no model.safetensors (not a finished run folder)")
    cfg = Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    saved = json.loads((run_dir / "metrics.json").read_text())
    runtime = Runtime.create(cfg.train.device, cfg.train.amp)
    data = prepare(cfg.data, data_root)
    sides, side_index = side_texts(data, cfg, runtime)
    model = build_ctr_model(cfg.model, FeatureMap.load(run_dir / "feature_map.json"), sides=sides)
    model.load_state_dict(load_weights(run_dir / "model.safetensors"))
    model.to(runtime.device)
    rd = RunData.for_model(data, cfg, runtime, model)
    rd.side_index = side_index
    trainer = Trainer(cfg.train, runtime)
    encoding = saved.get("encoding", "train")
    out = {"run_dir": str(run_dir), "protocol": saved["protocol"], "selected_on": saved["selected_on"],
           "test": trainer.evaluate(model, rd.split("test", encoding))}
    if encoding == "train":
        out["valid"] = trainer.evaluate(model, rd.split("valid", "train"))
    return out
