"""Stop 39: box coordinates as number tokens, each read by a head of its own (`read_continue.py numbers=1 roles=`).

Stop 38 found why the first corner's digits stay at their prior: twelve roles (4 coordinates x 3 places) share the
ten digit tokens, and a head that finds the referred cell returns the same vector at every one of them. g2 showed that
a head whose *query* selects the role (the cell where its digit is written, a sink elsewhere) reads its digit from
the image. Here every coordinate is one token ("[87,123,...]": "87" and "123" whole), which leaves four roles, and
each gets its own query head: where the box's k-th number is written, head k attends to the referred object's cell
and reads the number from its output alone; at the box's other tokens it attends to the sequence's first token.

    add_number_tokens   the tokenizer learns "0".."999" as whole tokens; the LLM's embeddings and LM head grow,
                        the new rows a fixed random projection of the number's phases (periods 1000 .. 10), so that
                        near numbers start near each other and a read that learns one number's direction helps its
                        neighbours
    role_heads          the attention and read losses of the four role heads, added to the stage's pointer loss
                        (attention) and standing in for its box read (logged as read_box)
"""
import math

import torch
import torch.nn.functional as F

PERIODS = (1000, 500, 250, 100, 50, 25, 10)


def number_phases(numbers: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 2 * len(PERIODS)]: cos and sin of 2 pi n / P for each period."""
    angles = 2 * math.pi * numbers.float()[:, None] / torch.tensor(PERIODS, dtype=torch.float32)  # (N, P)
    return torch.cat((angles.cos(), angles.sin()), -1)


def add_number_tokens(model, tokenizer, seed: int = 0) -> dict[int, int]:
    """Give the tokenizer "0".."999" as whole tokens and the LLM rows for the new ones; {number: token id}."""
    tokenizer.add_tokens([str(n) for n in range(1000)])
    ids = {n: tokenizer.convert_tokens_to_ids(str(n)) for n in range(1000)}
    llm = model.llm
    old_embed, old_head = llm.get_input_embeddings().weight.data, llm.lm_head.weight.data
    old, new = old_embed.shape[0], len(tokenizer)
    if new == old:
        return ids
    generator = torch.Generator().manual_seed(seed)
    phases = number_phases(torch.arange(1000))  # (1000, F)
    fresh = [n for n in range(1000) if ids[n] >= old]
    rows = {}
    for name, weight in (("embed", old_embed), ("head", old_head)):
        projection = torch.randn(weight.shape[1], phases.shape[1], generator=generator)  # (D, F)
        made = phases[fresh] @ projection.T  # (n, D)
        made *= weight.norm(dim=1).mean() / made.norm(dim=1).mean()  # at the existing rows' scale
        rows[name] = torch.cat((weight, made.to(weight.dtype)))
    embedding = torch.nn.Embedding(new, old_embed.shape[1])
    embedding.weight.data = rows["embed"]
    llm.set_input_embeddings(embedding)
    head = torch.nn.Linear(old_head.shape[1], new, bias=False)
    head.weight.data = rows["head"]
    llm.lm_head = head
    model.config.llm.vocab_size = new
    return ids


def role_heads(stage, roles: list[tuple[int, int]], number_ids: dict[int, int]) -> None:
    """Role k (x0, y0, x1, y1) taught to query head roles[k] = (layer, head): attend to the referred cell where the
    box's k-th number is written and to position 0 at the box's other tokens; that number read from the head's output
    alone (its share of the output projection, the final norm, the LM head). Wraps the stage's forward (to keep every
    layer's input) and its pointer loss."""
    from mllm.train.stage_heads import head_scores, pointer_targets

    numbers = torch.tensor(sorted(number_ids.values()))
    forward, pointer = stage._forward, stage._pointer_loss
    kept = {}

    def forward_keeping(batch, tokens, hidden_states=False):
        out = forward(batch, tokens, hidden_states=hidden_states)
        kept["hidden"] = out.hidden_states
        return out

    def with_roles(scenes, conversations, batch, hidden):
        out = pointer(scenes, conversations, batch, hidden)
        rows, at, targets, role = [], [], [], []  # every box position; its role (-1: none) and its cell
        for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
            ids = batch["input_ids"][b].tolist()
            written = 0
            for position, cell in pointer_targets(scene, conversation, ids, stage.tokenizer, stage.slots.grid, True):
                is_number = torch.isin(torch.tensor(ids[position + 1]), numbers).item()
                rows.append(b), at.append(position), targets.append(int(batch["image_starts"][b]) + cell)
                role.append(written if is_number and written < len(roles) else -1)
                written += is_number
                if ids[position + 1] == stage.tokenizer.convert_tokens_to_ids("]"):
                    written = 0  # the next box (a conversation may ground more than once)
        if not rows:
            return out
        rows, at, targets, role = (torch.tensor(v, device=hidden.device) for v in (rows, at, targets, role))
        attend, read = [], []
        for k, (layer_index, head) in enumerate(roles):
            layer = stage.model.llm.model.layers[layer_index]
            attention, hd = layer.self_attn, layer.self_attn.head_dim
            x = layer.input_layernorm(kept["hidden"][layer_index])  # (B, T, D)
            scores = head_scores(stage.model.llm, layer_index, x, batch, rows, at, head)  # (N, T)
            mine = role == k
            attend.append(F.cross_entropy(scores, torch.where(mine, targets, torch.zeros_like(targets))))
            if not mine.any():
                continue
            kv = head // attention.n_rep
            values = attention.v_proj(x)[..., kv * hd:(kv + 1) * hd]  # (B, T, hd)
            got = torch.einsum("nt,ntd->nd", scores[mine].softmax(-1).to(values.dtype), values[rows[mine]])
            written = got @ attention.o_proj.weight[:, head * hd:(head + 1) * hd].T  # (n, D)
            logits = stage.model.llm.lm_head(stage.model.llm.model.norm(written)).float()
            read.append(F.cross_entropy(logits, batch["input_ids"][rows[mine], at[mine] + 1]))
        out["pointer"] = out.get("pointer", 0.0) + sum(attend) / len(attend)
        if read:
            out["read_box"] = sum(read) / len(read)
        return out

    stage._forward = forward_keeping
    stage._pointer_loss = with_roles
