"""`--dtype bfloat16 --device cpu`: the shipped model's greedy answers against float32 on a fixed question set."""

import json
import random

from mllm.cli.main import main
from mllm.world import scenes


N = 120  # 80 yes/no questions, 40 short descriptions


def test_bf16_greedy_answers_agree_with_float32(tmp_path, capsys):
    rng = random.Random("bf16-agreement-large")
    lines = []
    for i in range(N):
        image, scene = scenes.render_scene(scenes.sample_scene(rng, f"b{i}"))
        image.save(tmp_path / f"{i}.png")
        question = rng.choice(scenes.yesno_pair(scene, rng)[1])[0] if i % 3 else rng.choice(scenes.SHORT_PROMPTS)
        lines.append(json.dumps({"id": i, "image": f"{i}.png", "question": question}))
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    answers = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.jsonl"
        assert main(["answer", "--questions", str(tmp_path / "q.jsonl"), "--out", str(out), "--device", "cpu",
                     "--dtype", dtype, "--max-new-tokens", "48", "--batch-size", "8"]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert {r["run"]["dtype"] for r in rows} == {dtype}
        answers[dtype] = {r["qid"]: r["answer"] for r in rows}
    same = {k for k in answers["float32"] if answers["float32"][k] == answers["bfloat16"][k]}
    yesno = {f"id:{i}" for i in range(N) if i % 3}
    print(f"bf16 vs fp32 greedy agreement: {len(same)}/{N} ({len(same & yesno)}/{len(yesno)} yes/no, "
          f"{len(same - yesno)}/{N - len(yesno)} short descriptions)")
    # bf16 rounding can flip a close call. Stop 47's shipped base: 117/120 (80/80, 37/40); stop 46's: 115/120
    # (80/80, 35/40); stop 45's: 109/120 (80/80, 29/40). Stop 43's: 110/120,
    # every yes/no answer the same (80/80); of the 40 short descriptions 30 the same, the other 10 part ways after
    # 1-17 words where the model is unsure (it repeats objects: "a purple ring, a purple ring, a purple ring and a
    # purple ring." against three rings). The base before it (yes/no near chance, descriptions sure): 117/120.
    assert len(same & yesno) >= 0.95 * len(yesno)
    assert len(same) >= 0.85 * N
