"""Fault injection: kill -9 `mllm answer` and `mllm logp` at random points, resume, and compare with an
uninterrupted run: the same lines, nothing duplicated, nothing lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageDraw

from tests.eval.test_answer import write_questions

CLI = [sys.executable, "-c", "import sys; from mllm.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def kill_after(command, seconds: float) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(seconds)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def by_key(path, key):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [r[key] for r in rows]
    assert len(keys) == len(set(keys)), "a line was written twice"
    return {k: r for k, r in zip(keys, rows)}


@pytest.mark.parametrize("seed", [0, 1])
def test_answer_killed_at_random_points_resumes_to_the_uninterrupted_answers(tmp_path, tiny_checkpoint, seed):
    questions = write_questions(tmp_path, 16)
    args = ["answer", "--model", str(tiny_checkpoint), "--questions", str(questions), "--batch-size", "2",
            "--max-new-tokens", "12"]
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    subprocess.run(CLI + args + ["--out", str(straight)], check=True, capture_output=True, timeout=300)
    rng = random.Random(seed)
    for _ in range(3):  # three kills at random moments (start-up, mid-batch, mid-write)
        kill_after(CLI + args + ["--out", str(killed)], rng.uniform(2.0, 8.0))
    subprocess.run(CLI + args + ["--out", str(killed)], check=True, capture_output=True, timeout=300)
    a, b = by_key(straight, "qid"), by_key(killed, "qid")
    assert a.keys() == b.keys() and len(a) == 16
    assert all(a[k]["answer"] == b[k]["answer"] and a[k]["idx"] == b[k]["idx"] for k in a)


def test_logp_killed_at_random_points_resumes_to_the_uninterrupted_cache(tmp_path, tiny_checkpoint):
    (tmp_path / "img").mkdir()
    pairs = []
    for i in range(12):
        image = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 8 + 3 * i, 44), fill="red")
        image.save(tmp_path / "img" / f"{i}.png")
        pairs.append({"idx": i, "question": "Describe the image in detail.", "chosen": "a red circle.",
                      "rejected": "a red circle and a blue square.", "image_path": f"img/{i}.png"})
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs))
    args = ["logp", "--model", str(tiny_checkpoint), "--data_path", str(data), "--image_folder", str(tmp_path),
            "--batch_size", "1", "--device", "cpu"]
    straight, killed = tmp_path / "straight.logp.jsonl", tmp_path / "killed.logp.jsonl"
    subprocess.run(CLI + args + ["--out", str(straight)], check=True, capture_output=True, timeout=300)
    rng = random.Random(7)
    for _ in range(3):
        kill_after(CLI + args + ["--out", str(killed)], rng.uniform(2.0, 7.0))
    subprocess.run(CLI + args + ["--out", str(killed)], check=True, capture_output=True, timeout=300)
    a, b = straight.read_text().splitlines(), killed.read_text().splitlines()
    assert json.loads(a[0]) == json.loads(b[0])  # the same header
    rows_a, rows_b = {json.loads(x)["idx"]: x for x in a[1:]}, {json.loads(x)["idx"]: x for x in b[1:]}
    assert len(b) == len(a) == 13 and rows_a == rows_b  # byte-identical lines, none twice, none missing
