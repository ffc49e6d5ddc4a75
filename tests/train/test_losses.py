"""Hand-computed values for the pure losses in mllm.train.losses (labels are pre-shifted: no shift)."""

import math

import pytest
import torch

from mllm.train.losses import sft_loss, token_logps, token_nll_sum


def test_sft_loss_by_hand():
    # Vocabulary of 2. Position 0: logits (0, 0) -> p = 1/2 each. Position 1: logits (ln 3, 0) -> p = (3/4, 1/4).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, -100]])  # position 2 ignored whatever its logits
    expected = (math.log(2) + math.log(4 / 3)) / 2  # mean of -log(1/2) and -log(3/4)
    assert sft_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    total, count = token_nll_sum(logits, labels)
    assert total.item() == pytest.approx(math.log(2) + math.log(4 / 3), abs=1e-6) and count.item() == 2
    assert sft_loss(logits, labels, num_items=4).item() == pytest.approx(total.item() / 4, abs=1e-6)


def test_no_shift_is_applied():
    # The target of logits[t] is labels[t]: a confident, correct prediction at every position gives ~0.
    labels = torch.tensor([[3, 1, 2]])
    logits = torch.full((1, 3, 4), -20.0)
    logits[0, torch.arange(3), labels[0]] = 20.0
    assert sft_loss(logits, labels).item() < 1e-6


def test_padding_gives_the_token_weighted_mean():
    torch.manual_seed(0)
    a_logits, a_labels = torch.randn(1, 5, 7), torch.tensor([[-100, 2, 3, 4, 1]])  # 4 targets
    b_logits, b_labels = torch.randn(1, 3, 7), torch.tensor([[-100, -100, 6]])  # 1 target
    padded_b = torch.cat([b_logits, torch.randn(1, 2, 7)], dim=1)  # right padding: random logits, label -100
    padded_b_labels = torch.tensor([[-100, -100, 6, -100, -100]])
    batch = sft_loss(torch.cat([a_logits, padded_b]), torch.cat([a_labels, padded_b_labels]))
    expected = (4 * sft_loss(a_logits, a_labels) + 1 * sft_loss(b_logits, b_labels)) / 5
    assert batch.item() == pytest.approx(expected.item(), abs=1e-6)


def test_empty_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = sft_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


def test_token_logps_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [1.0, 2.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -100], [-100, -100, -100]])
    per_token, total, avg = token_logps(logits, labels)
    assert per_token.shape == (2, 3)
    assert per_token[0].tolist() == pytest.approx([math.log(0.5), math.log(0.75), 0.0], abs=1e-6)
    assert per_token[1].abs().sum().item() == 0.0  # fully masked sample
    assert total.tolist() == pytest.approx([math.log(0.5) + math.log(0.75), 0.0], abs=1e-6)
    assert avg.tolist() == pytest.approx([(math.log(0.5) + math.log(0.75)) / 2, 0.0], abs=1e-6)


def test_bf16_logits_reduce_in_fp32():
    logits = torch.randn(1, 4, 9).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, 3, 4]])
    assert sft_loss(logits, labels).dtype == torch.float32
    assert token_logps(logits, labels)[0].dtype == torch.float32
