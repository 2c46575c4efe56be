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

import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import Config
from ..data.cache import PreparedData, prepare
from ..data.encoder import FeatureMap
from ..models.backbones import build_model
from ..utils import atomic_path, environment_info, seed_everything, write_json, write_text
from .trainer import Split, Trainer, autocast_dtype, resolve_device

log = logging.getLogger("flipctr")
PROTOCOLS = ("clean", "paper")


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _split(data: PreparedData, name: str, fit: str, device: torch.device) -> Split:
    ids, labels = data.split(name, fit)
    return Split.from_arrays(labels, device, ids=ids)


def _new_model(cfg: Config, fmap: FeatureMap, seed_offset: int = 0) -> torch.nn.Module:
    seed_everything(cfg.train.seed + seed_offset)
    return build_model(cfg.model, fmap)


def train_run(cfg: Config, run_dir: str | Path, data_root: Path | None = None) -> dict:
    """Train one model under ``cfg.train.protocol`` and write the run folder.

    ``metrics.json``: ``{"protocol", "selected_on", "valid": {auc, logloss}, "test": {auc, logloss},
    "test_before_refit", "train_samples_per_second", "epochs", "best_epoch", "history", ...}``.
    """
    if cfg.train.protocol not in PROTOCOLS:
        raise ValueError(f"train.protocol must be one of {PROTOCOLS}, not {cfg.train.protocol!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json(run_dir / "environment.json", {**environment_info(str(device)), "seed": cfg.train.seed,
                                              "amp": str(autocast_dtype(cfg.train.amp, device))})
    started = time.perf_counter()

    data = prepare(cfg.data, data_root)
    log.info("%s: %d train / %d valid / %d test samples, %d fields; model %s on %s, protocol %s",
             data.name, data.sizes.train, data.sizes.valid, data.sizes.test, len(data.fields),
             cfg.model.name, device, cfg.train.protocol)
    trainer = Trainer(cfg.train, device)
    metrics: dict = {"protocol": cfg.train.protocol, "dataset": data.name, "model": cfg.model.name}

    if cfg.train.protocol == "paper":
        # Paper protocol: train on the whole 90 %, early-stop on TEST (as the official code did).
        fmap = data.encoding("train+valid").feature_map
        model = _new_model(cfg, fmap)
        test = _split(data, "test", "train+valid", device)
        fit = trainer.fit(model, _split(data, "train+valid", "train+valid", device), eval_split=test)
        metrics.update(selected_on="test", note="selected on test (paper protocol; not a clean estimate)",
                       valid=None, test=trainer.evaluate(model, test),
                       test_before_refit=None)
        final_fit = fit
    else:
        fmap = data.encoding("train").feature_map
        model = _new_model(cfg, fmap)
        valid = _split(data, "valid", "train", device)
        fit = trainer.fit(model, _split(data, "train", "train", device), eval_split=valid)
        test_select = trainer.evaluate(model, _split(data, "test", "train", device))
        metrics.update(selected_on="valid", valid=fit.best_eval, test_before_refit=test_select)
        final_fit = fit
        if cfg.train.refit:
            save_weights(model, run_dir / "model-selected.safetensors")
            log.info("refit on train+valid for %g epochs", fit.best_epoch)
            fmap = data.encoding("train+valid").feature_map
            model = _new_model(cfg, fmap)
            final_fit = trainer.fit(model, _split(data, "train+valid", "train+valid", device),
                                    epochs=fit.best_epoch, lr_schedule=fit.lr_per_epoch)
            metrics["test"] = trainer.evaluate(model, _split(data, "test", "train+valid", device))
        else:
            metrics["test"] = test_select
    fmap.save(run_dir / "feature_map.json")
    save_weights(model, run_dir / "model.safetensors")
    metrics.update(
        encoding="train+valid" if (cfg.train.protocol == "paper" or cfg.train.refit) else "train",
        train_samples_per_second=round(fit.samples_per_second, 1),
        epochs=len(fit.history), best_epoch=fit.best_epoch,
        refit_epochs=fit.best_epoch if final_fit is not fit else 0,
        wall_seconds=round(time.perf_counter() - started, 1),
        history=[vars(r) for r in fit.history],
    )
    write_json(run_dir / "metrics.json", metrics)
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
    device = resolve_device(cfg.train.device)
    data = prepare(cfg.data, data_root)
    fmap = FeatureMap.load(run_dir / "feature_map.json")
    model = build_model(cfg.model, fmap)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.to(device)
    trainer = Trainer(cfg.train, device)
    encoding = saved.get("encoding", "train")
    out = {"run_dir": str(run_dir), "protocol": saved["protocol"], "selected_on": saved["selected_on"],
           "test": trainer.evaluate(model, _split(data, "test", encoding, device))}
    if encoding == "train":
        out["valid"] = trainer.evaluate(model, _split(data, "valid", "train", device))
    return out
