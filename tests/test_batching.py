import torch

from flipctr.data.batching import WIDTH_MULTIPLE, DeviceRows, epoch_order, padding_fraction


def _lengths(n=1000, seed=0):
    return torch.randint(5, 90, (n,), generator=torch.Generator().manual_seed(seed))


def test_bucketed_order_is_a_seeded_permutation_with_the_partial_batch_last():
    lengths = _lengths(1000)
    a = epoch_order(1000, torch.Generator().manual_seed(1), 64, lengths, bucket_batches=4)
    b = epoch_order(1000, torch.Generator().manual_seed(1), 64, lengths, bucket_batches=4)
    c = epoch_order(1000, torch.Generator().manual_seed(2), 64, lengths, bucket_batches=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, torch.arange(1000))  # every row once
    # 1000 = 15 full batches of 64 + 40: the 40 leftover rows of the last chunk stay at the end
    tail = a[15 * 64:]
    assert len(tail) == 40 and set(tail.tolist()) <= set(torch.randperm(1000, generator=torch.Generator().manual_seed(1))[768:].tolist())


def test_bucketing_cuts_padding_and_plain_order_is_a_plain_permutation():
    lengths = _lengths(4096)
    plain = epoch_order(4096, torch.Generator().manual_seed(0), 128, lengths, bucket_batches=0)
    assert torch.equal(plain, torch.randperm(4096, generator=torch.Generator().manual_seed(0)))
    split = DeviceRows(torch.zeros(4096), {"lengths": lengths, "input_ids": torch.zeros(4096, 96, dtype=torch.long)})
    bucketed = split.order(torch.Generator().manual_seed(0), 128, bucket_batches=8)
    pad_plain = padding_fraction(lengths, plain, split.batch_widths(plain, 128), 128)
    pad_bucketed = padding_fraction(lengths, bucketed, split.batch_widths(bucketed, 128), 128)
    assert pad_plain > 0.4 and pad_bucketed < pad_plain / 2


def test_batch_widths_round_up_to_a_few_shapes_and_never_past_the_stored_width():
    lengths = torch.tensor([3, 9, 17, 30])
    split = DeviceRows(torch.zeros(4), {"lengths": lengths, "input_ids": torch.zeros(4, 30, dtype=torch.long)})
    widths = split.batch_widths(torch.arange(4), 1)
    assert widths == [8, 16, 24, 30] and all(w % WIDTH_MULTIPLE == 0 for w in widths[:3])
    batch = split.batch(torch.tensor([0, 1]), ("input_ids", "attention_mask"), 16)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert DeviceRows(torch.zeros(2), {"ids": torch.zeros(2, 3)}).batch_widths(torch.arange(2), 1) is None
