import sys
sys.path.insert(0, "docs/probes")
from common import *  # noqa

if args.get("init"):  # continue from an earlier probe's weights (a curriculum's next step)
    state = torch.load(args["init"])
    llm.load_state_dict(state["llm"])
    oracle.load_state_dict(state["oracle"])
params = list(llm.parameters()) + list(oracle.parameters())
opt, sched = optimizer(params, 0.95, 100)
rng = random.Random("train/stage1")
log = open(OUT + ".log", "a")
t0 = time.process_time(); w0 = time.time()
# curriculum=exinv:500 -> the first 500 steps draw their conversations from mix exinv, then from mix=
FIRST_MIX, FIRST_STEPS = (args["curriculum"].split(":") if args.get("curriculum") else (None, 0))
for step in range(1, STEPS + 1):
    scs = [make_scene(rng) for _ in range(BATCH)]
    if step <= int(FIRST_STEPS):
        items = [encode(turns_of(sc, rng, TURNS, FIRST_MIX), sc) for sc in scs]
    else:
        items = [encode(turns_of(sc, rng, TURNS), sc) for sc in scs]
    ids, lab, aux, att, starts = batch_of(items)
    with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
        logits = forward(ids, att, starts, [slots_of(sc) for sc in scs])
    logits = logits.float()
    la = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    lx = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), aux.reshape(-1), ignore_index=-100)
    loss = la + AUXW * lx
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step()
    if step % 50 == 0:
        print(f"step {step} loss {la.item():.3f} aux {lx.item():.3f} cpu {time.process_time() - t0:.0f}s "
              f"wall {time.time() - w0:.0f}s", file=log, flush=True)
    if step % 250 == 0 or step == STEPS:
        r = evaluate()
        print(json.dumps({"step": step, "cpu_min": round((time.process_time() - t0) / 60, 2),
                          "wall_min": round((time.time() - w0) / 60, 2), **{k: round(v, 3) for k, v in r.items()}}),
              file=log, flush=True)
        torch.save({"llm": llm.state_dict(), "oracle": oracle.state_dict(), "step": step}, OUT + ".pt")
