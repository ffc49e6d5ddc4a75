"""The world's tokenizer corpus: the texts a fresh checkpoint's tokenizer is trained on."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mllm.world.synth import generate


def tokenizer_corpus(world: Path) -> list[str]:
    """Every text of the world's training files, plus digits and box syntax for grounding later."""
    texts = []
    for name in ("sft_train.json", "yesno_train.json", "preference_train.json"):
        for record in json.loads((world / name).read_text()):
            texts += [m["content"] for m in record.get("conversations", [])]
            texts += [record[k] for k in ("question", "chosen", "rejected") if k in record]
    texts += [json.loads(line)["expression"] for line in (world / "rec_train.jsonl").read_text().splitlines()]
    texts += [f"[{a},{b},{a + 7},{b + 3}]" for a in range(0, 1000, 37) for b in range(0, 1000, 91)]
    return texts


def default_corpus() -> list[str]:
    """Texts the tokenizer is trained on when none are given: a small synthetic world's training files."""
    with tempfile.TemporaryDirectory() as folder:
        generate(folder, n_train=100, n_test=0, seed=0, progress=False)
        return tokenizer_corpus(Path(folder))
