"""`mllm answer`: output fields, malformed lines, resuming after a torn write and after a real kill."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

from PIL import Image

from mllm.eval.answer import read_done, run


def write_questions(folder, n: int, bad_line: bool = False):
    (folder / "imgs").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        image = Image.new("RGB", (40 + 7 * i, 60), (200, 30 * (i % 8), 40))
        if i % 2:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            value = base64.b64encode(buffer.getvalue()).decode() + " " * 1000  # inline (> 1000 characters)
        else:
            image.save(folder / "imgs" / f"{i}.png")
            value = f"imgs/{i}.png"
        lines.append(json.dumps({"image": value.strip() if i % 2 == 0 else value, "question": f"Describe picture {i}.",
                                 "image_id": f"img_{i}", "extra": i}))
    if bad_line:
        lines.insert(2, "{not json")
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_answer_fields_and_malformed_line(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 4, bad_line=True)
    out = tmp_path / "answers.jsonl"
    stats = run(str(tiny_checkpoint), questions, out, batch_size=3, max_new_tokens=4, quiet=True)
    assert stats["answered"] == 4 and stats["skipped_lines"] == 1
    assert "questions.jsonl:3: not valid JSON" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["idx"] for r in rows) == [0, 1, 3, 4]  # idx = line number - 1
    row = rows[0]
    assert set(row) == {"idx", "question", "answer", "model", "metainfos", "image_id", "qid", "run"}
    assert row["run"]["decoding"] == "greedy" and row["run"]["max_new_tokens"] == 4
    assert row["metainfos"] == {"image_id": "img_0", "extra": 0}
    # A rerun has nothing left to do.
    assert run(str(tiny_checkpoint), questions, out, max_new_tokens=4, quiet=True)["answered"] == 0


def test_torn_last_line_is_cut_and_answered_again(tmp_path, tiny_checkpoint):
    questions = write_questions(tmp_path, 3)
    out = tmp_path / "answers.jsonl"
    run(str(tiny_checkpoint), questions, out, batch_size=1, max_new_tokens=3, limit=2, quiet=True)
    with open(out, "a") as f:
        f.write('{"idx": 2, "question": "Desc')  # a write cut short by a crash
    assert len(read_done(out)) == 2
    assert not out.read_text().endswith("Desc")
    run(str(tiny_checkpoint), questions, out, batch_size=1, max_new_tokens=3, quiet=True)
    assert sorted(json.loads(x)["idx"] for x in out.read_text().splitlines()) == [0, 1, 2]


def test_killed_run_resumes_with_every_question_answered_once(tmp_path, tiny_checkpoint):
    n = 24
    questions = write_questions(tmp_path, n)
    out = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "mllm.cli", "answer", "--model", str(tiny_checkpoint), "--questions",
               str(questions), "--out", str(out), "--batch-size", "1", "--max-new-tokens", "24",
               "--min-new-tokens", "24"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    answered_before = out.read_text().count("\n")
    assert 3 <= answered_before < n, "the run must be killed midway"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    idxs = [json.loads(line)["idx"] for line in out.read_text().splitlines()]
    assert sorted(idxs) == list(range(n))
