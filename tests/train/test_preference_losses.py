"""Hand-computed values for the preference losses in mllm.train.losses (r = beta (logp - logp_ref))."""

import math

import pytest
import torch

from mllm.train.losses import masked_token_mean_nll, preference_loss, sft_loss, token_logps

LN2 = math.log(2)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", LN2), ("nca_pair", 2 * LN2), ("ipo", 25.0)])
def test_step_zero_policy_equals_reference(loss_type, expected):
    # policy == reference: every reward is 0; -log s(0) = ln 2; NCA = ln 2 + 1/2 (ln 2 + ln 2) = 2 ln 2;
    # IPO = (0 - 1/(2 * 0.1))^2 = 25
    logps = torch.tensor([-12.5, -3.0, -40.25])
    losses, chosen, rejected = preference_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.1, loss_type=loss_type)
    assert losses.tolist() == pytest.approx([expected] * 3, abs=1e-6)
    assert chosen.abs().max().item() == 0.0 and rejected.abs().max().item() == 0.0


def test_dpo_by_hand():
    # chosen log-ratio +2, rejected log-ratio -3, beta 0.5: r_w = 1, r_l = -1.5, margin 2.5
    losses, chosen, rejected = preference_loss(torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]),
                                               torch.tensor([-10.0]), beta=0.5, loss_type="sigmoid")
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-1.5)
    assert losses.item() == pytest.approx(-log_sigmoid(2.5), abs=1e-6)  # 0.078889
    assert losses.item() == pytest.approx(0.0788897, abs=1e-6)


def test_nca_pair_by_hand():
    # r_w = 1, r_l = -1.5: L = -log s(1) - 1/2 [log s(-1) + log s(1.5)]
    losses, _, _ = preference_loss(torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]),
                                   torch.tensor([-10.0]), beta=0.5, loss_type="nca_pair")
    expected = -log_sigmoid(1.0) - 0.5 * (log_sigmoid(-1.0) + log_sigmoid(1.5))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert losses.item() == pytest.approx(0.313262 + 0.5 * (1.313262 + 0.201413), abs=1e-5)


def test_nca_pair_pulls_the_chosen_reward_towards_ln2_and_the_rejected_one_down():
    # dL/dr_w = -(1 - s(r_w)) + 1/2 s(r_w): -1/4 at 0 (raise it), 0 at s(r_w) = 2/3, i.e. r_w = ln 2;
    # dL/dr_l = 1/2 s(r_l) > 0 (always lower it). DPO only sees the margin.
    rewards = torch.tensor([0.0, LN2], requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    losses, _, _ = preference_loss(rewards, rejected, torch.zeros(2), torch.zeros(2), 1.0, "nca_pair")
    losses.sum().backward()
    assert rewards.grad.tolist() == pytest.approx([-0.25, 0.0], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.25, 0.25], abs=1e-6)

    def dpo(rw, rl):
        return preference_loss(torch.tensor([rw]), torch.tensor([rl]), torch.zeros(1), torch.zeros(1), 1.0,
                               "sigmoid")[0].item()
    assert dpo(2.0, 0.0) == pytest.approx(dpo(0.0, -2.0))


def test_ipo_by_hand():
    # h = (-1.0 - -1.5) - (-2.0 - -1.0) = 0.5 + 1.0 = 1.5; beta 0.25 -> target 2; (1.5 - 2)^2 = 0.25
    losses, chosen, rejected = preference_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                               torch.tensor([-1.0]), beta=0.25, loss_type="ipo")
    assert losses.item() == pytest.approx(0.25, abs=1e-6)
    assert chosen.item() == pytest.approx(0.125) and rejected.item() == pytest.approx(-0.25)


def test_gradients_and_detached_rewards():
    policy_chosen = torch.tensor([-5.0], requires_grad=True)
    policy_rejected = torch.tensor([-6.0], requires_grad=True)
    losses, chosen, rejected = preference_loss(policy_chosen, policy_rejected, torch.tensor([-5.0]),
                                               torch.tensor([-6.0]), beta=0.1, loss_type="sigmoid")
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dx -log s(beta (x_w - x_l)) at 0 = -beta s(0) = -0.05 for the chosen, +0.05 for the rejected
    assert policy_chosen.grad.item() == pytest.approx(-0.05) and policy_rejected.grad.item() == pytest.approx(0.05)


def test_unknown_loss_type_fails():
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, "hinge")


def test_sft_term_is_the_token_mean_nll_of_the_chosen_rows():
    # Row 0: targets with p = 1/2 and 3/4; row 1 (one target, p = 1/2). Token mean over 3 tokens.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]],
                           [[0.0, 0.0], [7.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0, -100], [-100, -100, 1]])
    per_token, _, _ = token_logps(logits, labels)
    expected = (LN2 + math.log(4 / 3) + LN2) / 3
    assert masked_token_mean_nll(per_token, labels).item() == pytest.approx(expected, abs=1e-6)
    assert masked_token_mean_nll(per_token, labels).item() == pytest.approx(sft_loss(logits, labels).item(), abs=1e-6)
