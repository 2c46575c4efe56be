"""A frozen encoder's cached text vectors under DDP (run by test_ddp.py through torchrun,
gloo): each rank encodes its share of the rows, every rank gets all of them, rank 0 writes the
cache. argv: the model folder, the test's folder (the rows and the one-process reference)."""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flipctr.runtime.device import Runtime
from flipctr.data.text import TokenizedPrompts
from flipctr.models.language import LanguageModel
from flipctr.training.text_vectors import TextVectors
from flipctr.runtime.distributed import init_distributed, leave

sys.path.insert(0, str(Path(__file__).parent))
from test_ddp import collective_threads  # noqa: E402


def main() -> None:
    init_distributed("gloo")
    rank = dist.get_rank()
    folder = Path(sys.argv[2])
    ref = np.load(folder / "reference.npz")
    lm = LanguageModel.from_pretrained(sys.argv[1])
    lm.freeze(0)
    encoded, encode = [], LanguageModel.sentence_vectors  # the rows this rank puts through the encoder

    def counted(self, input_ids, lengths, batch_size):
        encoded.append(len(input_ids))
        return encode(self, input_ids, lengths, batch_size)

    LanguageModel.sentence_vectors = counted
    text = TokenizedPrompts(ref["input_ids"], ref["lengths"], np.zeros((len(ref["lengths"]), 1, 2), np.int32), {},
                            folder / "cache")
    vectors = TextVectors(lm, text, Runtime(torch.device("cpu")), batch_size=4)
    got = vectors(1, 12)
    np.testing.assert_allclose(got, ref["vectors"], atol=1e-5)
    again = vectors(1, 12)  # read back from the cache rank 0 wrote: no second pass
    np.testing.assert_array_equal(again, got)
    print(f"rank {rank} encoded {encoded} ok", flush=True)
    leave()
    assert not collective_threads(), collective_threads()  # the group's threads are gone


if __name__ == "__main__":
    main()
