"""Base stages on lesson mixes that find nothing to ask about a scene."""

import math
import random

import torch

from mllm.data import lessons
from mllm.data.lessons import LessonMix, tokenizer_texts
from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer
from mllm.train.base_recipe import BaseStage, StageSettings
from mllm.train.scene_slots import SceneSlots
from mllm.world import scenes as S


def test_a_grounding_only_mix_drops_a_scene_it_finds_no_expression_for(tmp_path, monkeypatch):
    """A scene of look-alikes has no expression that picks out one object: a mix that only grounds gives it no
    turn. The stage trains on the rest of the batch (before: StopIteration in place_images, stopping the run)."""
    tokenizer = build_tokenizer(tokenizer_texts(30), vocab_size=512)
    config = MLLMConfig.from_preset("tiny")
    config.llm.vocab_size, config.query_num = len(tokenizer), 4
    config.slice.max_slice_nums, config.use_image_id = 1, False
    torch.manual_seed(0)
    model = MLLMModel(config)
    slots = SceneSlots(tokenizer, config.llm.hidden_size, grid=2)
    only_grounding = LessonMix(yesno=0.0, lookup=0.0, short=0.0, detailed=0.0, grounding=1.0, statements=False)
    settings = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0}, batch=2, mix=only_grounding,
                             lm_weight=1.0, eval_scenes=2, ground_scenes=0, describe_scenes=0)
    stage = BaseStage(model, tokenizer, slots, settings, tmp_path)
    original = lessons.grounding_turn
    monkeypatch.setattr(lessons, "grounding_turn",
                        lambda scene, rng: None if scene.image_id == "alike" else original(scene, rng))
    rng = random.Random(0)
    alike = S.drawn_scene(S.sample_scene(random.Random(1), "alike"))
    other = S.drawn_scene(S.sample_scene(random.Random(2), "other"))
    assert only_grounding.turns(alike, random.Random(0), 4) == []
    seen = []
    forward = stage._forward
    monkeypatch.setattr(stage, "_forward", lambda batch, tokens, **kw: seen.append(len(tokens)) or
                        forward(batch, tokens, **kw))
    parts = stage.loss([alike, other], [None, None], rng)
    assert seen == [1] and math.isfinite(parts["total"].item()) and parts["answer"].item() > 0
