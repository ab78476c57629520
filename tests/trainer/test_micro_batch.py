"""The typed micro-batch's row and length operations: every tensor it carries follows, the
absent ones stay absent, and padding is zeros that count nowhere."""

import torch

from repo_megatron.trainer.micro_batch import MicroBatch


def _batch() -> MicroBatch:
    return MicroBatch(tokens=torch.arange(12).view(3, 4), loss_mask=torch.ones(3, 4),
                      advantages=torch.tensor([1.0, -1.0, 0.5]),
                      is_offpolicy=torch.tensor([False, True, False]),
                      lengths=torch.tensor([4, 3, 2]))


def test_select_and_pad_rows_apply_to_every_field_and_keep_absent_ones_absent():
    mb = _batch().select(slice(1, 3)).pad_rows(2)
    assert mb.shape == (4, 4) and mb.num_sequences == 4
    assert mb.advantages.tolist() == [-1.0, 0.5, 0.0, 0.0]
    assert mb.is_offpolicy.tolist() == [True, False, False, False]
    assert mb.loss_mask[2:].sum() == 0 and mb.lengths.tolist() == [3, 2, 0, 0]
    assert mb.is_replay is None and mb.old_logprobs is None and mb.ref_logprobs is None


def test_fit_length_cuts_or_pads_the_per_token_fields_only():
    mb = _batch()
    longer = mb.fit_length(6)
    assert longer.seq_length == 6 and torch.equal(longer.tokens[:, :4], mb.tokens)
    assert not longer.tokens[:, 4:].any() and not longer.loss_mask[:, 4:].any()
    assert torch.equal(longer.advantages, mb.advantages)     # [b]: untouched
    assert mb.fit_length(2).tokens.tolist() == [[0, 1], [4, 5], [8, 9]]


def test_to_moves_every_tensor_it_carries():
    moved = _batch().to(torch.device("meta"))  # a device other than the host's
    carried = [v for v in vars(moved).values() if v is not None]
    assert len(carried) == 5 and all(v.device.type == "meta" for v in carried)
    assert moved.is_replay is None and _batch().tokens.device.type == "cpu"
