"""The base stages' throwaway heads on the LLM's hidden states (in a stage's state.pt, never in the model): what
each image position or text position is told to compute, so that a hop the answer needs gets its own gradient.

    match    each image position: does its cell hold an object the conversation's first question asks about
    pointer  each description (or grounding answer) token: which cell holds the object its text is about (a
             throwaway query/key pair, or one attention head of the LLM itself)
    box roles  each coordinate of a grounding answer's box (whole-number tokens): one attention head of the LLM per
             coordinate looks at the referred object's cell where that coordinate is written, and writes it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.data.conversation import find_sequence
from mllm.data.grounding_prepare import GROUNDING_PROMPT
from mllm.data.lessons import answering_objects, described_objects
from mllm.model.llm import apply_rope
from mllm.model.tokenization import WHOLE_NUMBERS, split_numbers
from mllm.train.scene_slots import slot_features
from mllm.world import scenes as S

POINTER_DIM = 64  # width of the pointer head's query and key
MATCH_POS_WEIGHT = 20.0  # the match head's targets (about 1 cell in 36) against its non-targets


def image_positions(image_starts: torch.Tensor, query_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), each [B, Q]: the sequence positions of every sample's image span."""
    rows = torch.arange(len(image_starts), device=image_starts.device)[:, None].expand(-1, query_num)
    cols = image_starts[:, None] + torch.arange(query_num, device=image_starts.device)  # (B, Q)
    return rows, cols


def new_match_head(hidden_size: int, seed: int) -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(hidden_size, 1)


def new_pointer_head(hidden_size: int, seed: int) -> torch.nn.ModuleDict:
    """A query of the text position and a key of each image position."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.ModuleDict({"query": torch.nn.Linear(hidden_size, POINTER_DIM),
                                    "key": torch.nn.Linear(hidden_size, POINTER_DIM)})


def match_loss(head: torch.nn.Module, scenes, conversations, batch: dict, hidden: torch.Tensor,
               grid: int, cells: list | None = None) -> torch.Tensor | None:
    """Binary cross-entropy of the match head on every image position's hidden state [B, Q, D]: does its cell
    hold an object the conversation's first question asks about (`answering_objects`). None when no
    conversation of the batch starts with such a question. About one cell in 36 is a target, so targets weigh
    `MATCH_POS_WEIGHT` times more (unweighted, flagging no cell at all is a cheap optimum: measured, the loss sat
    at 0.05 without learning). A yes/no answer is then one hop, "is any cell flagged": from a random LLM,
    existence 1.00 and position .77 after 500 steps where the same run without it stayed at .50
    (docs/probes/README.md, m1 / q1)."""
    positions = image_positions(batch["image_starts"], grid * grid)
    flags = head(hidden[positions].float()).squeeze(-1)  # (B, Q)
    targets, keep = torch.zeros_like(flags), []
    for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
        hits = answering_objects(scene, conversation[0][0])
        if hits is None:
            continue
        keep.append(b)
        for hit, features in zip(hits, slot_features(scene, grid, None if cells is None else cells[b])):
            if hit:
                targets[b, features[0]] = 1.0  # the object's cell
    if not keep:
        return None
    return F.binary_cross_entropy_with_logits(flags[keep], targets[keep],
                                              pos_weight=torch.tensor(MATCH_POS_WEIGHT, device=flags.device))


def pointer_targets(scene: S.Scene, conversation: list[tuple[str, str]], ids: list[int], tokenizer,
                    grid: int, boxes: bool = False, descriptions: bool = True,
                    cells: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """(position in `ids`, image cell) for every token of the conversation's descriptions that predicts a token
    of a sentence or list item about one of the scene's objects (`described_objects`): the cell of that object.
    With `boxes`, also every token predicting one of a grounding answer's: the referred object's cell (without
    `descriptions`, only those)."""
    cell_of = [features[0] for features in slot_features(scene, grid, cells)]
    out = []
    for prompt, answer in conversation:
        if descriptions and (prompt in S.SHORT_PROMPTS or prompt in S.DETAILED_PROMPTS):
            about = described_objects(scene, answer)
        elif boxes and prompt.startswith(GROUNDING_PROMPT[:GROUNDING_PROMPT.index("{")]):
            hits = [i for i, hit in enumerate(answering_objects(scene, prompt) or []) if hit]
            about = [(0, len(answer), hits[0])] if len(hits) == 1 else []
        else:
            continue
        pieces = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        answer_ids, offsets = pieces["input_ids"], pieces["offset_mapping"]
        # where the answer's tokens from its second on sit in the conversation (its first may merge with the "\n")
        found = find_sequence(ids, answer_ids[1:]) if len(answer_ids) > 1 else []
        if not found:
            continue
        at = found[0]
        for start, end, index in about:
            for j in range(1, len(answer_ids)):
                if start <= offsets[j][1] - 1 < end:  # token j (at at + j - 1) is about the object: its predictor
                    out.append((at + j - 2, cell_of[index]))  # (by its last character: " At" starts a sentence)
    return out


def _pointed(scenes, conversations, batch: dict, tokenizer, grid: int, boxes: bool, device):
    """(rows [N], text positions [N], cells [N]) of every pointer target of the batch, or None."""
    rows, at, cells = [], [], []
    for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
        for position, cell in pointer_targets(scene, conversation, batch["input_ids"][b].tolist(), tokenizer, grid,
                                              boxes):
            rows.append(b), at.append(position), cells.append(cell)
    if not rows:
        return None
    return tuple(torch.tensor(v, device=device) for v in (rows, at, cells))


def pointer_loss(head: torch.nn.ModuleDict, scenes, conversations, batch: dict, hidden: torch.Tensor, tokenizer,
                 grid: int, boxes: bool = False) -> torch.Tensor | None:
    """Cross-entropy of the pointer head over the image positions [B, Q] from every description token's hidden
    state [B, T, D]: the cell of the object the sentence (or list item) that the next token belongs to is about
    (`described_objects`). A description names objects one after another, and the LLM of the read stages does
    not find the next one (teacher-forced, the next object's colour .4-.5 after the first): the next token's
    loss reaches that step only through reading the found cell and writing its words. The pointer supervises
    the step itself, as the match head supervises the lookup of a question. Measured (docs/probes/README.md,
    "Stop 36"): it learns the cells (loss 3.6 -> ~0.5) but the descriptions do not improve, so the course leaves
    it off. None when the batch holds no description."""
    pointed = _pointed(scenes, conversations, batch, tokenizer, grid, boxes, hidden.device)
    if pointed is None:
        return None
    rows, at, cells = pointed
    keys = head["key"](hidden[image_positions(batch["image_starts"], grid * grid)].float())  # (B, Q, P)
    queries = head["query"](hidden[rows, at].float())  # (N, P)
    logits = (queries[:, None, :] * keys[rows]).sum(-1) / POINTER_DIM ** 0.5  # (N, Q)
    return F.cross_entropy(logits, cells)


def head_scores(llm, layer_index: int, x: torch.Tensor, batch: dict, rows: torch.Tensor, at: torch.Tensor,
                head: int) -> torch.Tensor:
    """[N, T] attention logits of query head `head` of decoder layer `layer_index` (`x` [B, T, D] that layer's
    normed input) from each position `at` of sample `rows` over the positions it attends to (causal, padding
    off; the others at the float minimum), as the layer computes them."""
    attention = llm.model.layers[layer_index].self_attn
    T, hd = x.shape[1], attention.head_dim
    kv = head // attention.n_rep  # the key/value head this query head reads
    cos, sin = llm.model.rotary_emb(torch.arange(T, device=x.device)[None], x.dtype)  # (1, 1, T, hd) each
    cos, sin = cos[0, 0], sin[0, 0]  # (T, hd)
    keys = apply_rope(attention.k_proj(x)[..., kv * hd:(kv + 1) * hd], cos, sin)  # (B, T, hd)
    queries = apply_rope(attention.q_proj(x[rows, at])[..., head * hd:(head + 1) * hd], cos[at], sin[at])  # (N, hd)
    # each sample's queries against its own keys, one matmul a sample: gathering keys[rows] ([N, T, hd], N in the
    # thousands on a grounding batch) was a quarter of a settle step, measured
    order = torch.argsort(rows, stable=True)
    samples, counts = torch.unique_consecutive(rows[order], return_counts=True)
    grouped = torch.split(queries[order], counts.tolist())
    scores = torch.cat([q @ keys[b].T for b, q in zip(samples.tolist(), grouped)])  # (N, T) in `order`
    scores = scores[torch.argsort(order)].float() * attention.scale  # (N, T) in the rows' own order
    allowed = (torch.arange(T, device=x.device)[None] <= at[:, None]) & batch["attention_mask"][rows].bool()
    return scores.masked_fill(~allowed, torch.finfo(torch.float32).min)


def head_output(attention, values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, head: int) -> torch.Tensor:
    """[n, D] what query head `head` of an attention layer writes, alone: its attention (`scores` [n, T], logits from
    `head_scores`) over its key/value head's share of `values` ([B, T, KV * hd], the layer's value projection) of
    samples `rows`, through its own share of the output projection."""
    hd = attention.head_dim
    kv = head // attention.n_rep  # the key/value head this query head reads
    own = values[..., kv * hd:(kv + 1) * hd][rows]  # (n, T, hd)
    read = torch.einsum("nt,ntd->nd", scores.softmax(-1).to(values.dtype), own)
    return read @ attention.o_proj.weight[:, head * hd:(head + 1) * hd].T  # (n, D)


def attention_pointer_losses(llm, layer_index: int, scenes, conversations, batch: dict, hidden: torch.Tensor,
                             tokenizer, grid: int, boxes: bool = False,
                             read_words: torch.Tensor | None = None,
                             box_digits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pointer's targets taught to the LLM's own attention (`llm` an LLMForCausalLM, `hidden` [B, T, D] the input
    of its decoder layer `layer_index`):

    pointer  -log of the weight query head 0 of that layer gives the target cell's image position, over every
             position the token attends to (causal, padding off). The throwaway pointer learnt where the next object
             is but the descriptions did not use it (stop 36); here the head that finds the cell is one the LLM reads
             through.
    read     with `read_words` (token ids: the slots' colour, category, size, place and count words), where the next
             token is one of them: cross-entropy of that token from head 0's own output alone (its share of the
             output projection, then the final norm and the LM head), so that what the head finds is written as the
             word.
    read_box with `box_digits` (the digit tokens) and `boxes`, where the next token is a digit of a grounding answer's
             box: cross-entropy of that digit from the position's own input to the layer plus head 0's output, through
             the layer's MLP, the final norm and the LM head (the later layers skipped). Unlike a word, a digit is not
             in the cell the head finds: which coordinate and digit come next is known only at the position, so the
             position's state joins the head's output.

    Empty when the batch holds no description."""
    pointed = _pointed(scenes, conversations, batch, tokenizer, grid, boxes, hidden.device)
    if pointed is None:
        return {}
    rows, at, cells = pointed
    layer = llm.model.layers[layer_index]
    x = layer.input_layernorm(hidden)  # (B, T, D)
    scores = head_scores(llm, layer_index, x, batch, rows, at, head=0)  # (N, T)
    targets = batch["image_starts"][rows] + cells  # (N,) the target cells' sequence positions
    out = {"pointer": F.cross_entropy(scores, targets)}
    following = batch["input_ids"][rows, at + 1]  # (N,) the token each position predicts
    reads = {}
    if read_words is not None:
        reads["read"] = torch.isin(following, read_words)
    if box_digits is not None and boxes:
        reads["read_box"] = torch.isin(following, box_digits)
    if not any(where.any() for where in reads.values()):
        return out
    values = layer.self_attn.v_proj(x)  # (B, T, KV * hd)
    for name, where in reads.items():
        if not where.any():
            continue
        written = head_output(layer.self_attn, values, rows[where], scores[where], head=0)  # (n, D)
        if name == "read_box":  # the position's own state joins it, through the layer's MLP
            written = written + hidden[rows[where], at[where]]
            written = written + layer.mlp(layer.post_attention_layernorm(written))
        logits = llm.lm_head(llm.model.norm(written)).float()  # (n, V)
        out[name] = F.cross_entropy(logits, following[where])
    return out


BOX_ROLES = ("x0", "y0", "x1", "y1")  # a box's coordinates, in the order its answer writes them


def whole_number_ids(tokenizer) -> torch.Tensor:
    """[1000] token ids of "0" .. "999"; ValueError unless each is one token (`build_tokenizer(whole_numbers=True)`)."""
    split = split_numbers(tokenizer)
    if split:
        raise ValueError(f"box roles need each of 0..999 to be one token; this tokenizer splits {len(split)} of them "
                         f"(e.g. {split[:3]}): build it with build_tokenizer(..., whole_numbers=True)")
    return torch.tensor(tokenizer.convert_tokens_to_ids(WHOLE_NUMBERS))


def check_box_heads(heads: tuple, config) -> None:
    """ValueError unless every (layer, head) of `heads` is a query head of the LLM `config` describes."""
    if not all(0 <= layer < config.num_hidden_layers and 0 <= head < config.num_attention_heads
               for layer, head in heads):
        raise ValueError(f"StageSettings.box_heads {tuple(map(tuple, heads))}: this LLM has "
                         f"{config.num_hidden_layers} layers of {config.num_attention_heads} query heads")


def box_role_targets(scene: S.Scene, conversation: list[tuple[str, str]], ids: list[int], tokenizer, grid: int,
                     numbers: torch.Tensor, cells: tuple[int, ...] | None = None) -> list[tuple[int, int, int]]:
    """(position, referred cell, role) for every token predicting one of a grounding answer's tokens (its first
    but one on, as `pointer_targets`): role k where the box's k-th number comes next, -1 at its other tokens."""
    out, is_number = [], set(numbers.tolist())
    for turn in conversation:
        written = 0
        for position, cell in pointer_targets(scene, [turn], ids, tokenizer, grid, boxes=True, descriptions=False,
                                              cells=cells):
            number = ids[position + 1] in is_number
            out.append((position, cell, written if number and written < len(BOX_ROLES) else -1))
            written += number
    return out


def box_role_losses(llm, hidden_states: tuple, scenes, conversations, batch: dict, tokenizer, grid: int,
                    heads: tuple, numbers: torch.Tensor, cells: list | None = None) -> dict[str, torch.Tensor]:
    """Each coordinate k of a grounding answer's box (x0, y0, x1, y1, whole-number tokens) taught to query head
    `heads[k]` = (layer, head) of the LLM (`hidden_states[layer]` that layer's input [B, T, D]):

    box_attend  -log of that head's weight on the referred object's cell where coordinate k comes next, and on
                position 0 (a sink: the head reads nothing) at the box's other tokens; the mean over the heads
    box_read    cross-entropy of coordinate k from that head's output alone (its share of the output projection,
                the final norm, the LM head), where it comes next; the mean over the heads

    A head that finds the cell returns the same vector wherever it looks from, so one head for the whole box cannot
    say which coordinate is wanted; here the role is picked by which head looks (measured, docs/probes/README.md stop
    39: teacher-forced mean absolute error 42-68 of 1000 where the coordinates' spread is ~195). Empty when the batch
    holds no grounding answer. `cells`: per scene, its objects' cells (`scene_slots.assign_cells`)."""
    rows, at, referred, roles = [], [], [], []
    for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
        for position, cell, role in box_role_targets(scene, conversation, batch["input_ids"][b].tolist(), tokenizer,
                                                     grid, numbers, None if cells is None else cells[b]):
            rows.append(b), at.append(position), referred.append(cell), roles.append(role)
    if not rows:
        return {}
    device = hidden_states[0].device
    rows, at, referred, roles = (torch.tensor(v, device=device) for v in (rows, at, referred, roles))
    targets = batch["image_starts"][rows] + referred  # (N,) the referred cells' sequence positions
    attend, read = [], []
    inputs = {}  # layer -> (normed input [B, T, D], value projection [B, T, KV * hd]): once per layer
    for layer_index in dict.fromkeys(layer_index for layer_index, _ in heads):
        layer = llm.model.layers[layer_index]
        x = layer.input_layernorm(hidden_states[layer_index])
        inputs[layer_index] = x, layer.self_attn.v_proj(x)
    for k, (layer_index, head) in enumerate(heads):
        x, values = inputs[layer_index]
        scores = head_scores(llm, layer_index, x, batch, rows, at, head)  # (N, T)
        mine = roles == k
        attend.append(F.cross_entropy(scores, torch.where(mine, targets, torch.zeros_like(targets))))
        if not mine.any():
            continue
        written = head_output(llm.model.layers[layer_index].self_attn, values, rows[mine], scores[mine], head)
        logits = llm.lm_head(llm.model.norm(written)).float()  # (n, V)
        read.append(F.cross_entropy(logits, batch["input_ids"][rows[mine], at[mine] + 1]))
    out = {"box_attend": sum(attend) / len(attend)}
    if read:
        out["box_read"] = sum(read) / len(read)
    return out
