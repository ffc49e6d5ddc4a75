"""Box coordinates as whole-number tokens, each looked up and written by an attention head of its own
(`stage_heads.box_role_losses`): targets by hand, the losses against the LLM's own attention and output, training;
and a grounding-only mix on a scene it finds nothing to ask about."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from mllm.data.grounding_prepare import GROUNDING_PROMPT
from mllm.data.lessons import LessonMix, tokenizer_texts
from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer, load_tokenizer
from mllm.train.base_recipe import BaseStage, StageSettings, collate, with_image_tokens
from mllm.train.scene_slots import SceneSlots
from mllm.train.stage_heads import box_role_targets, whole_number_ids
from mllm.world import scenes as S

BOX = "[375,375,625,625]"
GROUND = LessonMix(yesno=0.0, lookup=0.0, short=0.0, detailed=0.0, grounding=1.0, statements=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tokenizer_texts(40), vocab_size=512, whole_numbers=True)


def _scene():
    # 120 x 120: two red circles (top left, bottom right) and a blue star in the centre
    objs = (S.SceneObject("circle", "red", 20, 20, 20, 0, (10, 10, 30, 30)),
            S.SceneObject("star", "blue", 60, 60, 30, 0, (45, 45, 75, 75)),
            S.SceneObject("circle", "red", 100, 100, 20, 0, (90, 90, 110, 110)))
    return S.Scene("t", 120, 120, objs, 0)


def _stage(tmp_path, tokenizer, **kw):
    config = MLLMConfig.from_preset("tiny")
    config.llm.vocab_size, config.query_num = len(tokenizer), 4
    config.slice.max_slice_nums, config.use_image_id = 1, False
    torch.manual_seed(0)
    model = MLLMModel(config)
    slots = SceneSlots(tokenizer, config.llm.hidden_size, grid=2)
    kw = {"steps": 4, "batch": 4, "box_role_weight": 1.0} | kw
    settings = StageSettings(kind="read", lr=2e-3, trains={"llm": 1.0, "slots": 1.0}, lm_weight=1.0, warmup=2,
                             eval_every=100, eval_scenes=2, ground_scenes=0, describe_scenes=0, question_first=True,
                             **kw)
    return BaseStage(model, tokenizer, slots, settings, tmp_path), model


def test_whole_numbers_are_one_token_each_and_survive_saving(tokenizer, tmp_path):
    assert tokenizer.tokenize(BOX + " red") == ["[", "375", ",", "375", ",", "625", ",", "625", "]", "Ġred"]
    assert tokenizer.decode(tokenizer.encode("[87,5,999,0]", add_special_tokens=False)) == "[87,5,999,0]"
    ids = whole_number_ids(tokenizer)
    assert len(set(ids.tolist())) == 1000 and tokenizer.decode(ids[[7, 42, 999]]) == "742999"
    tokenizer.save_pretrained(tmp_path)
    assert torch.equal(whole_number_ids(load_tokenizer(tmp_path)), ids)
    digits = build_tokenizer(tokenizer_texts(40), vocab_size=512)
    assert digits.tokenize("375") == ["3", "7", "5"]  # MiniCPM-V's way, the default
    with pytest.raises(ValueError, match=r"splits 990 of them .*whole_numbers=True"):
        whole_number_ids(digits)


def test_box_role_targets_by_hand(tokenizer, tmp_path):
    stage, _ = _stage(tmp_path, tokenizer)
    conversation = [(GROUNDING_PROMPT.format(expression="the blue star"), BOX), (S.DETAILED_PROMPTS[0], "A star.")]
    ids = stage._encode(conversation)["input_ids"].tolist()
    targets = box_role_targets(_scene(), conversation, ids, tokenizer, 2, whole_number_ids(tokenizer))
    # the answer's tokens from "375" on, each predicted from the token before it; the star's centre is cell 3 of 2x2
    predicted = [tokenizer.decode([ids[position + 1]]) for position, _, _ in targets]
    assert predicted == ["375", ",", "375", ",", "625", ",", "625", "]"]
    assert [role for _, _, role in targets] == [0, -1, 1, -1, 2, -1, 3, -1]
    assert {cell for _, cell, _ in targets} == {3}
    assert tokenizer.decode([ids[targets[0][0]]]) == "["


def test_box_role_losses_are_each_heads_own_attention_and_output(tokenizer, tmp_path):
    heads = ((1, 0), (1, 3), (2, 1), (3, 2))
    stage, model = _stage(tmp_path, tokenizer, box_heads=heads)
    conversation = [(GROUNDING_PROMPT.format(expression="the blue star"), BOX)]
    batch = collate([stage._encode(conversation)], stage.pad_id)
    tokens = torch.randn(1, stage.query_num, model.config.llm.hidden_size)
    out = stage._forward(batch, tokens, hidden_states=True)
    numbers = whole_number_ids(tokenizer)
    from mllm.train.stage_heads import box_role_losses
    losses = box_role_losses(model.llm, out.hidden_states, [_scene()], [conversation], batch, tokenizer, 2, heads,
                             numbers)
    losses["box_read"].backward()  # the read trains the heads' own projections
    for layer_index, head in heads:
        attention = model.llm.model.layers[layer_index].self_attn
        hd = attention.head_dim
        assert attention.o_proj.weight.grad[:, head * hd:(head + 1) * hd].abs().sum() > 0
    targets = box_role_targets(_scene(), conversation, batch["input_ids"][0].tolist(), tokenizer, 2, numbers)
    start = int(batch["image_starts"][0])
    # the reference: the model's own attention weights (eager path) and each layer's attention output with every
    # other head cut from the output projection, then the final norm and the LM head
    with torch.no_grad():
        weights = model.llm(inputs_embeds=with_image_tokens(model, batch, tokens),
                            attention_mask=batch["attention_mask"], output_attentions=True).attentions
    llm, ids = model.llm.model, batch["input_ids"][0]
    attend, read = [], []
    for k, (layer_index, head) in enumerate(heads):
        looked_at = [start + cell if role == k else 0 for _, cell, role in targets]
        attend.append(-torch.stack([weights[layer_index][0, head, p, q].log()
                                    for (p, _, _), q in zip(targets, looked_at)]).mean())
        layer = llm.layers[layer_index]
        hd = layer.self_attn.head_dim
        with torch.no_grad():
            o_proj = layer.self_attn.o_proj.weight.clone()
            keep = torch.zeros_like(o_proj)
            keep[:, head * hd:(head + 1) * hd] = 1.0
            layer.self_attn.o_proj.weight.mul_(keep)
            T = ids.shape[0]
            cos, sin = llm.rotary_emb(torch.arange(T)[None], torch.float32)
            state = layer.self_attn(layer.input_layernorm(out.hidden_states[layer_index]), cos, sin, None, True)[0]
            layer.self_attn.o_proj.weight.copy_(o_proj)
            position = next(p for p, _, role in targets if role == k)
            read.append(F.cross_entropy(model.llm.lm_head(llm.norm(state))[0, position], ids[position + 1]))
    assert float(losses["box_attend"].detach()) == pytest.approx(float(torch.stack(attend).mean()), rel=1e-4)
    assert float(losses["box_read"].detach()) == pytest.approx(float(torch.stack(read).mean()), rel=1e-4)
    no_box = [(S.DETAILED_PROMPTS[0], "A star.")]
    batch = collate([stage._encode(no_box)], stage.pad_id)
    out = stage._forward(batch, tokens, hidden_states=True)
    assert box_role_losses(model.llm, out.hidden_states, [_scene()], [no_box], batch, tokenizer, 2, heads,
                           numbers) == {}


def test_head_scores_are_the_heads_own_attention_for_rows_of_several_samples_in_any_order(tokenizer, tmp_path):
    from mllm.train.stage_heads import head_scores

    stage, model = _stage(tmp_path, tokenizer)
    conversations = [[(GROUNDING_PROMPT.format(expression="the blue star"), BOX)],
                     [(S.DETAILED_PROMPTS[0], "A star. A red circle.")],  # longer: the others padded
                     [(GROUNDING_PROMPT.format(expression="the red circle in the top left"), BOX)]]
    batch = collate([stage._encode(c) for c in conversations], stage.pad_id)
    tokens = torch.randn(3, stage.query_num, model.config.llm.hidden_size)
    with torch.no_grad():
        out = stage._forward(batch, tokens, hidden_states=True)
        weights = model.llm(inputs_embeds=with_image_tokens(model, batch, tokens),
                            attention_mask=batch["attention_mask"], output_attentions=True).attentions
    lengths = batch["attention_mask"].sum(1)
    rows = torch.tensor([2, 0, 1, 2, 0, 1, 1])  # samples interleaved, as no caller has to sort them
    at = torch.stack([lengths[r] - 1 - k for k, r in enumerate(rows.tolist())])  # each sample's own last tokens
    layer_index, head = 2, 3
    layer = model.llm.model.layers[layer_index]
    with torch.no_grad():
        scores = head_scores(model.llm, layer_index, layer.input_layernorm(out.hidden_states[layer_index]), batch,
                             rows, at, head)  # (N, T)
    assert scores.shape == (len(rows), batch["input_ids"].shape[1])
    for n, (r, p) in enumerate(zip(rows.tolist(), at.tolist())):
        own = weights[layer_index][r, head, p]  # the layer's own softmax over the positions this one attends to
        assert torch.allclose(scores[n].softmax(-1), own, atol=1e-5), n
        assert bool((scores[n, p + 1:] == torch.finfo(torch.float32).min).all())  # causal: nothing after it


def test_a_stage_with_box_roles_learns_to_look_and_read(tokenizer, tmp_path, monkeypatch):
    from mllm.train import base_recipe

    monkeypatch.setattr(base_recipe, "fresh_scene", lambda rng: _scene())  # one scene: its three boxes to learn
    stage, model = _stage(tmp_path, tokenizer, steps=30, mix=GROUND, log_every=1, turns=2)
    stage.run(progress=lambda line: None)
    curve = [e for e in stage.curve() if "loss_box_read" in e]
    assert len(curve) == 30
    first, last = curve[0], curve[-5:]
    assert first["loss_box_read"] > math.log(1000) - 1.0  # a fresh model's number read is near uniform
    assert max(e["loss_box_attend"] for e in last) < 0.5 * first["loss_box_attend"]
    assert max(e["loss_box_read"] for e in last) < 0.5 * first["loss_box_read"]


def test_box_role_settings_name_what_is_wrong(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="4 different .layer, head. pairs"):
        StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0}, box_heads=((2, 2), (2, 2), (3, 2), (3, 3)))
    with pytest.raises(ValueError, match=r"this LLM has 4 layers of 4 query heads"):
        _stage(tmp_path, tokenizer, box_heads=((2, 2), (2, 3), (3, 2), (4, 0)))
    digits = build_tokenizer(tokenizer_texts(40), vocab_size=512)
    with pytest.raises(ValueError, match="whole_numbers=True"):
        _stage(tmp_path, digits)


def test_a_grounding_only_mix_drops_a_scene_it_finds_no_expression_for(tokenizer, tmp_path, monkeypatch):
    """A scene of look-alikes has no expression that picks out one object: a mix that only grounds gives it no
    turn. The stage trains on the rest of the batch (before: StopIteration in place_images, stopping the run)."""
    from mllm.data import lessons

    stage, _ = _stage(tmp_path, tokenizer, mix=GROUND, batch=2)
    original = lessons.grounding_turn
    monkeypatch.setattr(lessons, "grounding_turn",
                        lambda scene, rng: None if scene.image_id == "alike" else original(scene, rng))
    alike = S.drawn_scene(S.sample_scene(random.Random(1), "alike"))
    other = S.drawn_scene(S.sample_scene(random.Random(2), "other"))
    assert GROUND.turns(alike, random.Random(0), 4) == []
    seen = []
    forward = stage._forward
    monkeypatch.setattr(stage, "_forward", lambda batch, tokens, **kw: seen.append(len(tokens)) or
                        forward(batch, tokens, **kw))
    parts = stage.loss([alike, other], [None, None], random.Random(0))
    assert seen == [1] and math.isfinite(parts["total"].item()) and parts["answer"].item() > 0
