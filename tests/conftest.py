"""Shared fixtures: a tiny random checkpoint (model + tokenizer) built once per test session."""

import pytest
import torch

CORPUS = [
    "a red circle and a blue square.", "a green star on the left and a yellow heart.",
    "Is there a purple triangle in the image? Please answer yes or no.", "Yes", "No",
    "How many circles are there?", "There are 2 objects: a red circle and an orange cross.",
    "Describe the image in detail.", "Where is the blue star? [120,340,560,780]", "the top left corner",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder with a random small model (tiny preset shapes, 2 LLM layers) and its own tokenizer."""
    from mllm.model.random_checkpoint import make_random_checkpoint

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    make_random_checkpoint(folder, "tiny", texts=CORPUS * 20, vocab_size=300, seed=0)
    return folder
