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
