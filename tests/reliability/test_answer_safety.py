"""`mllm answer` never destroys what a user owns and never mixes runs (issue: data safety). Through the CLI."""

import base64
import fcntl
import io
import json

from PIL import Image

from tests.eval.test_answer import write_questions


def mllm(*args: str) -> int:
    """The CLI in this process: its exit code (argparse's refusals exit with 2)."""
    from mllm.cli.main import main

    try:
        return main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


def answer(checkpoint, questions, out, *extra) -> int:
    return mllm("answer", "--model", checkpoint, "--questions", questions, "--out", out, "--batch-size", "2",
                "--max-new-tokens", "3", *extra)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_out_equal_to_questions_is_refused_and_untouched(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 3)
    before = questions.read_bytes()
    assert answer(tiny_checkpoint, questions, questions) != 0
    assert questions.read_bytes() == before
    assert "question file itself" in capsys.readouterr().err


def test_out_that_is_any_other_json_is_refused_and_untouched(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 3)
    other = tmp_path / "results.json"
    other.write_text(json.dumps({"CHAIRs": 0.3}, indent=1) + "\n")
    before = other.read_bytes()
    assert answer(tiny_checkpoint, questions, other) != 0
    assert other.read_bytes() == before
    assert f"{other}:1: not an answer line" in capsys.readouterr().err
    assert answer(tiny_checkpoint, questions, other, "--overwrite") == 0  # the user said so
    assert len(lines(other)) == 3


def test_out_that_is_a_directory_is_refused(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 2)
    assert answer(tiny_checkpoint, questions, tmp_path) != 0
    assert "is a directory" in capsys.readouterr().err


def test_bad_line_in_the_middle_is_an_error_and_nothing_is_cut(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 4)
    out = tmp_path / "answers.jsonl"
    assert answer(tiny_checkpoint, questions, out, "--limit", "3") == 0
    rows = out.read_text().splitlines()
    out.write_text(rows[0] + "\n" + "{garbage\n" + "\n".join(rows[1:]) + "\n")
    before = out.read_bytes()
    assert answer(tiny_checkpoint, questions, out) != 0
    assert out.read_bytes() == before
    assert f"{out}:2:" in capsys.readouterr().err


def test_answers_of_another_run_are_never_mixed(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 4)
    out = tmp_path / "answers.jsonl"
    assert answer(tiny_checkpoint, questions, out, "--limit", "2") == 0
    before = out.read_bytes()
    for changed in (["--max-new-tokens", "5"], ["--system-prompt", ""], ["--decoding", "beam"]):
        assert answer(tiny_checkpoint, questions, out, *changed) != 0
        assert out.read_bytes() == before
    err = capsys.readouterr().err
    assert "answers of another run" in err and "max_new_tokens" in err and "system_prompt" in err
    assert answer(tiny_checkpoint, questions, out, "--max-new-tokens", "5", "--overwrite") == 0
    rows = lines(out)
    assert len(rows) == 4 and {r["run"]["max_new_tokens"] for r in rows} == {5}


def test_answers_follow_questions_when_the_file_is_edited(tmp_path, tiny_checkpoint):
    questions = write_questions(tmp_path, 4)
    out = tmp_path / "answers.jsonl"
    assert answer(tiny_checkpoint, questions, out, "--limit", "2") == 0
    first = {r["qid"]: r["question"] for r in lines(out)}
    records = questions.read_text().splitlines()
    new = json.dumps({"image": json.loads(records[0])["image"], "question": "A new question on top?"})
    questions.write_text("\n".join([new] + records) + "\n")  # every old question moves one line down
    assert answer(tiny_checkpoint, questions, out) == 0
    rows = lines(out)
    assert len(rows) == 5 and len({r["qid"] for r in rows}) == 5
    by_question = {json.loads(r)["question"] for r in [new] + records}
    assert {r["question"] for r in rows} == by_question
    for row in rows:  # each answer still sits beside the question it answers
        assert first.get(row["qid"], row["question"]) == row["question"]


def test_a_second_process_on_the_same_output_fails_clearly(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 2)
    out = tmp_path / "answers.jsonl"
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # what a running `mllm answer` holds
        assert answer(tiny_checkpoint, questions, out) != 0
    assert "locked" in capsys.readouterr().err
    assert out.read_bytes() == b""
    assert answer(tiny_checkpoint, questions, out) == 0


def test_poison_records_are_skipped_with_their_line_and_the_rest_answered(tmp_path, tiny_checkpoint, capsys):
    questions = write_questions(tmp_path, 2)
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 MP: above the pixel limit, a few KB of PNG
    bomb64 = base64.b64encode(bomb.getvalue()).decode()
    assert len(bomb64) > 1000
    poison = [{"image": 7, "question": "q"}, {"image": None, "question": "q"}, {"image": ["a.png"], "question": "q"},
              {"image": bomb64, "question": "a bomb?"}, {"image": "imgs/nowhere.png", "question": "q"}]
    with open(questions, "a") as f:
        for record in poison:
            f.write(json.dumps(record) + "\n")
    with open(questions, "ab") as f:
        f.write(b'{"image": "imgs/0.png", "question": "caf\xe9?"}\n')  # latin-1, not UTF-8
    out = tmp_path / "answers.jsonl"
    assert answer(tiny_checkpoint, questions, out) == 0
    err = capsys.readouterr().err
    for line in (3, 4, 5, 6, 7):
        assert f"questions.jsonl:{line}:" in err
    assert "must be a string" in err and "pixels" in err and "questions.jsonl:8: not UTF-8" in err
    assert len(lines(out)) == 2


def test_logp_out_equal_to_data_or_any_non_cache_file_is_refused(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"question": "q", "chosen": "a", "rejected": "b", "image_path": "x.png"}],
                               indent=1) + "\n")
    other = tmp_path / "notes.jsonl"
    other.write_text('{"a": 1}\n{"b": 2}\n')
    for out in (data, other):
        before = out.read_bytes()
        assert mllm("logp", "--model", tiny_checkpoint, "--data_path", data, "--out", out, "--device", "cpu") != 0
        assert out.read_bytes() == before
    err = capsys.readouterr().err
    assert "data file itself" in err and f"{other}:1: not a log-probs cache" in err
