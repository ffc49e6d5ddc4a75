"""Pure loss and log-probability functions on tensors (no model, no Trainer).

Convention shared by every function here: labels are PRE-SHIFTED (`mllm.data.conversation`): labels[b, t] is
the target of logits[b, t], and -100 (IGNORE_INDEX) marks positions without a target. Nothing here shifts
again; shifting twice silently trains the model to predict two tokens ahead (facts sheet §8.2).

All reductions run in float32, whatever the logits' dtype.

- `token_nll_sum(logits, labels) -> (sum, count)`: summed negative log-likelihood of the target tokens and
  their number; the building block that lets a trainer normalise by the token count of a whole accumulated
  (and data-parallel) batch instead of a micro-batch.
- `sft_loss(logits, labels, num_items=None)`: token-mean cross-entropy over all target tokens in the batch
  (not a mean of per-sample means); with `num_items`, the sum is divided by that count instead.
- `token_logps(logits, labels) -> (per_token [B, L], sum [B], avg [B])`: log pi(label_t | prefix) per target
  token (0 where masked), its per-sample sum and its per-sample mean (sum / max(count, 1)). Preference losses
  (DPO family) build on these; `avg` is the length-normalised variant (IPO / SimPO style).
- `preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type)
  -> (loss per pair, chosen rewards, rejected rewards)`: "sigmoid" (DPO), "nca_pair" (the exercise's loss),
  "ipo" (on length-averaged log-probs).
- `masked_token_mean_nll(per_token_logps, labels)`: the optional SFT term on the chosen answers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, L, V] and labels [B, L]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label] per position, float32 [B, L]; exactly 0 where labels == -100."""
    _check(logits, labels)
    # cross_entropy wants the class dim second: (B, V, L)
    return F.cross_entropy(logits.float().transpose(1, 2), labels.long(), ignore_index=IGNORE_INDEX,
                           reduction="none")


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' negative log-likelihood (float32 scalar), number of target tokens (long))."""
    return _nll(logits, labels).sum(), (labels != IGNORE_INDEX).sum()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
             ) -> torch.Tensor:
    """Token-mean cross-entropy over every target token of the batch, float32 scalar.

    num_items: divide the summed loss by this count instead of the batch's own token count (gradient
    accumulation / data parallelism: the count of the whole optimizer step). A batch without any target
    token gives 0 (still attached to the graph), not NaN.
    """
    total, count = token_nll_sum(logits, labels)
    denominator = count.clamp(min=1) if num_items is None else num_items
    return total / denominator


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens.

    Returns per_token float32 [B, L] (0 where labels == -100), sum [B] and avg [B] = sum / max(count, 1).
    """
    per_token = -_nll(logits, labels)  # (B, L)
    count = (labels != IGNORE_INDEX).sum(dim=-1)  # (B,)
    total = per_token.sum(dim=-1)  # (B,)
    return per_token, total, total / count.clamp(min=1)


# ---- preference (DPO family) -------------------------------------------------------------------------------------
#
# Inputs are per-pair log-probabilities [B] of the chosen (y_w) and rejected (y_l) answers under the policy and
# under the frozen reference, as `token_logps` returns them (its `sum`, or its `avg` for length-normalised losses).
# The implicit reward is r(y) = beta * (logp_policy(y) - logp_ref(y)); the rewards returned are detached (they are
# for logging). At step 0 (policy == reference) every reward is 0, "sigmoid" gives ln 2 and "nca_pair" 2 ln 2.
#
#   sigmoid   DPO:   -log s(r_w - r_l)
#   nca_pair  the exercise's loss (NCA, Chen et al. 2024): -log s(r_w) - 1/2 [log s(-r_w) + log s(-r_l)]; it pushes
#             the chosen reward up in absolute terms, not only the margin, so the chosen likelihood does not sink.
#   ipo       IPO:   (h - 1/(2 beta))^2, h = (logp - logp_ref)(y_w) - (logp - logp_ref)(y_l). IPO is defined on
#             LENGTH-AVERAGED log-probs (the per-token mean; TRL's reading, confirmed by the IPO authors): pass the
#             `avg` outputs of `token_logps`. beta plays IPO's tau: the target log-ratio gap is 1/(2 beta).

PREFERENCE_LOSSES = ("sigmoid", "nca_pair", "ipo")


def uses_average_logp(loss_type: str, use_average_logp: bool) -> bool:
    """Whether a preference loss compares token-mean log-probs (IPO always, by its definition) or sums."""
    return use_average_logp or loss_type == "ipo"


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "nca_pair"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair [B], chosen rewards [B], rejected rewards [B]), float32; see the comment above."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
    chosen_ratio = policy_chosen.float() - ref_chosen.float().to(policy_chosen.device)  # (B,)
    rejected_ratio = policy_rejected.float() - ref_rejected.float().to(policy_rejected.device)  # (B,)
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(chosen_reward - rejected_reward)
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(chosen_reward) - 0.5 * (F.logsigmoid(-chosen_reward) + F.logsigmoid(-rejected_reward))
    else:  # ipo
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_reward.detach(), rejected_reward.detach()


def masked_token_mean_nll(per_token_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of every target token of the rows given (float32 scalar): the optional
    SFT term of a preference loss, computed on the chosen rows from `token_logps`'s per-token output (no second
    pass over the vocabulary). Equal to `sft_loss` of the same rows."""
    count = (labels != IGNORE_INDEX).sum()
    return -per_token_logps.float().sum() / count.clamp(min=1)
