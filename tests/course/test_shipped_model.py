"""The tiny base model shipped in the package, checked on freshly generated held-out scenes.

A stale or broken checkpoint (weights, tokenizer or config out of step with the code) fails here. The bars
are a little below the numbers measured on 300 held-out scenes (README), to leave room for the smaller
sample drawn here.
"""

import pytest

from mllm.course import answer_yesno, describe_and_score, ground_and_score
from mllm.data.synth import generate
from mllm.model.loading import SHIPPED_MODEL, default_model_dir


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


def test_shipped_model_sees(world, tmp_path):
    yesno = answer_yesno(SHIPPED_MODEL, world, tmp_path)
    assert yesno["acc"] >= 0.85 and yesno["acc_plus"] >= 0.70
    chair = describe_and_score(SHIPPED_MODEL, world, tmp_path)
    assert chair["Recall"] >= 0.65
    assert chair["CHAIRi"] > 0.0  # trained on noisy captions, it hallucinates measurably


def test_shipped_model_grounds(world, tmp_path):
    result = ground_and_score(SHIPPED_MODEL, world, tmp_path, limit=60)
    assert result["n"] == 60 and result["accuracy"] > 0.0
