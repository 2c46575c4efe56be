"""Prompts (paper Eq. 3): ``"<field> is <value>."`` per field, joined by spaces, in field order.

Besides the text, the builder records the character span of every field's VALUE, so that the
tokenizer's offsets give the token span of each value without re-parsing the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Prompts:
    texts: list[str]
    value_chars: np.ndarray  # (N, F, 2) int32: [start, end) character span of each field's value
    fields: list[str]


class PromptBuilder:
    """Builds one sentence per row from the same field list as the tabular side."""

    def __init__(self, fields: list[str], template: str = "{field} is {value}.", separator: str = " "):
        if template.count("{value}") != 1 or template.count("{field}") != 1:
            raise ValueError("template must contain {field} and {value} once each")
        self.fields = list(fields)
        self.separator = separator
        self.prefix, self.suffix = template.split("{value}")

    def build(self, values: pd.DataFrame) -> Prompts:
        n = len(values)
        parts: list[np.ndarray] = []
        spans = np.zeros((n, len(self.fields), 2), dtype=np.int32)
        cursor = np.zeros(n, dtype=np.int64)
        for j, name in enumerate(self.fields):
            head = self.prefix.format(field=name)
            if j:
                head = self.separator + head
            value = values[name].astype(str).to_numpy(dtype=object)
            lengths = np.fromiter((len(v) for v in value), dtype=np.int64, count=n)
            spans[:, j, 0] = cursor + len(head)
            spans[:, j, 1] = spans[:, j, 0] + lengths
            cursor = spans[:, j, 1] + len(self.suffix)
            parts.append(head + value + self.suffix)
        texts = parts[0]
        for part in parts[1:]:
            texts = texts + part
        return Prompts(list(texts), spans, self.fields)
