"""Preference pairs on small drawn images, in words of the tiny tokenizer's corpus (tests/conftest.py)."""

import base64
import io
import json
import random

import pytest
import torch
from PIL import Image, ImageDraw

PAIRS = [  # (shape, colour, chosen, rejected)
    ("ellipse", "red", "a red circle.", "a red circle and a blue square."),
    ("rectangle", "blue", "a blue square.", "a green star on the left and a yellow heart."),
    ("ellipse", "red", "There are 2 objects: a red circle and an orange cross.", "a blue square and a yellow heart."),
    ("rectangle", "blue", "a blue square on the left.", "a red circle and a yellow heart."),
    ("ellipse", "red", "a red circle on the left.", "a green star and a blue square."),
    ("rectangle", "blue", "a blue square and a blue square.", "a red circle."),
]


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory):
    """Folder with img/*.png and pairs.json: 6 pairs, one image large enough to be sliced, one given as base64."""
    root = tmp_path_factory.mktemp("pref_data")
    (root / "img").mkdir()
    records = []
    for i, (shape, colour, chosen, rejected) in enumerate(PAIRS):
        size = (250, 120) if i == 2 else (56 + 14 * (i % 3), 56)
        image = Image.new("RGB", size, "white")
        getattr(ImageDraw.Draw(image), shape)((8, 8, 44, 44), fill=colour)
        record = {"idx": 100 + i, "question": "Describe the image in detail.", "chosen": chosen, "rejected": rejected,
                  "metainfos": {"n": i}}
        if i == 4:  # speckled, so its PNG's base64 exceeds the 1000 characters that mark base64 data
            draw, rng = ImageDraw.Draw(image), random.Random(i)
            for _ in range(400):
                draw.point((rng.randrange(size[0]), rng.randrange(size[1])), fill=(rng.randrange(256), 0, 0))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            record["image"] = base64.b64encode(buffer.getvalue()).decode()
            assert len(record["image"]) > 1000
        else:
            image.save(root / "img" / f"{i}.png")
            record["image_path"] = f"img/{i}.png"
        records.append(record)
    (root / "pairs.json").write_text(json.dumps(records))
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Other processes share this machine's cores; one OpenMP thread avoids stalls at every barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def other_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with every LLM weight shifted by 0.02: same shapes and tokenizer, other log-probs."""
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.tokenization import load_tokenizer

    folder = tmp_path_factory.mktemp("other_ckpt")
    model = MLLMModel.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.02)
    model.save_pretrained(folder, tokenizer=load_tokenizer(tiny_checkpoint))
    return folder
