"""Count questions only, on fresh scenes: seed 7070's 1,500 scenes (`chair_fresh.py`'s world), its 792 count
questions, answered by each model and split by how many objects of the asked category the scene holds
(`count_breakdown.py`). The bench of stops 49-52 ("792 fresh count questions").

    OMP_NUM_THREADS=2 .venv/bin/python docs/probes/count_bench.py out=runs/countbench \
        tune=runs/course26/base/tune/model base=mllm/assets/tiny-base

The world is generated once under out/world (and its count-only copy under out/count_world) and reused.
"""
import json
import subprocess
import sys
from pathlib import Path

from mllm.course.shared import answer_yesno
from mllm.world.synth import generate

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out, n, seed = Path(args.pop("out")), int(args.pop("scenes", "1500")), int(args.pop("seed", "7070"))
    world, counts = out / "world", out / "count_world"
    if not (world / "meta.json").is_file():
        generate(world, n_train=1, n_test=n, seed=seed, progress=False)
    if not (counts / "yesno_test.json").is_file():
        counts.mkdir(parents=True, exist_ok=True)
        for item in world.iterdir():  # the same scenes and images, only the count questions asked
            if item.name != "yesno_test.json" and not (counts / item.name).exists():
                (counts / item.name).symlink_to(item.resolve())
        questions = json.loads((world / "yesno_test.json").read_text())
        (counts / "yesno_test.json").write_text(json.dumps([q for q in questions if q["category"] == "count"]))
    answers = []
    for name, model in args.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        result = answer_yesno(Path(model), counts, out / name)
        print(f"{name}: count {result['acc']:.3f}, acc+ {result['acc_plus']:.3f} ({result['n_questions']} questions)",
              flush=True)
        answers.append(str(out / name / "yesno_answers.jsonl"))
    subprocess.run([sys.executable, str(Path(__file__).with_name("count_breakdown.py")), str(counts), *answers],
                   check=True)
