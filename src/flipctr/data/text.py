"""Tokenized prompts with the token span of every field's value, cached beside the encoded table.

Spans come from the tokenizer's character offsets and the value character spans recorded by
:class:`~flipctr.data.prompts.PromptBuilder`, never from re-parsing text. A field whose value
is cut (fully or partly) by truncation gets the empty span ``(0, 0)``: it gives no target and
is counted in the truncation report.

The cache of a whole dataset (:func:`build_text_cache`) is assembled from each distinct value's
tokens (:mod:`.pieces`) and written to disk in chunks: its cost grows with the distinct values,
not with rows times tokens, and no step holds every row's prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..utils import atomic_dir
from .datasets import prompt_length
from .errors import DataError, cache_file
from .lm_files import load_tokenizer
from .pieces import PieceTokenizer
from .prompts import PromptBuilder, Prompts
from .table import RowFile, ValueCodes

if TYPE_CHECKING:
    from .cache import PreparedData

log = logging.getLogger("flipctr")

TEXT_CACHE_VERSION = 2
CHUNK_ROWS = 65_536  # rows per chunk of the cache's build
CHECK_ROWS = 2_000  # whole prompts the assembled ones are checked against (+ the longest rows)
LOST_WARNING = 0.01  # share of rows losing a field to truncation above which the log warns


@dataclass
class TokenizedPrompts:
    input_ids: np.ndarray  # (N, L) right-padded with the tokenizer's pad id (uint16 in a cache where the vocabulary fits)
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
    report = truncation_report(lengths, [spans], prompts.fields, max_length)
    return TokenizedPrompts(input_ids, lengths, spans, report)


def text_cache_dir(data_folder: Path, tokenizer, max_length: int | None, builder: PromptBuilder) -> Path:
    spec = {"version": TEXT_CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length or f"auto, at most {encoder_max_length(tokenizer)}", "template": [builder.prefix, builder.suffix, builder.separator],
            "fields": builder.fields}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return data_folder / f"text-{key}"


def encoder_max_length(tokenizer) -> int:
    """The longest input the tokenizer's model takes (512 when it does not say)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 100_000 else 512


def _whole_prompts(builder: PromptBuilder, pieces: PieceTokenizer, codes: np.ndarray, tokenizer,
                   max_length: int) -> TokenizedPrompts:
    """Rows of ``codes`` tokenized as whole prompts (the reference the pieces are checked against)."""
    table = pd.DataFrame({name: pieces.names[j].take(codes[:, j]).to_numpy(zero_copy_only=False)
                          for j, name in enumerate(builder.fields)})
    return tokenize_prompts(builder.build(table), tokenizer, max_length)


def _pieces_reproduce(builder: PromptBuilder, pieces: PieceTokenizer, values: ValueCodes, tokenizer,
                      content: np.ndarray, max_length: int, pad: int, seed: int) -> tuple[bool, int]:
    """Whether prompts assembled from their values' tokens equal the tokenizer's own (ids,
    lengths, value spans) on a seeded sample of rows and the 20 longest; and how many were checked."""
    rows = len(values)
    rng = np.random.default_rng(seed)
    longest = np.argpartition(content, -20)[-20:] if rows > 20 else np.arange(rows)
    check = np.unique(np.concatenate([rng.choice(rows, min(CHECK_ROWS, rows), replace=False), longest]))
    sample = np.ascontiguousarray(values.codes[check])
    whole = _whole_prompts(builder, pieces, sample, tokenizer, max_length)
    ids, lengths, spans = pieces.assemble(sample, max_length, max_length, pad)
    width = whole.input_ids.shape[1]
    same = (pieces.right and np.array_equal(ids[:, :width], whole.input_ids) and (ids[:, width:] == pad).all()
            and np.array_equal(lengths, whole.lengths) and np.array_equal(spans, whole.value_spans))
    return bool(same), int(len(check))


def build_text_cache(folder: Path, values: pd.DataFrame | ValueCodes, builder: PromptBuilder, tokenizer,
                     max_length: int | None, seed: int = 0) -> dict:
    """Write ``input_ids.npy``, ``lengths.npy``, ``value_spans.npy`` and return the report, for
    every row of ``values`` (a text table, or the prepared table's codes).

    The rows are assembled from each distinct value's tokens (:class:`~.pieces.PieceTokenizer`),
    after checking on a seeded sample of rows (and the longest ones) that this gives the
    tokenizer's own ids, lengths and spans; otherwise every prompt is tokenized whole (said in
    the log and the report). ``max_length`` None: the 99th percentile of the prompts' token
    lengths, capped at the encoder's maximum."""
    tick = time.perf_counter()
    fields, pad = builder.fields, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if isinstance(values, pd.DataFrame):
        values = ValueCodes.from_frame(values, fields)
    elif values.fields != fields:
        values = ValueCodes(fields, values.codes[:, [values.fields.index(f) for f in fields]],
                            [values.names[values.fields.index(f)] for f in fields])
    pieces = PieceTokenizer(tokenizer, builder, values.names)
    rows = len(values)
    chunks = [(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]
    specials = len(pieces.pre) + len(pieces.post)
    content = np.concatenate([pieces.content_lengths(values.rows(a, b)) for a, b in chunks] or [np.zeros(0, np.int64)])
    chosen = "data.max_length"
    if max_length is None:
        p99 = int(np.ceil(np.percentile(content + specials, 99))) if rows else specials
        max_length, chosen = min(encoder_max_length(tokenizer), p99), "99th percentile of the data"
    reproduced, checked = _pieces_reproduce(builder, pieces, values, tokenizer, content, max_length, pad, seed)
    method = "pieces" if reproduced else "whole prompts"
    if not reproduced:
        log.info("text cache: assembling prompts from their values' tokens does not reproduce this tokenizer "
                 "(checked on %d rows); every prompt is tokenized whole", checked)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    if method == "pieces":
        lengths = np.minimum(content, max_length - specials).astype(np.int32) + specials
        width = int(lengths.max()) if rows else specials
    else:
        lengths, width = np.zeros(rows, np.int32), max_length
    input_ids = RowFile.create(folder / "input_ids.npy", dtype, (rows, width))
    value_spans = RowFile.create(folder / "value_spans.npy", np.int32, (rows, len(fields), 2))
    for start, stop in chunks:
        if method == "pieces":
            ids, _, spans = pieces.assemble(values.rows(start, stop), max_length, width, pad)
        else:
            tok = _whole_prompts(builder, pieces, values.rows(start, stop), tokenizer, max_length)
            ids = np.full((stop - start, width), pad, np.int64)
            ids[:, :tok.input_ids.shape[1]] = tok.input_ids
            spans, lengths[start:stop] = tok.value_spans, tok.lengths
        input_ids.write(start, ids)
        value_spans.write(start, spans)
    if method != "pieces" and rows and int(lengths.max()) < width:  # cut to the longest row, a chunk at a time
        cut = RowFile.create(folder / "input_ids.cut.npy", dtype, (rows, int(lengths.max())))
        for start, stop in chunks:
            cut.write(start, input_ids.read(start, stop)[:, :int(lengths.max())])
        cut.path.replace(input_ids.path)
    np.save(folder / "lengths.npy", lengths)
    report = truncation_report(lengths, (value_spans.read(a, b) for a, b in chunks), fields, max_length)
    report.update(method=method, max_length_from=chosen, checked_rows=checked,
                  distinct_values=dict(zip(fields, (len(n) for n in values.names), strict=True)),
                  tokens_p99_untruncated=float(np.percentile(content + specials, 99)) if rows else 0.0,
                  seconds=round(time.perf_counter() - tick, 1))
    return report


def truncation_report(lengths: np.ndarray, spans: Iterable[np.ndarray], fields: list[str], max_length: int) -> dict:
    """Length statistics and what truncation cost: rows and fields whose value was cut (``spans``:
    the rows' value spans (n, F, 2), in consecutive chunks)."""
    lost_by_field, by_count = np.zeros(len(fields), np.int64), np.zeros(len(fields) + 1, np.int64)
    for part in spans:
        cut = part[:, :, 1] == 0
        lost_by_field += cut.sum(0)
        by_count += np.bincount(cut.sum(1), minlength=len(fields) + 1)
    n = len(lengths)
    return {
        "samples": n, "max_length": max_length,
        "tokens_mean": float(lengths.mean()) if n else 0.0,
        "tokens_p95": float(np.percentile(lengths, 95)) if n else 0.0,
        "tokens_max": int(lengths.max()) if n else 0,
        "samples_truncated": int(n - by_count[0]),
        "fields_lost": int(lost_by_field.sum()),
        "samples_by_fields_lost": {k: int(v) for k, v in enumerate(by_count) if v},
        "fields_lost_by_field": dict(zip(fields, map(int, lost_by_field), strict=True)),
    }


def load_or_build_text(data_folder: Path, values: pd.DataFrame | ValueCodes, fields: list[str], tokenizer,
                       max_length: int | None) -> TokenizedPrompts:
    """Tokenized prompts of all rows of a prepared dataset, from its cache or built once
    (:func:`build_text_cache`) from ``values``: the text table, or its codes.
    ``max_length`` None: chosen from the data (see :func:`build_text_cache`)."""
    builder = PromptBuilder(fields)
    folder = text_cache_dir(data_folder, tokenizer, max_length, builder)
    if not (folder / "report.json").exists():
        with atomic_dir(folder, replace=False) as tmp:
            report = build_text_cache(tmp, values, builder, tokenizer, max_length)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    arrays = {}
    for name in ("input_ids", "lengths", "value_spans"):
        with cache_file(folder / f"{name}.npy", folder) as path:
            arrays[name] = np.load(path, mmap_mode="r")
    with cache_file(folder / "report.json", folder) as path:
        report = json.loads(path.read_text())
    if not len(arrays["input_ids"]) == len(arrays["lengths"]) == len(arrays["value_spans"]):
        raise DataError(f"{folder}: the prompt arrays have {[len(a) for a in arrays.values()]} rows; delete the "
                        "folder and run the command again to rebuild it")
    return TokenizedPrompts(arrays["input_ids"], arrays["lengths"], arrays["value_spans"], report, folder)


def prompts_for(data: "PreparedData", cfg: DataConfig, plm: str) -> TokenizedPrompts:
    """A prepared dataset's tokenized prompts for the language model ``plm`` (its tokenizer), cut
    at :func:`~.prompts.prompt_length` (None: from the data); cached beside the encoded table,
    the truncation logged (a warning when more than 1 % of the rows lose a field)."""
    tokenizer = load_tokenizer(plm)
    text = load_or_build_text(data.folder, data.value_codes(), data.fields, tokenizer,
                              prompt_length(cfg, data.name))
    report = text.report
    log.info("prompts: %.1f tokens on average (p95 %.0f, max %d); %d samples lost %d fields to "
             "truncation at %d tokens (%s)", report["tokens_mean"], report["tokens_p95"], report["tokens_max"],
             report["samples_truncated"], report["fields_lost"], report["max_length"],
             report.get("max_length_from", "data.max_length"))
    if report["samples"] and report["samples_truncated"] > LOST_WARNING * report["samples"]:
        log.warning("%.1f %% of the prompts lose a field to truncation at %d tokens: raise data.max_length "
                    "(the encoder takes up to %d)", 100 * report["samples_truncated"] / report["samples"],
                    report["max_length"], encoder_max_length(tokenizer))
    return text
