"""Rows on the training device and their batching, shared by every training loop.

A :class:`DeviceRows` holds rows (a split, a sample of one, new rows to score) as tensors on
the device, or leaves its large arrays on disk (:class:`MappedArray`: each batch gathered from
the memory-mapped cache) where a whole split would not fit or on the CPU, where a copy gains
nothing. An epoch is planned on the host once (:func:`epoch_order`,
:meth:`DeviceRows.batch_widths`), so that no step of the loop waits for the device: the order of the rows, optionally length-bucketed (rows of similar prompt
length batched together, so that little of the encoder's work is padding), and each batch's
text width, rounded up to a few fixed sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

WIDTH_MULTIPLE = 8  # text widths are rounded up to this: few distinct shapes (compile, tensor cores)


def epoch_order(n: int, generator: torch.Generator, batch_size: int, lengths: torch.Tensor | None = None,
                bucket_batches: int = 0) -> torch.Tensor:
    """A seeded order of ``n`` rows (CPU int64).

    Plain: a random permutation. Length-bucketed (``lengths`` (n,) on the CPU and
    ``bucket_batches`` > 0): the permutation is cut into chunks of ``bucket_batches`` batches,
    each chunk is sorted by length, cut into batches, and the order of the full batches is
    shuffled (a partial last batch stays last, so batch ``i`` is always rows
    ``[i*batch_size, (i+1)*batch_size)``). Every row appears once per epoch either way.
    """
    perm = torch.randperm(n, generator=generator)
    if lengths is None or bucket_batches <= 0 or n <= batch_size:
        return perm
    chunk = batch_size * bucket_batches
    parts = []
    for start in range(0, n, chunk):
        rows = perm[start:start + chunk]
        parts.append(rows[torch.argsort(lengths[rows], stable=True)])
    perm = torch.cat(parts)
    full = n // batch_size
    batches = perm[:full * batch_size].view(full, batch_size)[torch.randperm(full, generator=generator)]
    return torch.cat([batches.reshape(-1), perm[full * batch_size:]])


def padding_fraction(lengths: torch.Tensor, order: torch.Tensor, widths: list[int], batch_size: int) -> float:
    """Share of the text positions in an epoch's batches that are padding."""
    total = sum(w * len(order[i * batch_size:(i + 1) * batch_size]) for i, w in enumerate(widths))
    return 1.0 - float(lengths[order].sum()) / max(total, 1)


class MappedArray:
    """Rows of an on-disk array (a memory map of a cache file) that stay there: indexing with a
    tensor of row positions gathers those rows and moves them to ``device`` (token ids stored as
    uint16 come back as int32), so a split costs memory per batch, not per row."""

    def __init__(self, array: np.ndarray, device: torch.device):
        self.array, self.device = array, device

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return _tensor(self.array[index.cpu().numpy()], self.device)

    def cpu(self) -> torch.Tensor:
        return _tensor(self.array, torch.device("cpu"))

    def to(self, device: torch.device) -> "MappedArray":
        return MappedArray(self.array, device)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # np.array copies: cached arrays are read-only memory maps; token ids cached as uint16 become int32
    return torch.from_numpy(np.array(array, dtype=np.int32 if array.dtype == np.uint16 else None)).to(device)


@dataclass
class DeviceRows:
    """Rows as tensors on the device (a split, part of one, rows to score), row-aligned:
    ``labels (N,)`` float and named inputs, e.g. ``ids (N, F)``, or ``input_ids (N, L)`` +
    ``lengths (N,)`` for text."""

    labels: torch.Tensor
    inputs: dict[str, torch.Tensor]
    _host: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(cls, labels: np.ndarray, device: torch.device, mapped: bool = False,
                    **arrays: np.ndarray) -> "DeviceRows":
        """Rows of ``arrays`` (row-aligned with ``labels``) on ``device``; ``mapped``: arrays of
        more than one column stay where they are (memory maps of the cache) as :class:`MappedArray`,
        gathered per batch; the labels and ``lengths`` (one value per row) are copied either way."""
        return cls(torch.from_numpy(np.asarray(labels, dtype=np.float32)).to(device),
                   {k: MappedArray(v, device) if mapped and v.ndim > 1 else _tensor(v, device)
                    for k, v in arrays.items()})

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "DeviceRows":
        return DeviceRows(self.labels.to(device), {k: v.to(device) for k, v in self.inputs.items()})

    def host(self, name: str) -> torch.Tensor | None:
        """A CPU copy of input ``name`` (made once), or None when the split has no such input."""
        if name not in self.inputs:
            return None
        if name not in self._host:
            self._host[name] = self.inputs[name].cpu()
        return self._host[name]

    def host_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (CPU) of input ``name`` on the host: read from the cache file when the
        input stays there, else from the host copy (:meth:`host`)."""
        values = self.inputs[name]
        if isinstance(values, MappedArray):
            return _tensor(values.array[index.numpy()], torch.device("cpu"))
        return self.host(name)[index]

    def order(self, generator: torch.Generator, batch_size: int, bucket_batches: int = 0) -> torch.Tensor:
        """This epoch's row order (CPU): length-bucketed when the split has text and
        ``bucket_batches`` > 0 (see :func:`epoch_order`)."""
        return epoch_order(len(self), generator, batch_size, self.host("lengths"), bucket_batches)

    def batch_widths(self, order: torch.Tensor, batch_size: int) -> list[int] | None:
        """The text width of each batch of ``order`` (CPU row indices, cut into batches of
        ``batch_size``): its longest row rounded up to a multiple of ``WIDTH_MULTIPLE`` (never
        past the stored width), computed on the host once per epoch; None without text."""
        lengths = self.host("lengths")
        if lengths is None:
            return None
        cap = self.inputs["input_ids"].shape[1]
        lengths = lengths[order]
        return [min(cap, -(-int(lengths[i:i + batch_size].max()) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
                for i in range(0, len(order), batch_size)]

    def batch(self, index: torch.Tensor, names: tuple[str, ...], width: int | None = None) -> dict[str, torch.Tensor]:
        """The named inputs of rows ``index``. Text is cut to ``width`` (from
        :meth:`batch_widths`; None: the longest row of the batch, read from the device, which
        waits for it) and gets its ``attention_mask``."""
        out = {}
        for name in names:
            if name == "attention_mask":
                continue
            out[name] = self.inputs[name][index]
        if "input_ids" in out:
            lengths = self.inputs["lengths"][index]
            width = int(lengths.max()) if width is None else width
            out["input_ids"] = out["input_ids"][:, :width]
            out["attention_mask"] = (torch.arange(width, device=lengths.device) < lengths[:, None]).long()
        return out
