"""Two parts of a base-recipe training step (`mllm.train.base_recipe.BaseStage.loss`), forward and backward, each
against the way it was computed before stop 52, on one real batch of the course's `settle` stage (eight turns a
conversation, 32 conversations, the tiny preset as the base uses it, bf16 autocast as the course runs it here):

- box heads: the four box-role heads' attention logits (`stage_heads.head_scores`) at every grounding-answer
  token. Before: every row gathered its sample's keys ([N, T, hd]); now: one matmul per sample.
- text losses: the answer and next-token cross-entropies. Before: two `cross_entropy` calls over every position
  (image span and padding included); now: one log-softmax over the positions either loss reads, shared.

One process, cases interleaved call by call (`harness.py`); ratios before / now per round, median (min-max).

    python benchmarks/bench_base_step.py [--quick] [--threads 1]
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import benchmark_arguments, fmt_ratio, interleaved, pin, ratio
from mllm.course.base import SLOT_GRID, base_config, base_stages
from mllm.course.shared import Budget
from mllm.data.lessons import tokenizer_texts
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer
from mllm.train.base_recipe import BaseStage, collate
from mllm.train.scene_slots import SceneSlots
from mllm.train.stage_heads import apply_rope, box_role_targets, head_scores, whole_number_ids


def gathered_scores(llm, layer_index, x, batch, rows, at, head):
    """`head_scores` as it was: each row's sample's keys gathered, then a product and a sum."""
    attention = llm.model.layers[layer_index].self_attn
    T, hd = x.shape[1], attention.head_dim
    kv = head // attention.n_rep
    cos, sin = llm.model.rotary_emb(torch.arange(T, device=x.device)[None], x.dtype)
    cos, sin = cos[0, 0], sin[0, 0]
    keys = apply_rope(attention.k_proj(x)[..., kv * hd:(kv + 1) * hd], cos, sin)
    queries = apply_rope(attention.q_proj(x[rows, at])[..., head * hd:(head + 1) * hd], cos[at], sin[at])
    scores = (queries[:, None, :] * keys[rows]).sum(-1).float() * attention.scale
    allowed = (torch.arange(T, device=x.device)[None] <= at[:, None]) & batch["attention_mask"][rows].bool()
    return scores.masked_fill(~allowed, torch.finfo(torch.float32).min)


def settle_batch(seed: int = 0):
    """(stage, batch, conversations, scenes) of one settle step on a fresh model."""
    tokenizer = build_tokenizer(tokenizer_texts(seed), vocab_size=1024, whole_numbers=True)
    torch.manual_seed(seed)
    model = MLLMModel(base_config(tokenizer))
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, SLOT_GRID, box_code="number")
    settings = next(s for s in base_stages(Budget()) if s.label == "settle")
    stage = BaseStage(model, tokenizer, slots, settings, Path(tempfile.mkdtemp()) / "settle", seed=seed)
    rng = random.Random(seed)
    scenes, _ = stage._scenes(rng, settings.batch)
    mix, turns = stage.lesson_at(settings.steps)
    conversations = [mix.turns(scene, rng, turns) for scene in scenes]
    batch = collate([stage._encode(c) for c in conversations], stage.pad_id)
    return stage, batch, conversations, scenes


def main() -> None:
    args = benchmark_arguments(__doc__)
    pin(args.threads)
    stage, batch, conversations, scenes = settle_batch()
    llm, heads = stage.model.llm, stage.settings.box_heads
    numbers = whole_number_ids(stage.tokenizer)
    rows, at = [], []
    for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
        for position, _, _ in box_role_targets(scene, conversation, batch["input_ids"][b].tolist(), stage.tokenizer,
                                               SLOT_GRID, numbers):
            rows.append(b), at.append(position)
    rows, at = torch.tensor(rows), torch.tensor(at)
    B, T = batch["input_ids"].shape
    tokens = torch.randn(B, stage.query_num, llm.config.hidden_size)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        hidden = stage._forward(batch, tokens, hidden_states=True).hidden_states
    inputs = {layer: llm.model.layers[layer].input_layernorm(hidden[layer]).detach() for layer, _ in heads}
    print(f"settle batch: {B} conversations x {T} positions, {len(rows)} grounding-answer rows, heads {heads}")

    def box_heads(scores_of):
        def step():
            xs = {layer: x.clone().requires_grad_() for layer, x in inputs.items()}
            with torch.autocast("cpu", torch.bfloat16):
                total = sum(scores_of(llm, layer, xs[layer], batch, rows, at, head).logsumexp(-1).mean()
                            for layer, head in heads)
            total.backward()
        return step

    V = llm.config.vocab_size
    logits_bf16 = torch.randn(B * T, V, dtype=torch.bfloat16)
    answers, lm_labels = batch["labels"].flatten(), batch["lm_labels"].flatten()

    def two_cross_entropies():
        logits = logits_bf16.clone().requires_grad_()
        flat = logits.float()
        (F.cross_entropy(flat, answers, ignore_index=-100) + F.cross_entropy(flat, lm_labels, ignore_index=-100)
         ).backward()

    def one_log_softmax():
        logits = logits_bf16.clone().requires_grad_()
        scored = (answers != -100) | (lm_labels != -100)
        log_probs = logits[scored].float().log_softmax(-1)
        (F.nll_loss(log_probs, answers[scored], ignore_index=-100)
         + F.nll_loss(log_probs, lm_labels[scored], ignore_index=-100)).backward()

    print(f"text losses: {int(((answers != -100) | (lm_labels != -100)).sum())} of {B * T} positions scored")
    rounds = 3 if args.quick else 15
    timings = interleaved({"box heads before": box_heads(gathered_scores), "box heads now": box_heads(head_scores),
                           "text losses before": two_cross_entropies, "text losses now": one_log_softmax}, rounds)
    for part in ("box heads", "text losses"):
        before, now = timings[f"{part} before"], timings[f"{part} now"]
        print(f"{part}: before {1e3 * before.median():.1f} ms, now {1e3 * now.median():.1f} ms (CPU, median of "
              f"{rounds}); before / now {fmt_ratio(ratio(before.cpu, now.cpu))}")


if __name__ == "__main__":
    main()
