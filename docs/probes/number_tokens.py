"""Stop 39: box coordinates as number tokens, each read by a head of its own (`read_continue.py numbers=1 roles=`).

Stop 38 found why the first corner's digits stay at their prior: twelve roles (4 coordinates x 3 places) share the
ten digit tokens, and a head that finds the referred cell returns the same vector at every one of them. g2 showed that
a head whose *query* selects the role (the cell where its digit is written, a sink elsewhere) reads its digit from
the image. Here every coordinate is one token ("[87,123,...]": "87" and "123" whole), which leaves four roles, and
each gets its own query head: where the box's k-th number is written, head k attends to the referred object's cell
and reads the number from its output alone; at the box's other tokens it attends to the sequence's first token.

    add_number_tokens   the tokenizer learns "0".."999" as whole tokens; the LLM's embeddings and LM head grow,
                        the new rows a fixed random projection of the number's phases (`mllm.course.base.number_rows`,
                        as a fresh course model's; n1, n2 and n4 scaled the projection to the rows' mean norm instead
                        of each row to it)

The role heads' losses are the product's now (`StageSettings.box_role_weight`, `box_heads`;
`mllm.train.stage_heads.box_role_losses`); n1, n2 and n4 ran with this file's copy of them (commit 5bd8401).
"""
import torch

from mllm.course.base import number_rows


def add_number_tokens(model, tokenizer, seed: int = 0) -> dict[int, int]:
    """Give the tokenizer "0".."999" as whole tokens and the LLM rows for the new ones; {number: token id}."""
    tokenizer.add_tokens([str(n) for n in range(1000)])
    ids = {n: tokenizer.convert_tokens_to_ids(str(n)) for n in range(1000)}
    llm = model.llm
    old_embed, old_head = llm.get_input_embeddings().weight.data, llm.lm_head.weight.data
    old, new = old_embed.shape[0], len(tokenizer)
    if new == old:
        return ids
    rows = {}
    for k, (name, weight) in enumerate((("embed", old_embed), ("head", old_head))):
        made = number_rows(1000, weight.shape[1], float(weight.norm(dim=1).mean()), seed + k)
        rows[name] = torch.cat((weight, made[[n for n in range(1000) if ids[n] >= old]].to(weight.dtype)))
    embedding = torch.nn.Embedding(new, old_embed.shape[1])
    embedding.weight.data = rows["embed"]
    llm.set_input_embeddings(embedding)
    head = torch.nn.Linear(old_head.shape[1], new, bias=False)
    head.weight.data = rows["head"]
    llm.lm_head = head
    model.config.llm.vocab_size = new
    return ids
