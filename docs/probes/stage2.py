"""Probe stage 2: vision tower + a 36-query resampler regress the stage-1 oracle slot vectors; LLM frozen."""
import sys

sys.path.insert(0, "docs/probes")
from common import *  # noqa
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.vision import pack_patch_strips
from safetensors.torch import load_file

CKPT = args.get("ckpt", "runs/probe/s1a.pt")
state = torch.load(CKPT)
llm.load_state_dict(state["llm"]); oracle.load_state_dict(state["oracle"])
LLM_LR = float(args.get("llm_lr", 0.0))  # > 0: the LLM is trained too (end to end), at this learning-rate multiple
AUX2 = float(args.get("aux2", 0.0))  # weight of the next-token loss on question tokens (with ellm)
for p in list(llm.parameters()) + list(oracle.parameters()):
    p.requires_grad_(False)
if LLM_LR:
    for p in llm.parameters():
        p.requires_grad_(True)
else:
    llm.eval()

mcfg = MLLMConfig.from_preset("tiny")
mcfg.llm.vocab_size = len(tok)
mcfg.query_num = Q
mcfg.slice.max_slice_nums = 1
mcfg.slice.scale_resolution = int(args.get("res", 112))  # the side of a view's area in pixels
mm = MLLMModel(mcfg)
base = load_file("mllm/assets/tiny-base/model.safetensors")
vpm_state = {k[4:]: v for k, v in base.items() if k.startswith("vpm.")}
print(mm.vpm.load_state_dict(vpm_state, strict=False))
vpm, res = mm.vpm, mm.resampler
if args.get("init2"):  # continue from an earlier stage-2 probe's vision tower and resampler
    s2 = torch.load(args["init2"])
    vpm.load_state_dict(s2["vpm"]); res.load_state_dict(s2["res"])
    if "llm" in s2 and args.get("init2_llm", "1") == "1":  # an end-to-end probe also trained the LLM (init2_llm=0: keep ckpt's)
        llm.load_state_dict(s2["llm"])
proc = ImageProcessor.from_config(mcfg.slice)
MSEW = float(args.get("msew", 1.0))  # weight of the slot regression
ELLM = float(args.get("ellm", 0.0))  # weight of the frozen-LLM loss on the text tasks


def views_of(scenes_images):
    strips, sizes = [], []
    for img in scenes_images:
        v = proc(img)
        assert len(v["pixel_values"]) == 1
        strips.append(v["pixel_values"][0]); sizes.append([int(x) for x in v["tgt_sizes"][0]])
    return strips, torch.tensor(sizes, dtype=torch.int32)


ATTNW = float(args.get("attnw", 0.0))  # weight of the attention prior: query i looks at the patches of cell i


def cell_masks(sizes, L):
    """(B, Q, L) 1 where patch t of view b lies in grid cell i (by its centre), else 0."""
    out = torch.zeros(len(sizes), Q, L)
    for b, (h, w) in enumerate(sizes.tolist()):
        r = torch.arange(h)[:, None].expand(h, w)
        c = torch.arange(w)[None, :].expand(h, w)
        cell = ((GRID * (2 * r + 1)) // (2 * h)) * GRID + (GRID * (2 * c + 1)) // (2 * w)  # (h, w)
        out[b, cell.reshape(-1), torch.arange(h * w)] = 1.0
    return out


ATTENTION = {}  # the resampler's head-averaged attention (B, Q, L) of its last call; it computes it anyway
res.attn.register_forward_hook(lambda module, inputs, output: ATTENTION.update(weights=output[1]))


def image_tokens(images, with_attention=False):
    strips, sizes = views_of(images)
    packed, mask = pack_patch_strips(strips)
    toks = res(vpm(packed, mask, sizes), sizes)
    weights = ATTENTION["weights"]
    if not with_attention:
        return toks  # (B, Q, D)
    on_cell = (weights.float() * cell_masks(sizes, weights.shape[-1])).sum(-1)  # (B, Q) attention mass on the cell
    return toks, -torch.log(on_cell + 1e-6).mean()


def render(rng):
    sc = S.sample_scene(rng, "x")
    return S.render_scene(sc)


def forward_img(ids, att, starts, toks):
    emb = llm.get_input_embeddings()(ids)
    idx_r = torch.arange(len(starts))[:, None].expand(-1, Q)
    idx_c = torch.tensor(starts)[:, None] + torch.arange(Q)
    emb = emb.index_put((idx_r, idx_c), toks.to(emb.dtype))
    return llm(inputs_embeds=emb, attention_mask=att).logits


erng2 = random.Random("heldout/stage2")
EVAL2 = []
for _ in range(300):
    img, sc = render(erng2)
    kind, pair = S.yesno_pair(sc, erng2)
    for q, a in pair:
        EVAL2.append((kind, img, sc, q, a))


@torch.no_grad()
def evaluate_img():
    vpm.eval(); res.eval(); llm.eval()
    hits = defaultdict(list)
    mse = []
    for k in range(0, len(EVAL2), 100):
        chunk = EVAL2[k:k + 100]
        items = [encode([(q, a)]) for _, _, _, q, a in chunk]
        ids, lab, aux, att, starts = batch_of(items)
        toks = image_tokens([img for _, img, _, _, _ in chunk])
        tgt = oracle([slots_of(sc) for _, _, sc, _, _ in chunk])
        mse.append(((toks - tgt) ** 2).mean().item() / tgt.var().item())
        with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
            logits = forward_img(ids, att, starts, toks).float()
        for i, (kind, _, _, _, a) in enumerate(chunk):
            pos = int(((lab[i] == YES) | (lab[i] == NO)).nonzero()[0])
            pred = "Yes" if logits[i, pos, YES] > logits[i, pos, NO] else "No"
            hits[kind].append(pred == a)
    vpm.train(); res.train()
    if LLM_LR:
        llm.train()
    r = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    r["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    r["nmse"] = sum(mse) / len(mse)
    return r


HEADW = float(args.get("headw", 0.0))  # weight of throwaway linear heads reading count and 3x3 place off each token
count_head, place_head = torch.nn.Linear(D, 6), torch.nn.Linear(D, 9)


def head_targets(scenes):
    """(B, Q) count index and 3x3 place index of the object whose centre lies in each cell (-100: empty cell)."""
    count = torch.full((len(scenes), Q), -100, dtype=torch.long)
    place = torch.full((len(scenes), Q), -100, dtype=torch.long)
    for b, sc in enumerate(scenes):
        for o in slots_of(sc):
            count[b, o[0]], place[b, o[0]] = o[-1], o[-2]
    return count, place


params = list(vpm.parameters()) + list(res.parameters())
if HEADW:
    params += list(count_head.parameters()) + list(place_head.parameters())
opt, sched = optimizer(params, 0.98, 50)
if LLM_LR:
    opt.add_param_group({"params": list(llm.parameters()), "lr": LR * LLM_LR, "initial_lr": LR * LLM_LR})
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [sched.lr_lambdas[0]] * 2)
    params = params + list(llm.parameters())
rng = random.Random("train/stage2")
log = open(OUT + ".log", "a")
t0 = time.process_time()
print(json.dumps({"step": 0, **evaluate_img()}), file=log, flush=True)
for step in range(1, STEPS + 1):
    pairs = [render(rng) for _ in range(BATCH)]
    with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
        toks, attn_loss = image_tokens([img for img, _ in pairs], with_attention=True)
    toks = toks.float()
    tgt = oracle([slots_of(sc) for _, sc in pairs])
    loss = MSEW * ((toks - tgt) ** 2).mean() / tgt.var() + ATTNW * attn_loss
    if HEADW:
        count_t, place_t = head_targets([sc for _, sc in pairs])
        loss = loss + HEADW * (F.cross_entropy(count_head(toks).reshape(-1, 6), count_t.reshape(-1), ignore_index=-100)
                               + F.cross_entropy(place_head(toks).reshape(-1, 9), place_t.reshape(-1), ignore_index=-100))
    if ELLM:
        items = [encode(turns_of(sc, rng, TURNS)) for _, sc in pairs]
        ids, lab, aux, att, starts = batch_of(items)
        with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
            logits = forward_img(ids, att, starts, toks).float()
        loss = loss + ELLM * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
        if AUX2:
            loss = loss + AUX2 * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), aux.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f} attn {attn_loss.item():.3f} cpu {time.process_time() - t0:.0f}s", file=log, flush=True)
    if step % 250 == 0 or step == STEPS:
        print(json.dumps({"step": step, "cpu_min": round((time.process_time() - t0) / 60, 2),
                          **{k: round(v, 3) for k, v in evaluate_img().items()}}), file=log, flush=True)
        torch.save({"vpm": vpm.state_dict(), "res": res.state_dict(), "step": step,
                    **({"llm": llm.state_dict(), "oracle": oracle.state_dict()} if LLM_LR else {})}, OUT + ".pt")
