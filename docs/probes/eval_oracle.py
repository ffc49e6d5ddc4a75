"""Greedy descriptions and grounding of a stage-1 probe, the scene given as oracle slots (held-out scenes).

    .venv/bin/python docs/probes/eval_oracle.py ckpt=runs/probe/s1r.pt tie=1 cellw=1 cntw=total n=100
"""
import sys

sys.path.insert(0, "docs/probes")
from common import *  # noqa
from mllm.data.boxes import iou, parse_box
from mllm.model.decode import decode

state = torch.load(args["ckpt"])
llm.load_state_dict(state["llm"]); oracle.load_state_dict(state["oracle"])
llm.eval()
N = int(args.get("n", 100))
END = [tids["eos"]] + ([tok.eot_id] if getattr(tok, "eot_id", None) is not None else []) + \
      [tok.convert_tokens_to_ids("<|im_end|>")]


def prompt_of(question):
    item = encode([(question, "x")])
    first = int((item["labels"] != -100).nonzero()[0])  # labels are pre-shifted: ids[first + 1] is the answer
    return item["input_ids"][:first + 1], item["image_bound"]


@torch.no_grad()
def generate(questions, scenes, max_new):
    out = []
    for k in range(0, len(questions), 25):
        qs, scs = questions[k:k + 25], scenes[k:k + 25]
        prompts = [prompt_of(q) for q in qs]
        L = max(len(p) for p, _ in prompts)
        ids = torch.zeros(len(qs), L, dtype=torch.long); att = torch.zeros(len(qs), L, dtype=torch.long)
        starts = []
        for i, (p, bound) in enumerate(prompts):
            ids[i, L - len(p):] = p; att[i, L - len(p):] = 1  # left padding
            starts.append(L - len(p) + int(bound[0, 0]))
        emb = llm.get_input_embeddings()(ids)
        vec = oracle([slots_of(sc) for sc in scs])
        emb = emb.index_put((torch.arange(len(qs))[:, None].expand(-1, Q), torch.tensor(starts)[:, None] + torch.arange(Q)), vec)
        new = decode(llm, emb, att, max_new_tokens=max_new, eos_token_id=END, pad_token_id=0)
        out += [tok.decode([t for t in row.tolist() if t not in END and t != 0]) for row in new]
    return out


rng = random.Random("heldout/oracle-eval")
scenes = [make_scene(rng) for _ in range(N)]
texts = generate([S.DETAILED_PROMPTS[0]] * N, scenes, 160)
hit = tot = halluc = ment = 0
for sc, t in zip(scenes, texts):
    present = {o.category for o in sc.objects}
    said = set(S.mentioned_categories(t))
    hit += len(said & present); tot += len(present); halluc += len(said - present); ment += len(said)
print(f"describe: recall {hit / tot:.3f}  hallucinated {halluc / max(1, ment):.3f}  ({N} scenes)")
for sc, t in list(zip(scenes, texts))[:2]:
    print("  truth:", S.detailed_description(S.scene_mentions(sc, random.Random(0))))
    print("  model:", t)
qs, scs, boxes = [], [], []
for sc in scenes:
    for _ in range(5):
        i = rng.randrange(len(sc.objects))
        e = S.referring_expression(sc, i, rng)
        if e is not None:
            qs.append(GROUNDING_PROMPT.format(expression=e)); scs.append(sc)
            boxes.append(pixel_to_grid(sc.objects[i].bbox, sc.width, sc.height, square_pad=False))
            break
answers = generate(qs, scs, 24)
ious = [iou(parse_box(a)[0], b) if parse_box(a) else 0.0 for a, b in zip(answers, boxes)]
print(f"grounding: Acc@0.5 {sum(v >= 0.5 for v in ious) / len(ious):.3f}  mean IoU {sum(ious) / len(ious):.3f}  ({len(ious)})")
for q, a, b in list(zip(qs, answers, boxes))[:3]:
    print("  ", q[-60:], "->", a, "truth", [round(v) for v in b])
