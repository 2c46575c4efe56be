"""Tokenized prompts assembled from tokenized pieces, at a cost in tokenizer calls of the number
of DISTINCT values rather than rows.

A prompt is ``head_j + value_j + suffix`` for every field ``j`` (:class:`~.prompts.PromptBuilder`:
``"user ID is " + "42" + "."``). A tokenizer that cuts text into words at spaces and punctuation
before tokenizing each word (WordPiece: BERT, MiniLM, MPNet) gives a prompt the tokens of its
pieces put end to end. So each field's head, the suffix and each distinct value are tokenized once,
and every row's ids, length and value spans are gathered from them with array operations, cut
as the tokenizer cuts (``max_length`` with its special tokens, from the right). Whether the
assumption holds is checked by :func:`~.text.build_text_cache` on a seeded sample of whole
prompts; where it does not (byte-level BPE merges the space before a word into it) the cache
is built from whole prompts instead.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from .prompts import PromptBuilder


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a single text ([CLS], [SEP])."""
    probe = "a"
    content = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(content) + 1):
        if full[k:k + len(content)] == content:
            return full[:k], full[k + len(content):]
    raise ValueError("the tokenizer's special tokens could not be located around a text")


class PieceTokenizer:
    """Each field's distinct values (``names[j]``, in code order) tokenized once, and rows of codes
    into them assembled (:meth:`assemble`)."""

    def __init__(self, tokenizer, builder: PromptBuilder, names: list[pa.Array]):
        from tokenizers import Tokenizer

        self.fields = builder.fields
        self.names = names
        # a copy without the truncation and padding that calls on the tokenizer leave set
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.pre, self.post = special_tokens(tokenizer)
        self.right = getattr(tokenizer, "truncation_side", "right") == "right"
        heads = [self._tokens([(builder.separator if j else "") + builder.prefix.format(field=name)])[0]
                 for j, name in enumerate(self.fields)]
        self.head_len = np.array([len(h) for h in heads], dtype=np.int64)
        suffix = self._tokens([builder.suffix])[0]
        self.suffix_len = len(suffix)
        # the pool every row's tokens are gathered from: specials, heads, suffix, then each field's values
        fixed = np.array([*self.pre, *self.post, *itertools.chain(*heads), *suffix], dtype=np.int64)
        self.head_src = len(self.pre) + len(self.post) + np.concatenate([[0], np.cumsum(self.head_len)[:-1]])
        self.suffix_src = len(self.pre) + len(self.post) + int(self.head_len.sum())
        pool, self.start, self.length, self.tail = [fixed], [], [], []
        offset = len(fixed)
        for values in names:
            ids, lengths, tail = self._values(values)
            self.start.append(offset + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
            self.length.append(lengths)
            self.tail.append(tail)
            pool.append(ids)
            offset += len(ids)
        self._pool = np.concatenate(pool)

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _values(self, values: pa.Array, batch: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A field's values tokenized: their tokens end to end, each one's token count, and whether
        its tokens reach its last character."""
        ids, lengths, tails = [], [], []
        for start in range(0, len(values), batch):
            texts = values.slice(start, batch).to_pylist()
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            count = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
            ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64,
                                   count=int(count.sum())))
            lengths.append(count)
            # whole-prompt rule: a value is complete when the kept tokens reach its last character;
            # characters after its last token (a trailing space) are reached only by a later token
            tails.append(np.fromiter((bool(e.ids) and e.offsets[-1][1] >= len(v) for e, v in zip(encodings, texts)),
                                     dtype=bool, count=len(texts)))
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        return np.concatenate(ids), np.concatenate(lengths), np.concatenate(tails)

    def content_lengths(self, codes: np.ndarray) -> np.ndarray:
        """Tokens of each row's prompt without special tokens or truncation (B,)."""
        total = np.full(len(codes), int(self.head_len.sum()) + self.suffix_len * len(self.fields), np.int64)
        for j in range(len(self.fields)):
            total += self.length[j][codes[:, j]]
        return total

    def assemble(self, codes: np.ndarray, max_length: int, width: int, pad: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of ``codes`` (B, F) as the tokenizer would give their prompts, cut at ``max_length``:
        ids (B, ``width``) right-padded with ``pad``, lengths (B,) and value spans (B, F, 2) ((0, 0)
        for a value cut by the truncation)."""
        n, fields = codes.shape
        budget = max_length - len(self.pre) - len(self.post)
        seg_len = np.empty((n, 3 * fields), dtype=np.int64)
        seg_src = np.empty((n, 3 * fields), dtype=np.int64)
        seg_len[:, 0::3], seg_src[:, 0::3] = self.head_len, self.head_src
        seg_len[:, 2::3], seg_src[:, 2::3] = self.suffix_len, self.suffix_src
        tail = np.empty((n, fields), dtype=bool)
        for j in range(fields):
            seg_len[:, 3 * j + 1] = self.length[j][codes[:, j]]
            seg_src[:, 3 * j + 1] = self.start[j][codes[:, j]]
            tail[:, j] = self.tail[j][codes[:, j]]
        ends = np.cumsum(seg_len, axis=1)
        kept = np.minimum(ends[:, -1], budget)
        value_end = ends[:, 1::3]
        value_len = seg_len[:, 1::3]
        complete = (value_len > 0) & (value_end <= kept[:, None]) & (tail | (value_end < kept[:, None]))
        first = len(self.pre)
        spans = np.stack([value_end - value_len + first, value_end + first], -1).astype(np.int32)
        spans[~complete] = 0
        # every row's tokens end to end: token t of segment s comes from pool[src_s + t]
        flat_len = seg_len.ravel()
        total = int(flat_len.sum())
        seg_start = np.cumsum(flat_len) - flat_len
        source = np.arange(total) - np.repeat(seg_start - seg_src.ravel(), flat_len)
        row_len = ends[:, -1]
        rows = np.repeat(np.arange(n), row_len)
        position = np.arange(total) - np.repeat(np.cumsum(row_len) - row_len, row_len)
        keep = position < kept[rows]
        ids = np.full((n, width), pad, dtype=np.int64)
        ids[rows[keep], position[keep] + first] = self._pool[source[keep]]
        ids[:, :first] = self.pre
        for k, token in enumerate(self.post):
            ids[np.arange(n), first + kept + k] = token
        return ids, (kept + first + len(self.post)).astype(np.int32), spans
