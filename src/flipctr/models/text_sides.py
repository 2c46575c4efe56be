"""One side of a sample (its user, its item) as text, one vector per row: MoRec's item text and
CTR-BERT's two towers.

A side's text depends on the user (item) alone, so it is held once per distinct user (item):
with a frozen encoder as the ``[CLS]`` vectors, computed once and cached by the runner; with a
trained one as the tokenized text, which the language model encodes in every forward pass
(finetuned end to end). Rows pick their user (item) by index (input ``<side>_index``); a model
holds each side as its attribute ``<side>_text``, which scoring new rows replaces.

Shapes: B batch, K distinct users / items, H text hidden size, L tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .language import LanguageModel


class SideText(nn.Module):
    """``vectors`` (K, H): a frozen encoder's ``[CLS]`` per distinct value; or ``tokens`` (K, L)
    with ``lengths`` (K,) for a trained encoder. Buffers, not saved with the weights (rebuilt
    from the data when a run is loaded; on BookCrossing a table would be hundreds of MB)."""

    def __init__(self, vectors: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None):
        super().__init__()
        if (vectors is None) == (tokens is None) or (tokens is None) != (lengths is None):
            raise ValueError("a side's text is either its vectors, or its tokens with their lengths")
        self.register_buffer("vectors", None if vectors is None else vectors.float(), persistent=False)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)

    @property
    def trained(self) -> bool:
        return self.tokens is not None

    def forward(self, index: torch.Tensor, language_model: LanguageModel | None = None) -> torch.Tensor:
        """index (B,) -> (B, H): the cached vector, or ``language_model``'s ``[CLS]`` of the text
        (all rows at the side's full width: a fixed shape, so nothing waits on the host)."""
        index = index.long()
        if not self.trained:
            return self.vectors[index]
        if language_model is None:
            raise ValueError("this side holds tokens: it needs the language model that encodes them")
        width = self.tokens.shape[1]
        mask = (torch.arange(width, device=index.device) < self.lengths[index, None]).long()
        return language_model(self.tokens[index].long(), mask).cls


def text_lr_groups(language_model: LanguageModel | None, lr_scale: float) -> list[dict]:
    """A trained language model's parameters at ``lr_scale`` times the model's lr (an ID side
    wants ~1e-3, a language model ~5e-5); nothing for a frozen one."""
    return [] if language_model is None else [{"params": list(language_model.parameters()), "lr_scale": lr_scale}]
