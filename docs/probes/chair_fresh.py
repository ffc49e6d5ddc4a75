"""CHAIR of several models on one larger bench of fresh scenes, with paired bootstrap spreads against the first
model: the world's 300-scene bench holds ~12 hallucinating descriptions at CHAIRs 4 %, so a stage's -20 % is within
one standard error there.

    OMP_NUM_THREADS=2 nohup .venv/bin/python docs/probes/chair_fresh.py out=runs/chair_fresh scenes=1200 seed=9090 \
        base=runs/course16/base/model pref2=runs/pref2/preference/model [yesno=1] > runs/chair_fresh.log 2>&1 &

yesno=1: the yes/no test questions of those scenes too (two a scene), accuracy, acc+ and per kind.
"""
import json
import sys
from pathlib import Path

from mllm.course.shared import answer_yesno, describe_and_score
from mllm.eval.chair import paired_change
from mllm.world.synth import generate

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out, n, seed = Path(args.pop("out")), int(args.pop("scenes", "1200")), int(args.pop("seed", "9090"))
    yesno = args.pop("yesno", "0") == "1"
    world = out / "world"
    generate(world, n_train=1, n_test=n, seed=seed, progress=False)
    sentences = {}
    for name, model in args.items():
        metrics = describe_and_score(Path(model), world, out / name)
        sentences[name] = json.loads((out / name / "chair_greedy.json").read_text())["sentences"]
        print(name, {k: round(100 * v, 2) for k, v in metrics.items()}, flush=True)
        if yesno:
            answered = answer_yesno(Path(model), world, out / name)
            kinds = json.loads((out / name / "yesno.json").read_text()).get("categories", {})
            print(name, f"yes/no {answered['acc']:.3f} / acc+ {answered['acc_plus']:.3f} of {answered['n_questions']}",
                  {k: round(v["acc"], 3) for k, v in kinds.items()}, flush=True)
    first, *others = sentences
    for name in others:
        for label, (change, low, high) in paired_change(sentences[first], sentences[name]).items():
            print(f"{name} vs {first}: {label} relative change {100 * change:+.1f} % "
                  f"(bootstrap 5-95 %: {100 * low:+.1f} .. {100 * high:+.1f})", flush=True)
