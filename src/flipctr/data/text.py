"""Tokenized prompts with the token span of every field's value, cached beside the encoded table.

Spans come from the tokenizer's character offsets and the value character spans recorded by
:class:`~flipctr.data.prompts.PromptBuilder`, never from re-parsing text. A field whose value
is cut (fully or partly) by truncation gets the empty span ``(0, 0)``: it gives no target and
is counted in the truncation report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..utils import atomic_dir
from .lm_files import load_tokenizer
from .prompts import PromptBuilder, Prompts, prompt_length

if TYPE_CHECKING:
    from .cache import PreparedData

log = logging.getLogger("flipctr")

TEXT_CACHE_VERSION = 1


@dataclass
class TokenizedPrompts:
    input_ids: np.ndarray  # (N, L) int32, right-padded with the tokenizer's pad id
    lengths: np.ndarray  # (N,) int32 number of real tokens ([CLS] and [SEP] included)
    value_spans: np.ndarray  # (N, F, 2) int32 [start, end) token span of each value; (0, 0) if cut
    report: dict  # truncation and length statistics
    folder: Path | None = None  # the cache folder (derived caches, e.g. sentence vectors, live beside it)

    def __len__(self) -> int:
        return len(self.lengths)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's definition (vocabulary, normalizer, special tokens), without
    the truncation/padding state that each call changes."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def value_token_spans(offsets: np.ndarray, valid: np.ndarray, value_chars: np.ndarray) -> np.ndarray:
    """Token span of each value from character offsets.

    offsets (B, L, 2), valid (B, L) real non-special tokens, value_chars (B, F, 2) -> (B, F, 2).
    A token belongs to a value when its characters overlap the value's characters. A value
    whose last character is not covered by any token was cut by truncation: span (0, 0).
    """
    starts, ends = offsets[:, None, :, 0], offsets[:, None, :, 1]  # (B, 1, L)
    cs, ce = value_chars[:, :, 0:1], value_chars[:, :, 1:2]  # (B, F, 1)
    inside = valid[:, None, :] & (starts < ce) & (ends > cs)  # (B, F, L)
    length = inside.shape[-1]
    first = np.where(inside.any(-1), inside.argmax(-1), 0)
    last = np.where(inside.any(-1), length - 1 - inside[..., ::-1].argmax(-1), -1)
    covered_to = np.where(valid, offsets[..., 1], 0).max(-1)  # (B,) last character kept
    complete = inside.any(-1) & (covered_to[:, None] >= value_chars[:, :, 1])
    spans = np.stack([first, last + 1], -1).astype(np.int32)
    spans[~complete] = 0
    return spans


def tokenize_prompts(prompts: Prompts, tokenizer, max_length: int, batch_size: int = 4096) -> TokenizedPrompts:
    """Tokenize with truncation at ``max_length`` and record value spans and truncation."""
    n = len(prompts.texts)
    chunks_ids, chunk_spans, lengths = [], [], np.zeros(n, dtype=np.int32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, n, batch_size):
        texts = prompts.texts[start:start + batch_size]
        enc = tokenizer(texts, max_length=max_length, truncation=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True, padding="longest", return_tensors="np")
        ids, offsets = enc["input_ids"].astype(np.int32), enc["offset_mapping"].astype(np.int64)
        real = enc["attention_mask"].astype(bool)
        valid = real & ~enc["special_tokens_mask"].astype(bool) & (offsets[..., 1] > offsets[..., 0])
        lengths[start:start + len(texts)] = real.sum(1)
        chunk_spans.append(value_token_spans(offsets, valid, prompts.value_chars[start:start + len(texts)]))
        chunks_ids.append(ids)
    width = max(c.shape[1] for c in chunks_ids)
    input_ids = np.full((n, width), pad, dtype=np.int32)
    row = 0
    for c in chunks_ids:
        input_ids[row:row + len(c), :c.shape[1]] = c
        row += len(c)
    spans = np.concatenate(chunk_spans)
    lost = (spans[..., 1] == 0).sum(1)
    report = {
        "samples": n, "max_length": max_length,
        "tokens_mean": float(lengths.mean()), "tokens_p95": float(np.percentile(lengths, 95)),
        "tokens_max": int(lengths.max()),
        "samples_truncated": int((lost > 0).sum()),
        "fields_lost": int(lost.sum()),
        "samples_by_fields_lost": {int(k): int(v) for k, v in zip(*np.unique(lost, return_counts=True))},
        "fields_lost_by_field": dict(zip(prompts.fields, map(int, (spans[..., 1] == 0).sum(0)), strict=True)),
    }
    return TokenizedPrompts(input_ids, lengths, spans, report)


def text_cache_dir(data_folder: Path, tokenizer, max_length: int, builder: PromptBuilder) -> Path:
    spec = {"version": TEXT_CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length, "template": [builder.prefix, builder.suffix, builder.separator],
            "fields": builder.fields}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return data_folder / f"text-{key}"


def load_or_build_text(data_folder: Path, values: pd.DataFrame | None, fields: list[str], tokenizer,
                       max_length: int, values_loader=None) -> TokenizedPrompts:
    """Tokenized prompts of all rows of a prepared dataset, from its cache or built once.

    ``values`` (or ``values_loader()``, called only when building) gives the text table.
    """
    builder = PromptBuilder(fields)
    folder = text_cache_dir(data_folder, tokenizer, max_length, builder)
    if not (folder / "report.json").exists():
        table = values if values is not None else values_loader()
        tok = tokenize_prompts(builder.build(table), tokenizer, max_length)
        with atomic_dir(folder) as tmp:
            np.save(tmp / "input_ids.npy", tok.input_ids)
            np.save(tmp / "lengths.npy", tok.lengths)
            np.save(tmp / "value_spans.npy", tok.value_spans)
            (tmp / "report.json").write_text(json.dumps(tok.report, indent=2) + "\n")
    return TokenizedPrompts(np.load(folder / "input_ids.npy", mmap_mode="r"),
                            np.load(folder / "lengths.npy", mmap_mode="r"),
                            np.load(folder / "value_spans.npy", mmap_mode="r"),
                            json.loads((folder / "report.json").read_text()), folder)


def prompts_for(data: "PreparedData", cfg: DataConfig, plm: str) -> TokenizedPrompts:
    """A prepared dataset's tokenized prompts for the language model ``plm`` (its tokenizer), cut
    at :func:`~.prompts.prompt_length`; cached beside the encoded table, the truncation logged."""
    max_length = prompt_length(cfg, data.name)
    text = load_or_build_text(data.folder, None, data.fields, load_tokenizer(plm), max_length,
                              values_loader=data.values)
    report = text.report
    log.info("prompts: %.1f tokens on average (p95 %.0f, max %d); %d samples lost %d fields to "
             "truncation at %d tokens", report["tokens_mean"], report["tokens_p95"], report["tokens_max"],
             report["samples_truncated"], report["fields_lost"], max_length)
    return text
