"""The tiny base model shipped in the package, checked on freshly generated held-out scenes.

A stale or broken checkpoint (weights, tokenizer or config out of step with the code) fails here. Measured on
the course's 300 held-out scenes (README; stop 47's base): yes/no 0.910 / acc+ 0.863, Recall 75.7, CHAIRi 1.7, no
description echoing a prompt, grounding Acc@0.5 0.404; on these 60 fresh ones (seed 4242): yes/no 0.933 / acc+ 0.883
(120 questions), Recall 70.1, CHAIRi 1.5, grounding Acc@0.5 0.353 (215 expressions). A random checkpoint of the same
preset scores Recall ~0 and answers no question with yes or no. The bars sit some standard errors below what it
measures; the issue's targets (yes/no >= 0.90 with each kind >= 0.85) are not all reached by this checkpoint (count
.711), and this test does not pretend they are. The bases before it measured here: stop 46's yes/no 0.925 / acc+
0.867, Recall 71.4, grounding 0.372; stop 45's 0.908 / 0.833, 66.7, 0.251; stop 44's wrote a prompt into 26 of the
60 descriptions.
"""

import json

import pytest

from mllm.course.shared import answer_yesno, describe_and_score, ground_and_score
from mllm.model.loading import SHIPPED_MODEL, default_model_dir
from mllm.world.synth import generate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh_world")
    generate(folder, n_train=0, n_test=60, seed=4242, caption_noise=0.0, progress=False)
    return folder


def test_shipped_checkpoint_is_small_and_complete():
    folder = default_model_dir()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 0 < size <= 20 * 2**20
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()


def test_shipped_model_describes_what_it_sees(world, tmp_path):
    chair = describe_and_score(SHIPPED_MODEL, world, tmp_path)
    assert chair["Recall"] >= 0.60  # measured 0.701 (stop 47's base; stop 46's 0.714)
    assert 0.0 < chair["CHAIRi"] < 0.15  # trained on noisy captions, it hallucinates measurably
    # and writes no prompt into them ("... is in the image? answer in the image?": stop 44's base, 26 of these 60)
    assert chair["Echo"] <= 0.05


def test_shipped_model_answers_yes_or_no(world, tmp_path):
    result = answer_yesno(SHIPPED_MODEL, world, tmp_path)
    answers = [json.loads(line)["answer"] for line in (tmp_path / "yesno_answers.jsonl").read_text().splitlines()]
    assert result["n_questions"] == len(answers) > 100
    assert sum(a in ("Yes", "No") for a in answers) >= 0.95 * len(answers)
    # chance: 0.5 / 0.25; measured 0.933 / 0.883 (stop 47's base, ~0.023 a standard error; stop 46's 0.925 / 0.867)
    assert result["acc"] >= 0.85 and result["acc_plus"] >= 0.75


def test_shipped_model_grounds_referring_expressions(world, tmp_path):
    result = ground_and_score(SHIPPED_MODEL, world, tmp_path)
    assert result["n"] > 150 and result["parse_failure_rate"] < 0.05
    assert result["accuracy"] >= 0.28  # Acc@IoU>=0.5 from pixels (measured 0.353, ~0.033 a standard error)
