"""Field-level masking for both modalities (FLIP 3.3.1), drawn and applied per batch.

Each sample chooses ``max(1, round(ratio * F))`` fields uniformly at random, independently for
the text and the tabular side. Tabular: the chosen fields' ids become the one shared
``<MASK>`` id. Text: every token of the chosen fields' VALUES becomes the mask token (the
field names stay), located through the value spans recorded at tokenization. A chosen text
field whose value was cut by truncation has no tokens: it gives no target, and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def fields_per_sample(num_fields: int, ratio: float) -> int:
    """k = ``max(1, round(ratio * F))`` fields masked per sample."""
    return max(1, round(ratio * num_fields))


def choose_fields(batch: int, num_fields: int, ratio: float, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """(B, k) int64: k distinct fields per row, uniformly drawn (a fixed shape: no host sync)."""
    scores = torch.rand(batch, num_fields, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :fields_per_sample(num_fields, ratio)]


def field_mask(fields: torch.Tensor, num_fields: int) -> torch.Tensor:
    """fields (B, k) -> (B, F) bool, True at the chosen fields."""
    return torch.zeros(len(fields), num_fields, dtype=torch.bool, device=fields.device).scatter_(1, fields, True)


def mask_tabular(ids: torch.Tensor, chosen: torch.Tensor, mask_id: int) -> torch.Tensor:
    """ids (B, F), chosen (B, F) -> ids with the chosen fields replaced by ``mask_id``."""
    return ids.masked_fill(chosen, mask_id)


def span_token_mask(value_spans: torch.Tensor, chosen: torch.Tensor, width: int) -> torch.Tensor:
    """value_spans (B, F, 2), chosen (B, F) -> (B, width) bool: tokens of the chosen values."""
    pos = torch.arange(width, device=value_spans.device)[None, None, :]
    inside = (pos >= value_spans[..., :1]) & (pos < value_spans[..., 1:])  # (B, F, W)
    return (inside & chosen[..., None]).any(1)


def random_token_mask(attention_mask: torch.Tensor, special: torch.Tensor, ratio: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """BERT-style token-level masking (the ablation): each real, non-special token with
    probability ``ratio``; at least one per row."""
    candidates = attention_mask.bool() & ~special
    scores = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)
    picked = (scores < ratio) & candidates
    first = scores.argmin(1)  # guarantees one masked token per row
    picked[torch.arange(len(picked), device=picked.device), first] = True
    return picked & candidates


@dataclass
class MaskedBatch:
    masked_ids: torch.Tensor  # (B, F) tabular ids with <MASK>
    tab_fields: torch.Tensor  # (B, k) fields masked on the tabular side
    masked_input_ids: torch.Tensor  # (B, L) text with mask tokens
    text_positions: torch.Tensor  # (B, L) masked token positions (the MLM targets)
    text_fields_lost: torch.Tensor | int  # chosen text fields with no tokens (cut by truncation); a
    # 0-dim tensor on the batch's device, so that counting it never waits on the host


class BatchMasks:
    """The masking of one epoch, drawn on the host batch by batch (:meth:`FieldMasker.plan_epoch`).

    The draws are those of one draw for every row of the epoch's global order (the tabular
    fields of all rows, then the text fields of all rows, from one generator), made a batch at a
    time from two generators started where each part begins, so memory holds one batch's draws,
    never the epoch's. Every rank draws the whole global batch and keeps its own rows', so a
    row's masks do not depend on the rank that holds it. From the drawn fields the batch's number
    of MLM targets is counted on the host (its rows' value spans), rounded up to a multiple of 64
    (few distinct shapes), so that no step waits on the device for it. Batches are taken in
    order."""

    def __init__(self, masker: "FieldMasker", rows: torch.Tensor | None,
                 generators: tuple[torch.Generator, torch.Generator] | None,
                 host_rows: Callable[[str, torch.Tensor], torch.Tensor] | None, batch_size: int, mlm: bool,
                 device: torch.device, rank: int = 0, world: int = 1):
        self.masker, self.rows, self.generators, self.host_rows = masker, rows, generators, host_rows
        self.batch_size, self.mlm, self.device, self.rank, self.world = batch_size, mlm, device, rank, world
        self.next_step = 0

    def batch(self, step: int) -> dict:
        """The keyword arguments of batch ``step`` for the pretraining model's forward."""
        if self.rows is None:  # no value spans: drawn and counted in the forward
            return {}
        if step != self.next_step:
            raise RuntimeError(f"masks are drawn in batch order: batch {self.next_step} is next, not {step}")
        self.next_step += 1
        masker = self.masker
        rows = self.rows[step * self.batch_size:(step + 1) * self.batch_size]
        spans = self.host_rows("value_spans", rows)
        out: dict = {}
        if masker.token_level:  # drawn in the forward: a bound on the targets
            per_row = masker.max_text_targets(spans, self.host_rows("lengths", rows))
        else:
            tab, text = (choose_fields(len(rows) * self.world, masker.num_fields, ratio, generator)[self.rank::self.world]
                         for ratio, generator in zip((masker.tab_ratio, masker.text_ratio), self.generators))
            per_row = masker.text_targets(spans, text)
            out["tab_fields"] = tab.to(self.device, non_blocking=True)
            out["text_fields"] = text.to(self.device, non_blocking=True)
        if self.mlm:
            out["text_targets"] = -(-int(per_row.sum()) // 64) * 64
        return out


def _skip(generator: torch.Generator, rows: int, columns: int, chunk: int = 1 << 16) -> None:
    """Advance ``generator`` past ``rows`` x ``columns`` uniform draws (CPU draws are sequential:
    drawing in chunks leaves it where one draw of the whole would)."""
    for start in range(0, rows, chunk):
        torch.rand(min(chunk, rows - start), columns, generator=generator)


class FieldMasker:
    """Masks a batch of paired text/tabular inputs (field-level, or token-level for the ablation)."""

    def __init__(self, num_fields: int, tab_mask_id: int, text_mask_id: int, text_ratio: float = 0.15,
                 tab_ratio: float = 0.15, token_level: bool = False, cls_id: int | None = None,
                 sep_id: int | None = None):
        self.num_fields, self.tab_mask_id, self.text_mask_id = num_fields, tab_mask_id, text_mask_id
        self.text_ratio, self.tab_ratio, self.token_level = text_ratio, tab_ratio, token_level
        self.special_ids = [i for i in (cls_id, sep_id) if i is not None]

    def choose(self, rows: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fields to mask, drawn ahead (on the host, a batch at a time): ``(tabular (N, k),
        text (N, k') or None for token-level masking)``; passed back to :meth:`__call__`."""
        tab = choose_fields(rows, self.num_fields, self.tab_ratio, generator)
        return tab, None if self.token_level else choose_fields(rows, self.num_fields, self.text_ratio, generator)

    @staticmethod
    def text_targets(value_spans: torch.Tensor, text_fields: torch.Tensor) -> torch.Tensor:
        """(N,) the exact number of masked text tokens of each row, given its chosen text fields
        (N, k) and value spans (N, F, 2): the tokens of those values (none for a value cut by
        truncation)."""
        lengths = (value_spans[..., 1] - value_spans[..., 0]).clamp_min(0)
        return lengths.gather(1, text_fields).sum(1)

    def __call__(self, ids: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 value_spans: torch.Tensor, generator: torch.Generator | None = None,
                 tab_fields: torch.Tensor | None = None, text_fields: torch.Tensor | None = None) -> MaskedBatch:
        """``tab_fields`` / ``text_fields``: fields chosen ahead (:meth:`choose`); drawn here otherwise."""
        batch, device = ids.shape[0], ids.device
        tab = choose_fields(batch, self.num_fields, self.tab_ratio, generator, device) if tab_fields is None \
            else tab_fields
        lost: torch.Tensor | int = 0
        if self.token_level:
            special = torch.zeros_like(input_ids, dtype=torch.bool)
            for token in self.special_ids:
                special |= input_ids == token
            positions = random_token_mask(attention_mask, special, self.text_ratio, generator)
        else:
            text = choose_fields(batch, self.num_fields, self.text_ratio, generator, device) if text_fields is None \
                else text_fields
            positions = span_token_mask(value_spans, field_mask(text, self.num_fields), input_ids.shape[1])
            lost = (value_spans[..., 1] == 0).gather(1, text).sum()
        return MaskedBatch(mask_tabular(ids, field_mask(tab, self.num_fields), self.tab_mask_id), tab,
                           input_ids.masked_fill(positions, self.text_mask_id), positions, lost)

    def plan_epoch(self, order: torch.Tensor, host_rows: Callable[[str, torch.Tensor], torch.Tensor] | None,
                   batch_size: int, generator: torch.Generator, mlm: bool, device: torch.device,
                   rank: int = 0, world: int = 1) -> BatchMasks:
        """One epoch's masking (:class:`BatchMasks`), each batch drawn on the host when it runs.
        ``order``: the epoch's rows of every rank (the same on all of them); this rank's are every
        ``world``-th from ``rank``. ``host_rows(name, rows)``: host copies of rows' value spans
        (n, F, 2) and lengths (n,); None (no value spans): everything is drawn and counted in the
        forward. Field-level masking draws from ``generator`` (CPU, seeded alike on every rank),
        which is left where the epoch's draws end; token-level masking draws in the forward, each
        batch sized by :meth:`max_text_targets`."""
        if host_rows is None:
            return BatchMasks(self, None, None, None, batch_size, mlm, device)
        generators = None
        if not self.token_level:
            tab = torch.Generator().set_state(generator.get_state())
            _skip(generator, len(order), self.num_fields)
            text = torch.Generator().set_state(generator.get_state())
            _skip(generator, len(order), self.num_fields)
            generators = (tab, text)
        return BatchMasks(self, order[rank::world], generators, host_rows, batch_size, mlm, device, rank, world)

    def max_text_targets(self, value_spans: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(N,) an upper bound on each row's masked text tokens when the fields are drawn on the
        device, from host copies of its value spans (N, F, 2) and lengths (N,): the k longest
        values (field-level), or every non-special token (token-level)."""
        if self.token_level:
            return (lengths - len(self.special_ids)).clamp_min(1)
        k = fields_per_sample(self.num_fields, self.text_ratio)
        return (value_spans[..., 1] - value_spans[..., 0]).clamp_min(0).topk(k, dim=1).values.sum(1)
