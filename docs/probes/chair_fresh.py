"""CHAIR of several models on one larger bench of fresh scenes, with paired bootstrap spreads against the first
model: the world's 300-scene bench holds ~12 hallucinating descriptions at CHAIRs 4 %, so a stage's -20 % is within
one standard error there.

    OMP_NUM_THREADS=2 nohup .venv/bin/python docs/probes/chair_fresh.py out=runs/chair_fresh scenes=1200 seed=9090 \
        base=runs/course16/base/model pref2=runs/pref2/preference/model [yesno=1] > runs/chair_fresh.log 2>&1 &

yesno=1: the yes/no test questions of those scenes too (two a scene), accuracy, acc+ and per kind.
"""
import json
import random
import sys
from pathlib import Path

from mllm.course.shared import answer_yesno, describe_and_score
from mllm.world.synth import generate


def per_caption(folder: Path) -> list[tuple[int, int, int]]:
    """(hallucinated mentions, mentions, hallucinating caption) per bench image, in bench order."""
    scored = json.loads((folder / "chair_greedy.json").read_text())
    return [(len(s["mscoco_hallucinated_words"]), len(s["mscoco_generated_words"]),
             int(bool(s["mscoco_hallucinated_words"]))) for s in scored["sentences"]]


def rates(rows) -> tuple[float, float]:
    return (sum(r[2] for r in rows) / len(rows), sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows)))


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out, n, seed = Path(args.pop("out")), int(args.pop("scenes", "1200")), int(args.pop("seed", "9090"))
    yesno = args.pop("yesno", "0") == "1"
    world = out / "world"
    generate(world, n_train=1, n_test=n, seed=seed, progress=False)
    results = {}
    for name, model in args.items():
        metrics = describe_and_score(Path(model), world, out / name)
        results[name] = (metrics, per_caption(out / name))
        print(name, {k: round(100 * v, 2) for k, v in metrics.items()}, flush=True)
        if yesno:
            answered = answer_yesno(Path(model), world, out / name)
            kinds = json.loads((out / name / "yesno.json").read_text()).get("categories", {})
            print(name, f"yes/no {answered['acc']:.3f} / acc+ {answered['acc_plus']:.3f} of {answered['n_questions']}",
                  {k: round(v["acc"], 3) for k, v in kinds.items()}, flush=True)
    names = list(results)
    first = results[names[0]][1]
    rng = random.Random(0)
    for name in names[1:]:
        other = results[name][1]
        draws = []
        for _ in range(2000):
            picked = [rng.randrange(n) for _ in range(n)]
            a, b = rates([first[i] for i in picked]), rates([other[i] for i in picked])
            draws.append((b[0] / max(a[0], 1e-9) - 1, b[1] / max(a[1], 1e-9) - 1))
        for k, label in enumerate(("CHAIRs", "CHAIRi")):
            values = sorted(d[k] for d in draws)
            print(f"{name} vs {names[0]}: {label} relative change {100 * (rates(other)[k] / rates(first)[k] - 1):+.1f} %"
                  f" (bootstrap 5-95 %: {100 * values[100]:+.1f} .. {100 * values[1899]:+.1f})", flush=True)
