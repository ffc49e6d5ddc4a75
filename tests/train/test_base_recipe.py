"""The base recipe's parts: scenes as slot vectors (hand-worked), lesson batches, and the stages' training loop
(loss falls, the right parts change, a stopped stage resumes to the very weights of an uninterrupted one)."""

import hashlib
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer
from mllm.train import base_recipe
from mllm.train.base_recipe import BaseStage, StageSettings, collate, encode, with_image_tokens
from mllm.train.stage_heads import pointer_targets
from mllm.train.scene_slots import BOX_BINS, BOX_PERIODS, SceneSlots, box_phases, place_words, slot_features
from mllm.world import scenes as S
from mllm.data.boxes import format_box, iou, pixel_to_grid
from mllm.data.grounding_prepare import GROUNDING_PROMPT
from mllm.data.lessons import (COLOUR_NEXT, EXISTENCE_FIRST, LessonMix, answering_objects, described_objects,
                               fresh_scene, tokenizer_texts)
from mllm.model.tokenization import special_token_ids


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tokenizer_texts(60), vocab_size=1024)


def _model(tokenizer, seed=0):
    config = MLLMConfig.from_preset("tiny")
    config.llm.vocab_size = len(tokenizer)
    config.query_num = 4
    config.slice.max_slice_nums = 1
    config.use_image_id = False
    torch.manual_seed(seed)
    return MLLMModel(config)


def _scene():
    # 120 x 120: two red circles (top left, bottom right) and a blue star (centre of the middle row)
    objs = (S.SceneObject("circle", "red", 20, 20, 20, 0, (10, 10, 30, 30)),
            S.SceneObject("star", "blue", 60, 60, 30, 0, (45, 45, 75, 75)),
            S.SceneObject("circle", "red", 100, 100, 20, 0, (90, 90, 110, 110)))
    return S.Scene("t", 120, 120, objs, 0)


def test_slot_features_by_hand():
    feats = slot_features(_scene(), grid=2)
    # cell in the 2x2 grid, colour, category, size, 4 box bins of 25 over 0-1000, 3x3 place, count - 1
    colours, cats, cells = list(S.COLOURS), list(S.CATEGORIES), sorted(S.CELL_PHRASES)
    assert feats[0] == (0, colours.index("red"), cats.index("circle"), 0,
                        10 * 1000 // 120 * BOX_BINS // 1000, 2, 6, 6, cells.index((0, 0)), 1)
    assert feats[1][0] == 3 and feats[1][8] == cells.index((1, 1)) and feats[1][9] == 0  # one star
    assert feats[2][0] == 3 and feats[2][9] == 1  # the second circle also says "two"
    assert place_words((0, 0)) == ("top", "left")


def test_slot_vectors_are_the_llm_word_embeddings_plus_learnt_parts(tokenizer):
    slots = SceneSlots(tokenizer, 8, grid=2)
    embedding = torch.randn(len(tokenizer), 8)
    scene = S.Scene("t", 120, 120, _scene().objects[:1], 0)
    out = slots([scene], embedding)

    def word(w):
        return embedding[tokenizer.encode(" " + w, add_special_tokens=False)].sum(0)

    f = slot_features(scene, 2)[0]
    expected = (slots.cell.weight[0] + word("red") + word("circle") + word("small") + word("top") + word("left")
                + word("one") + slots.colour_category.weight[f[1] * len(S.CATEGORIES) + f[2]]
                + sum(slots.box.weight[f[4 + k] + k * BOX_BINS] for k in range(4)))
    assert torch.allclose(out[0, 0], expected, atol=1e-5)
    assert torch.equal(out[0, 1:], slots.cell.weight[1:])  # empty cells say only where they are



def test_slots_without_count_words_leave_out_the_count_word_and_its_read_back(tokenizer):
    from mllm.train.scene_slots import READOUT_SCALE

    slots = SceneSlots(tokenizer, 8, grid=2)
    embedding = torch.randn(len(tokenizer), 8)
    scenes = [S.Scene("t", 120, 120, _scene().objects[:1], 0)]
    counted = slots(scenes, embedding)
    slots.count_words = False
    uncounted = slots(scenes, embedding)
    one = embedding[tokenizer.encode(" one", add_special_tokens=False)].sum(0)
    assert torch.allclose(counted[0, 0] - uncounted[0, 0], one, atol=1e-5)  # the count word alone is gone
    assert torch.equal(counted[0, 1:], uncounted[0, 1:])
    # the read-back: the colour and category terms alone, each by hand
    f = torch.tensor(slot_features(scenes[0], 2))
    content = uncounted[:, f[:, 0]][0] - slots.cell.weight[f[:, 0]]
    expected = []
    for table, column in ((slots.colours, 1), (slots.categories, 2)):
        words = table(torch.arange(len(table.ids)), embedding)
        logits = READOUT_SCALE * (content @ words.T) / words.pow(2).sum(-1).mean()
        expected.append(torch.nn.functional.cross_entropy(logits, f[:, column]))
    assert torch.allclose(slots.readout_loss(scenes, uncounted, embedding), torch.stack(expected).mean(), atol=1e-5)
    slots.count_words = True
    assert not torch.allclose(slots.readout_loss(scenes, uncounted, embedding), torch.stack(expected).mean())

def test_the_fourier_box_code_puts_each_digit_of_each_coordinate_in_the_angle_of_one_pair(tokenizer):
    values = torch.tensor([[0, 372, 999, 1000], [58, 407, 610, 95]])
    phases = box_phases(values).reshape(2, 4, len(BOX_PERIODS), 2)  # (cos, sin) per coordinate and period
    turns = torch.atan2(phases[..., 1], phases[..., 0]) % (2 * math.pi) / (2 * math.pi)  # (2, 4, 3) in [0, 1)
    sectors = (10 * turns + 1e-4).floor().long() % 10  # (1e-4: a digit's first angle lands a hair under it)
    for n in range(2):
        for k in range(4):
            v = int(values[n, k])
            assert sectors[n, k].tolist() == [v // 100 % 10, v // 10 % 10, v % 10]  # hundreds, tens, units
    slots = SceneSlots(tokenizer, 8, grid=2, box_code="fourier")
    embedding = torch.randn(len(tokenizer), 8)
    scene = S.Scene("t", 120, 120, _scene().objects[:1], 0)  # the red circle, box (10, 10, 30, 30) of 120 x 120
    out = slots([scene], embedding)
    weight = slots.box_fourier.weight.detach().clone()  # (8, 24)
    with torch.no_grad():
        slots.box_fourier.weight.zero_()
        slots.box.weight.normal_()  # the bins' table plays no part
    without = slots([scene], embedding)
    box = torch.tensor([pixel_to_grid((10, 10, 30, 30), 120, 120, square_pad=False)])
    assert box.tolist() == [[83, 83, 250, 250]]
    assert torch.allclose(out[0, 0] - without[0, 0], (box_phases(box) @ weight.T)[0], atol=1e-5)
    assert torch.equal(out[0, 1:], without[0, 1:])
    with pytest.raises(ValueError, match="box_code must be one of"):
        SceneSlots(tokenizer, 8, grid=2, box_code="digits")


def test_the_number_code_is_smooth_in_one_subspace_and_each_coordinate_reads_back_through_its_rotation(tokenizer,
                                                                                                        tmp_path):
    from mllm.train.scene_slots import NUMBER_CODE_DIM, NUMBER_CODE_NORM, number_code, role_rotations

    codes = number_code(64, seed=0)
    assert codes.shape == (1000, 64) and torch.allclose(codes.norm(dim=1), torch.ones(1000), atol=1e-5)
    cosine = lambda gap: float((codes[:-gap] * codes[gap:]).sum(1).mean())  # noqa: E731
    assert cosine(1) > 0.95 and 0.3 < cosine(50) < 0.7 and abs(cosine(250)) < 0.05
    assert int(torch.linalg.matrix_rank(codes, rtol=1e-4)) == NUMBER_CODE_DIM  # within one head's reach
    assert torch.equal(number_code(64, seed=0), codes) and not torch.allclose(number_code(64, seed=1), codes)
    slots = SceneSlots(tokenizer, 256, grid=2, box_code="number", code_seed=0)  # the tiny LLM's width
    scene = S.Scene("t", 120, 120, _scene().objects[:1], 0)  # the red circle, box [83, 83, 250, 250]
    codes, rotations = number_code(256, seed=0), role_rotations(256, seed=0)
    part = slots._box_part([scene], torch.zeros(1, 4, dtype=torch.long))[0]
    expected = sum(NUMBER_CODE_NORM * rotations[k] @ codes[v] for k, v in enumerate((83, 83, 250, 250)))
    assert torch.allclose(part, expected, atol=1e-5)
    second = S.Scene("t", 120, 120, (S.SceneObject("star", "blue", 60, 60, 30, 0, (45, 20, 75, 110)),), 0)
    part = slots._box_part([second], torch.zeros(1, 4, dtype=torch.long))[0]  # [375, 166, 625, 916]
    # each coordinate read through its own rotation alone (the other three leak in: measured 1-12 off; a learnt map
    # can do better), against a spread of ~200
    for k, v in enumerate((375, 166, 625, 916)):
        assert abs(int((slots.box_codes[k] @ part).argmax()) - v) <= 15
    from safetensors.torch import load_file, save_file  # fixed, but saved with the slots: a resumed stage reads
    save_file(slots.state_dict(), str(tmp_path / "slots.safetensors"))  # the same code
    assert torch.equal(load_file(str(tmp_path / "slots.safetensors"))["box_codes"], slots.box_codes)


def test_the_number_box_code_is_read_back_by_its_own_loss(tokenizer):
    from mllm.train.scene_slots import BOX_READOUT_SCALE, NUMBER_CODE_NORM

    torch.manual_seed(0)
    wide = SceneSlots(tokenizer, 256, grid=6, box_code="number")
    embedding = torch.randn(len(tokenizer), 256) / 32  # words of norm ~0.5, as a trained tiny LLM's (0.55)
    scenes = [S.drawn_scene(S.sample_scene(random.Random(i), "x")) for i in range(8)]
    true = wide(scenes, embedding).detach()
    expected = []  # by hand, scene 0: each object's cell content against each coordinate's 1000 codes
    for obj, features in zip(scenes[0].objects, slot_features(scenes[0], 6)):
        content = true[0, features[0]] - wide.cell.weight[features[0]].detach()
        box = pixel_to_grid(obj.bbox, scenes[0].width, scenes[0].height, square_pad=False)
        for k in range(4):
            logits = BOX_READOUT_SCALE * (wide.box_codes[k] @ content) / NUMBER_CODE_NORM ** 2
            expected.append(-torch.log_softmax(logits, 0)[min(999, box[k])])
    by_role = torch.tensor(expected).reshape(-1, 4).mean(0).mean()  # the mean over objects, then over roles
    assert torch.allclose(wide.box_readout_loss(scenes[:1], true[:1]), by_role, atol=1e-4)
    # from the true slots ~ln 40 (measured 3.79: a code's neighbours within ~30 score nearly as high), chance ln 1000
    coordinates = wide.box_readout_loss(scenes, true)
    assert coordinates < math.log(1000) - 2.5
    assert coordinates < 0.6 * wide.box_readout_loss(scenes, torch.randn_like(true) * true.std())  # noise: 7.63
    plain = SceneSlots(tokenizer, 256, grid=6)
    plain.load_state_dict(wide.state_dict(), strict=False)  # the words' read-back leaves the box out
    assert torch.allclose(wide.readout_loss(scenes, true, embedding), plain.readout_loss(scenes, true, embedding))
    with pytest.raises(ValueError, match="reads the number code"):
        plain.box_readout_loss(scenes, true)


def test_lessons_ask_before_the_statements_and_write_after_them_and_noise_adds_an_absent_object():
    rng = random.Random(0)
    scene = S.drawn_scene(S.sample_scene(rng, "x"))
    writing = set(S.SHORT_PROMPTS) | set(S.DETAILED_PROMPTS)
    orders = set()
    for _ in range(40):
        turns = LessonMix().turns(scene, rng, 4)
        kinds = [1 if q == "Which of these are in the image?" else 2 if q in writing or q.startswith("Where is the")
                 and "format" in q else 0 for q, _ in turns]
        assert len(turns) == 4 and kinds.count(1) == 1 and kinds == sorted(kinds)
        orders.add(tuple(kinds))
    assert (0, 0, 0, 1) in orders and (1, 2, 2, 2) in orders and len(orders) >= 4
    present = {o.category for o in scene.objects}
    noisy = LessonMix(yesno=0, lookup=0, short=1, detailed=0, grounding=0, statements=False, caption_noise=1.0)
    for _ in range(5):
        (_, text), = noisy.turns(scene, rng, 1)
        assert len(set(S.mentioned_categories(text)) - present) == 1


def test_a_share_of_conversations_is_one_writing_turn_alone_as_an_evaluation_asks_it():
    scene = S.drawn_scene(S.sample_scene(random.Random(5), "x"))
    rng = random.Random(0)
    conversations = [LessonMix(alone=0.3).turns(scene, rng, 4) for _ in range(400)]
    alone = [turns for turns in conversations if len(turns) == 1]
    assert 90 <= len(alone) <= 150  # 0.3 of 400
    assert all(answer not in ("Yes", "No") and not question.startswith("Is there") for (question, answer), in alone)
    assert all(len(turns) == 4 for turns in conversations if len(turns) != 1)
    # the default mix draws exactly as before the option existed
    a, b = random.Random(1), random.Random(1)
    assert LessonMix().turns(scene, a, 4) == LessonMix(alone=0.0).turns(scene, b, 4) and a.random() == b.random()


def test_grounding_alone_with_no_expression_falls_back_to_a_full_conversation(monkeypatch):
    from mllm.data import lessons

    monkeypatch.setattr(lessons, "grounding_turn", lambda scene, rng: None)
    mix = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=1.0, alone=1.0)
    turns = mix.turns(S.drawn_scene(S.sample_scene(random.Random(5), "x")), random.Random(0), 4)
    assert len(turns) == 4 and all(answer in ("Yes", "No") for _, answer in turns[:3])


def test_a_scene_with_no_question_of_the_asked_kind_gives_fewer_turns_not_a_hang():
    from mllm.data.lessons import yesno_turn

    # six circles in all six colours: no colour can be swapped in, so no colour question exists (it hung before)
    circles = tuple(S.SceneObject("circle", colour, 20 + 15 * i, 20, 10, 0, (10 + 15 * i, 10, 30 + 15 * i, 30))
                    for i, colour in enumerate(S.COLOURS))
    scene = S.Scene("c", 120, 60, circles, 0)
    assert len(circles) == 6 and yesno_turn(scene, random.Random(0), ("color",)) is None
    mix = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0, yesno_kinds=("color",))
    turns = mix.turns(scene, random.Random(0), 4)
    assert len(turns) == 1 and turns[0][0] == "Which of these are in the image?"  # the statements turn alone


def test_answering_objects_by_hand_and_yes_exactly_when_one_answers():
    scene = _scene()  # red circle top left, blue star in the center, red circle bottom right
    yn = S.YESNO_SUFFIX
    cases = {"Is there a star in the image?" + yn: [False, True, False],
             "Is there a blue circle in the image?" + yn: [False, False, False],
             "Is there a red circle in the image?" + yn: [True, False, True],
             "Are there exactly two circles in the image?" + yn: [True, False, True],
             "Is there exactly one circle in the image?" + yn: [False, False, False],
             "Is the blue star in the center of the image?" + yn: [False, True, False],
             "Is the blue star in the top left of the image?" + yn: [False, False, False],
             "What colour is the star?": [False, True, False],
             "How many circles are there?": [True, False, True],
             GROUNDING_PROMPT.format(expression="the red circle in the top left"): [True, False, False],
             "Describe the image briefly.": None}
    for question, hits in cases.items():
        assert answering_objects(scene, question) == hits, question
    rng = random.Random(0)
    for _ in range(300):
        scene = fresh_scene(rng)
        for question, answer in S.yesno_pair(scene, rng)[1]:
            assert any(answering_objects(scene, question)) == (answer == "Yes"), question


def test_collate_masks_the_image_span_from_the_next_token_targets(tokenizer):
    ids = special_token_ids(tokenizer)
    items = [encode([("Is there a circle in the image?", "Yes")], tokenizer, ids, 4),
             encode([("Describe the image briefly.", "a red circle.")] * 2, tokenizer, ids, 4)]
    batch = collate(items, 0)
    assert batch["input_ids"].shape[1] % 32 == 0
    for i, item in enumerate(items):
        start, end = (int(v) for v in item["image_bound"][0])
        assert int(batch["image_starts"][i]) == start and end - start == 4
        assert (batch["lm_labels"][i, start - 1:end] == -100).all()
        n = len(item["input_ids"])
        assert torch.equal(batch["lm_labels"][i, end:n - 1], item["input_ids"][end + 1:n])
        assert torch.equal(batch["labels"][i, :n], item["labels"])


def test_question_first_puts_the_image_after_the_first_question_only(tokenizer):
    ids = special_token_ids(tokenizer)
    turns = [("Is there a circle in the image?", "Yes"), ("How many stars are there?", "1")]
    first, after = encode(turns, tokenizer, ids, 4), encode(turns, tokenizer, ids, 4, question_first=True)
    assert torch.equal(torch.sort(first["input_ids"]).values, torch.sort(after["input_ids"]).values)  # same tokens
    for item, before_image in ((first, False), (after, True)):
        start = int(item["image_bound"][0][0])
        text_before = tokenizer.decode(item["input_ids"][:start])
        assert ("Is there a circle in the image?" in text_before) == before_image
        assert "How many stars" not in text_before


def test_match_loss_is_the_weighted_cross_entropy_of_the_cells_answering_the_first_question(tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, question_first=True, match_weight=1.0)
    conversations = [[("Is there a star in the image? Please answer yes or no.", "Yes")],  # the star: cell 3
                     [("Is there exactly one circle in the image? Please answer yes or no.", "No")],  # none
                     [("Describe the image briefly.", "two red circles and a blue star.")],  # not asked: left out
                     [("What colour is the star?", "blue"), ("Is there a square in the image?", "No")]]  # cell 3
    scenes = [_scene()] * len(conversations)
    batch = collate([stage._encode(c) for c in conversations], stage.pad_id)
    width = model.config.llm.hidden_size
    with torch.no_grad():
        stage.match_head.weight.zero_()
        stage.match_head.bias.zero_()
    hidden = torch.zeros(len(scenes), batch["input_ids"].shape[1], width)
    # a head that outputs 0 everywhere: each target costs log 2 x 20, each other cell log 2; 3 rows x 4 cells kept
    loss = stage._match_loss(scenes, conversations, batch, hidden)
    assert float(loss.detach()) == pytest.approx(math.log(2) * (2 * 20 + 10) / 12, rel=1e-6)
    # a head reading one feature that is high exactly on the right cells: no loss left
    with torch.no_grad():
        stage.match_head.weight[0, 0] = 1.0
    right = torch.tensor([[-30, -30, -30, 30], [-30, -30, -30, -30], [0, 0, 0, 0], [-30, -30, -30, 30]],
                         dtype=torch.float)
    for b in range(len(scenes)):
        start = int(batch["image_starts"][b])
        hidden[b, start:start + 4, 0] = right[b]
    assert float(stage._match_loss(scenes, conversations, batch, hidden).detach()) < 1e-9
    hidden[0, int(batch["image_starts"][0]) + 2, 0] = 30  # a cell holding nothing asked flagged
    assert float(stage._match_loss(scenes, conversations, batch, hidden).detach()) > 2.0
    assert stage._match_loss(scenes[2:3], conversations[2:3], collate([stage._encode(conversations[2])], 0),
                             hidden[2:3]) is None


DESCRIPTION = ("The image shows three objects on a light background. A small red circle is in the top left. A small "
               "green moon is on the left. A small blue star is in the center. A small red circle is in the bottom "
               "right.")


def test_described_objects_gives_each_sentence_or_item_its_object():
    scene = _scene()
    spans = described_objects(scene, DESCRIPTION)  # the count sentence and the absent moon's sentence: none
    assert [(DESCRIPTION[a:b], index) for a, b, index in spans] == [
        ("A small red circle is in the top left. ", 0), ("A small blue star is in the center. ", 1),
        ("A small red circle is in the bottom right.", 2)]
    short = "a red circle, a blue star and a red circle."
    assert [(short[a:b], i) for a, b, i in described_objects(scene, short)] == [
        ("a red circle, ", 0), ("a blue star and ", 1), ("a red circle.", 2)]
    assert [i for _, _, i in described_objects(scene, "a blue star.")] == [1]  # the circles not named


def test_pointer_targets_are_the_cells_of_the_objects_the_next_tokens_describe(tokenizer):
    scene, ids = _scene(), special_token_ids(tokenizer)
    conversation = [("Is there a star in the image? Please answer yes or no.", "Yes"),
                    (S.DETAILED_PROMPTS[0], DESCRIPTION)]
    item = encode(conversation, tokenizer, ids, 4, question_first=True)
    tokens = item["input_ids"].tolist()
    targets = pointer_targets(scene, conversation, tokens, tokenizer, grid=2)
    about = {}
    for position, cell in targets:  # what each cell's positions predict, in order
        about.setdefault(cell, []).append(tokenizer.decode(tokens[position + 1:position + 2]))
    # the circles' cells 0 and 3 (the second circle shares the star's cell), each token once
    assert "".join(about[0]).strip() == "A small red circle is in the top left."
    assert "".join(about[3]).strip() == ("A small blue star is in the center. A small red circle is in the bottom "
                                         "right.")
    assert len({p for p, _ in targets}) == len(targets)
    assert pointer_targets(scene, conversation[:1], tokens, tokenizer, grid=2) == []  # no description, no target
    # with boxes: a grounding answer's tokens (all but its first) at the referred object's cell, the star's
    grounding = [(GROUNDING_PROMPT.format(expression="the blue star"), "[375,375,625,625]")]
    tokens = encode(grounding, tokenizer, ids, 4, question_first=True)["input_ids"].tolist()
    assert pointer_targets(scene, grounding, tokens, tokenizer, grid=2) == []
    boxed = pointer_targets(scene, grounding, tokens, tokenizer, grid=2, boxes=True)
    assert {cell for _, cell in boxed} == {3}
    assert "".join(tokenizer.decode(tokens[p + 1:p + 2]) for p, _ in boxed) == "375,375,625,625]"
    unclear = [(GROUNDING_PROMPT.format(expression="the red circle"), "[83,83,250,250]")]  # two red circles
    assert pointer_targets(scene, unclear, encode(unclear, tokenizer, ids, 4)["input_ids"].tolist(), tokenizer,
                           grid=2, boxes=True) == []


def test_pointer_loss_is_the_cross_entropy_over_the_image_cells(tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0)
    conversations = [[(S.DETAILED_PROMPTS[0], DESCRIPTION)], [("Is there a star in the image?", "Yes")]]
    scenes = [_scene()] * 2
    batch = collate([stage._encode(c) for c in conversations], stage.pad_id)
    hidden = torch.zeros(2, batch["input_ids"].shape[1], model.config.llm.hidden_size)
    with torch.no_grad():
        for layer in stage.pointer_head.values():
            layer.weight.zero_()
            layer.bias.zero_()
    # a head that scores every cell alike: log 4 at every target position
    assert float(stage._pointer_loss(scenes, conversations, batch, hidden)["pointer"].detach()) == pytest.approx(
        math.log(4))
    # query and key read feature 0 and 1; the text positions hold which cell is next, the cells who they are
    targets = pointer_targets(scenes[0], conversations[0], batch["input_ids"][0].tolist(), tokenizer, grid=2)
    with torch.no_grad():
        stage.pointer_head["query"].weight[:4, :4] = torch.eye(4) * 40
        stage.pointer_head["key"].weight[:4, :4] = torch.eye(4) * 40
    start = int(batch["image_starts"][0])
    hidden[0, start:start + 4, :4] = torch.eye(4)
    for position, cell in targets:
        hidden[0, position, cell] = 1.0
    assert float(stage._pointer_loss(scenes, conversations, batch, hidden)["pointer"].detach()) < 1e-6
    assert stage._pointer_loss(scenes[1:], conversations[1:], collate([stage._encode(conversations[1])], 0),
                               hidden[1:]) == {}


def test_the_attention_pointer_is_minus_log_the_llm_heads_own_weight_on_the_target_cell(tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0, pointer_attention=True,
                         pointer_layer=1)
    assert stage.pointer_head is None  # no throwaway head: the LLM's layer 1, head 0 is taught
    conversations = [[(S.DETAILED_PROMPTS[0], DESCRIPTION)], [("Is there a star in the image?", "Yes")]]
    scenes = [_scene()] * 2
    batch = collate([stage._encode(c) for c in conversations], stage.pad_id)
    tokens = torch.randn(2, stage.query_num, model.config.llm.hidden_size)
    out = stage._forward(batch, tokens, hidden_states=True)
    loss = stage._pointer_loss(scenes, conversations, batch, out.hidden_states[1])["pointer"]
    # the reference: the model's own attention weights (eager path), layer 1, query head 0
    with torch.no_grad():
        embeds = with_image_tokens(model, batch, tokens)
        weights = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                            output_attentions=True).attentions[1][:, 0]  # (B, T, T)
    targets = pointer_targets(scenes[0], conversations[0], batch["input_ids"][0].tolist(), tokenizer, grid=2)
    start = int(batch["image_starts"][0])
    expected = -torch.stack([weights[0, position, start + cell].log() for position, cell in targets]).mean()
    assert len(targets) > 10
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    loss.backward()  # it trains the LLM's own projections of that layer
    assert model.llm.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.llm.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_the_read_is_the_next_object_word_from_the_pointer_heads_own_output(tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0, pointer_attention=True,
                         pointer_layer=1, read_weight=1.0)
    conversation = [(S.DETAILED_PROMPTS[0], DESCRIPTION)]
    batch = collate([stage._encode(conversation)], stage.pad_id)
    tokens = torch.randn(1, stage.query_num, model.config.llm.hidden_size)
    out = stage._forward(batch, tokens, hidden_states=True)
    losses = stage._pointer_loss([_scene()], [conversation], batch, out.hidden_states[1])
    # the reference: layer 1's attention with every head but 0 cut from the output projection, then norm and LM head
    llm = model.llm.model
    attention = llm.layers[1].self_attn
    hd = attention.head_dim
    with torch.no_grad():
        attention.o_proj.weight[:, hd:] = 0.0
        T = batch["input_ids"].shape[1]
        cos, sin = llm.rotary_emb(torch.arange(T)[None], torch.float32)
        written, _ = attention(llm.layers[1].input_layernorm(out.hidden_states[1]), cos, sin, None, True)
        logits = model.llm.lm_head(llm.norm(written))[0]  # (T, V)
    ids = batch["input_ids"][0]
    positions = [p for p, _ in pointer_targets(_scene(), conversation, ids.tolist(), tokenizer, grid=2)
                 if int(ids[p + 1]) in stage.object_words.tolist()]
    assert 4 <= len(positions) < len(pointer_targets(_scene(), conversation, ids.tolist(), tokenizer, grid=2))
    expected = F.cross_entropy(logits[positions], ids[[p + 1 for p in positions]])
    assert float(losses["read"].detach()) == pytest.approx(float(expected), rel=1e-4)
    words = {tokenizer.decode([int(i)]).strip() for i in stage.object_words}
    assert {"red", "star", "small", "top", "left", "two"} <= words and "is" not in words
    with pytest.raises(ValueError, match="needs pointer_weight and pointer_attention"):
        _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0, read_weight=1.0)


def test_the_box_read_is_each_box_digit_from_the_heads_output_and_the_positions_state_through_the_layer(
        tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0, pointer_attention=True,
                         pointer_boxes=True, pointer_layer=1, box_read_weight=1.0)
    conversation = [(GROUNDING_PROMPT.format(expression="the blue star"), "[375,375,625,625]"),
                    (S.DETAILED_PROMPTS[0], DESCRIPTION)]
    batch = collate([stage._encode(conversation)], stage.pad_id)
    tokens = torch.randn(1, stage.query_num, model.config.llm.hidden_size)
    out = stage._forward(batch, tokens, hidden_states=True)
    losses = stage._pointer_loss([_scene()], [conversation], batch, out.hidden_states[1])
    assert "read" not in losses  # no word read asked for
    # the reference: layer 1 with every attention head but 0 cut from the output projection, then norm and LM head
    llm = model.llm.model
    layer = llm.layers[1]
    hd = layer.self_attn.head_dim
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, hd:] = 0.0
        T = batch["input_ids"].shape[1]
        cos, sin = llm.rotary_emb(torch.arange(T)[None], torch.float32)
        state = out.hidden_states[1] + layer.self_attn(layer.input_layernorm(out.hidden_states[1]), cos, sin, None,
                                                       True)[0]
        state = state + layer.mlp(layer.post_attention_layernorm(state))
        logits = model.llm.lm_head(llm.norm(state))[0]  # (T, V)
    ids = batch["input_ids"][0]
    positions = [p for p, _ in pointer_targets(_scene(), conversation, ids.tolist(), tokenizer, grid=2, boxes=True)
                 if tokenizer.decode([int(ids[p + 1])]).isdigit()]
    assert len(positions) == 12  # the box's digits, none of the description's
    expected = F.cross_entropy(logits[positions], ids[[p + 1 for p in positions]])
    assert float(losses["read_box"].detach()) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="needs pointer_weight, pointer_attention and pointer_boxes"):
        _read(tmp_path, tokenizer, question_first=True, pointer_weight=1.0, pointer_attention=True,
              box_read_weight=1.0)


def test_the_match_head_needs_the_question_first(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs question_first"):
        _read(tmp_path, tokenizer, match_weight=1.0)


def _read(tmp_path, tokenizer, steps=4, **kw):
    kw = {"ground_scenes": 2} | kw  # each held-out grounding prompt decodes alone: few in tests
    model = _model(tokenizer)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, grid=2)
    kw = {"lm_weight": 1.0} | kw
    settings = StageSettings(kind="read", steps=steps, lr=2e-3, trains={"llm": 1.0, "slots": 1.0}, batch=4,
                             warmup=2, save_every=2, eval_every=100, eval_scenes=2, **kw)
    return BaseStage(model, tokenizer, slots, settings, tmp_path), model


def test_read_stage_lowers_the_loss_and_trains_only_the_llm_and_slots(tmp_path, tokenizer):
    stage, model = _read(tmp_path, tokenizer, steps=30, log_every=1)
    vision = {k: v.clone() for k, v in model.vpm.state_dict().items()}
    embedding = model.llm.get_input_embeddings().weight.detach().clone()
    stage.run(progress=lambda line: None)
    losses = [e["loss_total"] for e in stage.curve() if "loss_total" in e]
    assert len(losses) == 30 and max(losses[-3:]) < 0.6 * losses[0]
    assert all(torch.equal(v, model.vpm.state_dict()[k]) for k, v in vision.items())
    assert not torch.equal(embedding, model.llm.get_input_embeddings().weight)
    assert (tmp_path / "done.json").is_file() and (tmp_path / "model" / "model.safetensors").is_file()


def _stop_after_saving(at_step: int):
    """A `BaseStage._save` that saves, then stops the run (as Ctrl-C would) once it has saved step `at_step`."""
    save = BaseStage._save

    def save_then_stop(self, state):
        save(self, state)
        if state["step"] == at_step:
            raise KeyboardInterrupt

    return save_then_stop


@pytest.mark.parametrize("match", [{}, {"question_first": True, "match_weight": 1.0},
                                   {"question_first": True, "match_weight": 1.0, "pointer_weight": 1.0},
                                   {"question_first": True, "pointer_weight": 1.0, "pointer_attention": True,
                                    "read_weight": 1.0, "mix": LessonMix(alone=0.5)}],
                         ids=["plain", "match", "pointer", "attention_read"])
def test_a_stopped_stage_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tokenizer, monkeypatch, match):
    straight, straight_model = _read(tmp_path / "straight", tokenizer, **match)
    straight.run(progress=lambda line: None)

    save = BaseStage._save
    monkeypatch.setattr(BaseStage, "_save", _stop_after_saving(2))
    stopped, _ = _read(tmp_path / "stopped", tokenizer, **match)
    with pytest.raises(KeyboardInterrupt):
        stopped.run(progress=lambda line: None)
    monkeypatch.setattr(BaseStage, "_save", save)
    resumed, resumed_model = _read(tmp_path / "stopped", tokenizer, **match)  # a new process: fresh model and slots
    lines = []
    resumed.run(progress=lines.append)
    assert lines[0].startswith("read: resuming at step 2")
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.slots.box.weight, resumed.slots.box.weight)
    if match:  # and the finished model says how its prompts are laid out
        assert MLLMModel.from_pretrained(tmp_path / "stopped" / "model").config.question_first
    if "match_weight" in match:
        assert "loss_match" in straight.curve()[0]
        assert torch.equal(straight.match_head.weight, resumed.match_head.weight)
    if "pointer_weight" in match:  # the pointer head (when it is a throwaway one) resumes too, and it trained
        assert "loss_pointer" in straight.curve()[0]
        for name, weight in (straight.pointer_head.state_dict() if straight.pointer_head else {}).items():
            assert torch.equal(weight, resumed.pointer_head.state_dict()[name]), name
    if "read_weight" in match:  # the attention pointer has no head of its own: the LLM is all there is to resume
        assert straight.pointer_head is None and "loss_read" in straight.curve()[0]


def test_a_finished_stage_hands_on_only_the_parts_it_trained(tmp_path, tokenizer):
    # read ran beside the vision pretraining (from the same init): reusing it must keep the pretrained vision
    finished, finished_model = _read(tmp_path, tokenizer, steps=2)
    finished.run(progress=lambda line: None)
    later = _model(tokenizer, seed=1)  # stands for the model after the vision pretraining
    vision = {k: v.clone() for k, v in later.vpm.state_dict().items()}
    slots = SceneSlots(tokenizer, later.config.llm.hidden_size, grid=2)
    reused = BaseStage(later, tokenizer, slots, finished.settings, tmp_path)
    reused.run(progress=lambda line: None)
    assert all(torch.equal(v, later.vpm.state_dict()[k]) for k, v in vision.items())
    assert not torch.equal(vision["embeddings.patch_embedding.weight"],
                           finished_model.vpm.embeddings.patch_embedding.weight)
    for (name, a), (_, b) in zip(finished_model.llm.state_dict().items(), later.llm.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(finished.slots.box.weight, slots.box.weight)


def test_a_stage_stopped_on_request_resumes_over_another_vision_and_keeps_it(tmp_path, tokenizer):
    # read begun beside the vision pretraining (from the init), stopped when phase 0 ends, resumed on phase 0's model:
    # it goes on from the very step it stopped at, and the init's vision in its state must not come back
    straight, straight_model = _read(tmp_path / "straight", tokenizer, steps=5)
    straight.run(progress=lambda line: None)
    asked = []
    stopped, _ = _read(tmp_path / "stopped", tokenizer, steps=5)
    assert stopped.run(progress=lambda line: None, stop=lambda: asked.append(1) or len(asked) >= 3) is None
    state = torch.load(tmp_path / "stopped" / "state.pt", weights_only=True)
    assert state["step"] == 3 and not (tmp_path / "stopped" / "done.json").exists()  # saved off the save_every beat
    later = _model(tokenizer, seed=1)  # stands for the model after the vision pretraining
    vision = {k: v.clone() for k, v in later.vpm.state_dict().items()}
    slots = SceneSlots(tokenizer, later.config.llm.hidden_size, grid=2)
    lines = []
    summary = BaseStage(later, tokenizer, slots, stopped.settings, tmp_path / "stopped").run(progress=lines.append)
    assert lines[0].startswith("read: resuming at step 3") and summary["steps"] == 5
    assert all(torch.equal(v, later.vpm.state_dict()[k]) for k, v in vision.items())
    assert not torch.equal(vision["embeddings.patch_embedding.weight"],
                           straight_model.vpm.embeddings.patch_embedding.weight)
    for (name, a), (_, b) in zip(straight_model.llm.state_dict().items(), later.llm.state_dict().items()):
        assert torch.equal(a, b), name  # the LLM as if never stopped
    assert torch.equal(straight.slots.box.weight, slots.box.weight)


def test_a_finished_stage_trained_with_other_settings_is_not_silently_reused(tmp_path, tokenizer):
    finished, _ = _read(tmp_path, tokenizer, steps=2)
    finished.run(progress=lambda line: None)
    # what changes only the curve is no reason to train again
    _read(tmp_path, tokenizer, steps=2, log_every=7, name="again")[0].run(progress=lambda line: None)
    longer, _ = _read(tmp_path, tokenizer, steps=3)
    with pytest.raises(ValueError, match=r"done.json: .*steps: finished with 2, asked 3.*nothing is deleted"):
        longer.run(progress=lambda line: None)
    colour, _ = _read(tmp_path, tokenizer, steps=2, mix=COLOUR_NEXT)
    with pytest.raises(ValueError, match="mix: finished with"):
        colour.run(progress=lambda line: None)
    assert (tmp_path / "model" / "model.safetensors").is_file()  # nothing deleted


def test_bf16_autocast_follows_the_machine_unless_a_stage_asks(tmp_path, tokenizer, monkeypatch):
    """By default a stage autocasts to bf16 only where that pays (`bf16_autocast_pays`): on a CPU without bf16
    kernels (AVX2 alone: 55x slower, measured) it trains in float32, to the very losses of an explicit bf16=False."""
    def losses(folder, **kw):
        stage, _ = _read(tmp_path / folder, tokenizer, steps=3, log_every=1, **kw)
        stage.run(progress=lambda line: None)
        done = json.loads((tmp_path / folder / "done.json").read_text())
        return [e["loss_total"] for e in stage.curve() if "loss_total" in e], done["bf16"]

    monkeypatch.setattr(base_recipe, "bf16_autocast_pays", lambda device_type: False)
    auto_slow, ran_bf16 = losses("auto_slow")
    assert not ran_bf16 and auto_slow == losses("fp32", bf16=False)[0]
    monkeypatch.setattr(base_recipe, "bf16_autocast_pays", lambda device_type: True)
    auto_fast, ran_bf16 = losses("auto_fast")
    assert ran_bf16 and auto_fast == losses("bf16", bf16=True)[0] and auto_fast != auto_slow
    assert losses("forced", bf16=False)[0] == auto_slow  # an explicit setting wins over the machine


def test_bf16_pays_only_where_the_device_has_it(monkeypatch):
    from mllm.model import loading

    loading.bf16_autocast_pays.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert loading.bf16_autocast_pays("cpu") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.bf16_autocast_pays("cuda") is False and loading.bf16_autocast_pays("mps") is False
    loading.bf16_autocast_pays.cache_clear()  # later tests measure this machine afresh


def test_fields_added_since_a_stage_finished_count_as_their_defaults():
    wanted = base_recipe._jsonable(StageSettings(kind="read", steps=5, lr=1e-3, trains={"llm": 1.0}))
    recorded = json.loads(json.dumps(wanted))
    del recorded["curriculum"], recorded["mix"]["alone"]
    recorded["first_mix"], recorded["first_mix_steps"] = None, 0  # a field since removed, unset
    base_recipe._check_same_training(Path("done.json"), recorded, wanted)
    recorded["first_mix_steps"] = 500  # ... set: it mattered
    with pytest.raises(ValueError, match="first_mix_steps: finished with 500, asked None"):
        base_recipe._check_same_training(Path("done.json"), recorded, wanted)
    recorded = json.loads(json.dumps(wanted)) | {"bf16": True}  # finished where bf16 was fast: reused anywhere
    base_recipe._check_same_training(Path("done.json"), recorded, wanted)
    recorded = json.loads(json.dumps(wanted))
    recorded["mix"]["alone"] = 0.3
    with pytest.raises(ValueError, match="mix"):
        base_recipe._check_same_training(Path("done.json"), recorded, wanted)


def test_stage_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match="kind"):
        StageSettings(kind="pretrain", steps=1, lr=1e-3, trains={"llm": 1.0})
    with pytest.raises(ValueError, match="trains"):
        StageSettings(kind="read", steps=1, lr=1e-3, trains={"decoder": 1.0})
    assert base_recipe.PARTS == ("llm", "slots", "vision")


def test_the_existence_curriculum_comes_first_then_the_full_mix(tmp_path, tokenizer):
    rng = random.Random(3)
    scene = S.drawn_scene(S.sample_scene(rng, "x"))
    for _ in range(10):
        *questions, (dense, answer) = EXISTENCE_FIRST.turns(scene, rng, 4)
        assert dense == "Which shapes are in the image?" and len(answer.split(",")) == len(S.CATEGORIES)
        assert all(q.startswith("Is there") and a in ("Yes", "No") for q, a in questions)
        assert all(re.fullmatch(r"Is there an? \w+ in the image\? Please answer yes or no\.", q) for q, _ in questions)
    stage, _ = _read(tmp_path, tokenizer, curriculum=((EXISTENCE_FIRST, 2), (COLOUR_NEXT, 1)))
    assert [stage.lesson_at(step)[0] for step in (1, 2, 3, 4)] == [EXISTENCE_FIRST, EXISTENCE_FIRST, COLOUR_NEXT,
                                                                    stage.settings.mix]
    for _ in range(10):
        *questions, (dense, _) = COLOUR_NEXT.turns(scene, rng, 4)
        assert dense == "Which of these are in the image?"
        assert all(q.startswith("Is there") and q.split()[3] in S.COLOURS for q, _ in questions)


def test_interleaved_lessons_take_turns_after_the_curriculum_each_with_its_own_turns(tmp_path, tokenizer,
                                                                                     monkeypatch):
    only_yesno = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0, statements=False)
    stage, _ = _read(tmp_path, tokenizer, steps=5, turns=3, curriculum=((EXISTENCE_FIRST, 1),),
                     interleave=((only_yesno, 1), (only_yesno, 4)))
    assert [stage.lesson_at(step) for step in (1, 2, 3, 4, 5)] == [
        (EXISTENCE_FIRST, 3), (only_yesno, 1), (only_yesno, 4), (only_yesno, 1), (only_yesno, 4)]
    drawn = []  # the turns each conversation of the training steps was drawn with
    turns_of = LessonMix.turns
    monkeypatch.setattr(LessonMix, "turns", lambda mix, scene, rng, n: drawn.append(n) or turns_of(mix, scene, rng, n))
    stage.run(progress=lambda line: None)
    assert drawn[:4 * 5] == [3] * 4 + [1] * 4 + [4] * 4 + [1] * 4 + [4] * 4  # a batch of 4 conversations a step


def test_slot_regression_alone_never_runs_the_llm(tmp_path, tokenizer):
    model = _model(tokenizer)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, grid=2)
    settings = StageSettings(kind="align", steps=1, lr=1e-3, trains={"vision": 1.0}, answer_weight=0.0,
                             slot_weight=1.0, batch=2, eval_scenes=1)
    stage = BaseStage(model, tokenizer, slots, settings, tmp_path)

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM ran")

    stage._forward = no_llm
    rng = random.Random(0)
    scenes, images = stage._scenes(rng, 2)
    parts = stage.loss(scenes, images, rng)
    assert set(parts) == {"slots", "total"} and torch.equal(parts["total"], parts["slots"])
    tokens = base_recipe.vision_tokens(model, stage.processor, images).float()
    target = slots(scenes, model.llm.get_input_embeddings().weight).float()
    assert torch.allclose(parts["slots"], ((tokens - target) ** 2).mean() / target.var(), rtol=0.05)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)], ids=["both", "answer", "lm"])
def test_the_answer_and_lm_losses_are_the_cross_entropies_of_the_llms_logits(tmp_path, tokenizer, weights):
    answer_weight, lm_weight = weights
    stage, model = _read(tmp_path, tokenizer, answer_weight=answer_weight, lm_weight=lm_weight,
                         bf16=False)  # fp32: the reference below runs without autocast
    seen = {}
    forward = stage._forward

    def keep(batch, tokens, hidden_states=False):
        seen["batch"], seen["out"] = batch, forward(batch, tokens, hidden_states)
        return seen["out"]

    stage._forward = keep
    rng = random.Random(3)
    scenes, images = stage._scenes(rng, 3)
    parts = stage.loss(scenes, images, rng)
    logits = seen["out"].logits.float().flatten(0, 1)  # every position, padding and image span included
    batch = seen["batch"]
    assert (batch["attention_mask"] == 0).any()  # padded: positions no loss reads
    expected = {"answer": F.cross_entropy(logits, batch["labels"].flatten(), ignore_index=-100),
                "lm": F.cross_entropy(logits, batch["lm_labels"].flatten(), ignore_index=-100)}
    for name, weight in (("answer", answer_weight), ("lm", lm_weight)):
        assert (name in parts) == bool(weight)
        if weight:
            assert torch.allclose(parts[name], expected[name], atol=1e-6), name
    parts["total"].backward()  # and the gradient reaches the LLM through the shared log-softmax
    assert model.llm.lm_head.weight.grad.abs().sum() > 0


def test_the_box_read_back_is_weighed_on_its_own(tmp_path, tokenizer):
    model = _model(tokenizer)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, grid=2, box_code="number")
    settings = StageSettings(kind="align", steps=1, lr=1e-3, trains={"vision": 1.0}, answer_weight=0.0,
                             slot_weight=1.0, readout_weight=1.0, box_readout_weight=0.25, batch=2, eval_scenes=1)
    stage = BaseStage(model, tokenizer, slots, settings, tmp_path)
    rng = random.Random(0)
    scenes, images = stage._scenes(rng, 2)
    parts = stage.loss(scenes, images, rng)
    assert set(parts) == {"slots", "readout", "box_readout", "total"}
    tokens = base_recipe.vision_tokens(model, stage.processor, images).float()
    assert torch.allclose(parts["box_readout"], slots.box_readout_loss(scenes, tokens), rtol=0.05)
    assert torch.allclose(parts["total"], parts["slots"] + parts["readout"] + 0.25 * parts["box_readout"])


def test_readout_loss_by_hand_and_it_prefers_the_true_slots(tokenizer):
    from mllm.train.scene_slots import READOUT_SCALE

    torch.manual_seed(0)
    slots = SceneSlots(tokenizer, 8, grid=2)
    embedding = torch.randn(len(tokenizer), 8)
    scene = S.Scene("t", 120, 120, _scene().objects[:1], 0)  # one small red circle, top left, cell 0
    tokens = torch.randn(1, 4, 8)
    content = tokens[0, 0] - slots.cell.weight[0]
    expected = []
    for table, index in ((slots.colours, list(S.COLOURS).index("red")),
                         (slots.categories, list(S.CATEGORIES).index("circle")), (slots.counts, 0)):
        words = table(torch.arange(len(table.ids)), embedding)
        logits = READOUT_SCALE * (words @ content) / words.pow(2).sum(-1).mean()
        expected.append(-torch.log_softmax(logits, 0)[index])
    assert torch.allclose(slots.readout_loss([scene], tokens, embedding), torch.stack(expected).mean(), atol=1e-5)
    # wide enough for a sum of a slot's ~8 word vectors to keep each readable, the true slots read back well
    wide, embedding = SceneSlots(tokenizer, 64, grid=6), torch.randn(len(tokenizer), 64)
    scenes = [S.drawn_scene(S.sample_scene(random.Random(i), "x")) for i in range(8)]
    true = wide(scenes, embedding).detach()
    assert wide.readout_loss(scenes, true, embedding) < 0.5 * wide.readout_loss(scenes, torch.randn_like(true), embedding)


def test_census_loss_by_hand_reads_every_cell_and_a_ghost_beside_an_object_costs(tmp_path, tokenizer):
    """Every cell is read as empty (a fixed logit of CENSUS_SCALE / 2) or a category: a ghost (an empty cell holding
    its neighbour's category) is a census error that `readout_loss`, which reads object cells only, never sees."""
    from mllm.train.scene_slots import CENSUS_SCALE

    torch.manual_seed(0)
    slots = SceneSlots(tokenizer, 8, grid=2)
    embedding = torch.randn(len(tokenizer), 8)
    scene = S.Scene("t", 120, 120, _scene().objects[:1], 0)  # one small red circle, top left, cell 0
    tokens = torch.randn(1, 4, 8)
    words = slots.categories(torch.arange(len(slots.categories.ids)), embedding)
    expected = []
    for cell, target in ((0, 1 + list(S.CATEGORIES).index("circle")), (1, 0), (2, 0), (3, 0)):
        scores = CENSUS_SCALE * (words @ (tokens[0, cell] - slots.cell.weight[cell])) / words.pow(2).sum(-1).mean()
        logits = torch.cat([torch.tensor([CENSUS_SCALE / 2]), scores])
        expected.append(-torch.log_softmax(logits, 0)[target])
    assert torch.allclose(slots.census_loss([scene], tokens, embedding), torch.stack(expected).mean(), atol=1e-5)
    # the true slots read back nearly free; a ghost of the circle in the next cell costs, where readout does not see it
    wide, embedding = SceneSlots(tokenizer, 64, grid=6), torch.randn(len(tokenizer), 64)
    scenes = [S.drawn_scene(S.sample_scene(random.Random(i), "x")) for i in range(8)]
    true = wide(scenes, embedding).detach()
    assert wide.census_loss(scenes, true, embedding) < 0.1
    features = slot_features(scenes[0], 6)
    held = {f[0] for f in features}
    ghost_cell = next(c for c in (features[0][0] + d for d in (1, -1, 6, -6)) if 0 <= c < 36 and c not in held)
    ghosted = true.clone()
    ghosted[0, ghost_cell] += wide.categories(torch.tensor([features[0][2]]), embedding)[0]
    assert wide.census_loss(scenes, ghosted, embedding) > wide.census_loss(scenes, true, embedding) + 0.01
    assert torch.equal(wide.readout_loss(scenes, ghosted, embedding), wide.readout_loss(scenes, true, embedding))
    # weighed into a stage's total under its own name
    model = _model(tokenizer)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, grid=2, box_code="number")
    settings = StageSettings(kind="align", steps=1, lr=1e-3, trains={"vision": 1.0}, answer_weight=0.0,
                             slot_weight=1.0, census_weight=0.5, batch=2, eval_scenes=1)
    stage = BaseStage(model, tokenizer, slots, settings, tmp_path)
    rng = random.Random(0)
    scenes, images = stage._scenes(rng, 2)
    parts = stage.loss(scenes, images, rng)
    assert set(parts) == {"slots", "census", "total"}
    tokens = base_recipe.vision_tokens(model, stage.processor, images).float()
    census = slots.census_loss(scenes, tokens, model.llm.get_input_embeddings().weight)
    assert torch.allclose(parts["census"], census, rtol=0.05)
    assert torch.allclose(parts["total"], parts["slots"] + 0.5 * parts["census"])


def test_an_object_near_a_border_may_be_held_across_it_when_the_tokens_already_hold_it_there(tmp_path, tokenizer):
    """120 x 120 on a 6 x 6 grid (20-pixel cells): a circle centred 1 pixel left of the border between cells 13 and
    14 may be held in 14; the star at the middle of its cell and an object at the grid's edge may not. The tokens
    decide: slots with the circle in 14 are read as 14, the true slots as 13; a neighbour already held keeps it."""
    from mllm.train.scene_slots import assign_cells, border_neighbours

    objects = (S.SceneObject("circle", "red", 39, 50, 20, 0, (29, 40, 49, 60)),  # u = 1.95, v = 2.5: cell 13
               S.SceneObject("star", "blue", 70, 70, 20, 0, (60, 60, 80, 80)),  # the middle of cell 21
               S.SceneObject("heart", "green", 118, 70, 4, 0, (116, 68, 120, 72)))  # u = 5.9: the edge is nearest
    scene = S.Scene("t", 120, 120, objects, 0)
    assert [f[0] for f in slot_features(scene, 6)] == [13, 21, 23]
    assert border_neighbours(scene, 6, 0.25) == [14, None, None]
    assert border_neighbours(scene, 6, 0.04) == [None, None, None]
    assert [f[0] for f in slot_features(scene, 6, (14, 21, 23))] == [14, 21, 23]
    torch.manual_seed(0)
    slots, embedding = SceneSlots(tokenizer, 64, grid=6), torch.randn(len(tokenizer), 64)
    true = slots([scene], embedding).detach()
    moved = slots([scene], embedding, [(14, 21, 23)]).detach()
    assert torch.equal(moved[0, 14] - slots.cell.weight[14], true[0, 13] - slots.cell.weight[13])
    assert assign_cells(slots, [scene], true, true, 0.25) == [(13, 21, 23)]
    assert assign_cells(slots, [scene], moved, true, 0.25) == [(14, 21, 23)]
    assert assign_cells(slots, [scene], moved, true, 0.04) == [(13, 21, 23)]
    held = S.Scene("t", 120, 120, objects + (S.SceneObject("moon", "red", 50, 50, 4, 0, (48, 48, 52, 52)),), 0)
    assert [f[0] for f in slot_features(held, 6)][3] == 14
    held_slots = slots([held], embedding).detach()
    assert assign_cells(slots, [held], held_slots, held_slots, 0.25) == [(13, 21, 23, 14)]
    # in a stage every target follows the assignment: the slot regression and the read-backs
    model = _model(tokenizer)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, grid=2, box_code="number")
    settings = StageSettings(kind="align", steps=1, lr=1e-3, trains={"vision": 1.0}, answer_weight=0.0,
                             slot_weight=1.0, readout_weight=1.0, census_weight=1.0, slot_tolerance=0.5, batch=4,
                             eval_scenes=1)
    stage = BaseStage(model, tokenizer, slots, settings, tmp_path)
    rng = random.Random(0)
    scenes, images = stage._scenes(rng, 4)
    parts = stage.loss(scenes, images, rng)
    embedding = model.llm.get_input_embeddings().weight
    tokens = base_recipe.vision_tokens(model, stage.processor, images).float()
    cells = assign_cells(slots, scenes, tokens, slots(scenes, embedding), 0.5)
    assert cells != [tuple(f[0] for f in slot_features(scene, 2)) for scene in scenes]  # some object moved
    target = slots(scenes, embedding, cells).float()
    assert torch.allclose(parts["slots"], ((tokens - target) ** 2).mean() / target.var(), rtol=0.05)
    assert torch.allclose(parts["census"], slots.census_loss(scenes, tokens, embedding, cells), rtol=0.05)
    with pytest.raises(ValueError, match="slot_tolerance"):
        StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0}, slot_tolerance=0.25)


def test_describe_scores_the_pairs_greedy_descriptions_name(tmp_path, tokenizer):
    """An LLM stand-in that writes, for every other held-out scene, its first object ("a red circle") and for the
    rest nothing: the score is those scenes' one pair each over every scene's pairs, decoded from what it wrote."""
    stage, model = _read(tmp_path, tokenizer, describe_scenes=12)
    heldout = stage.describe_heldout
    assert len(heldout) == 12 and {p for _, _, p in heldout} <= set(S.DETAILED_PROMPTS)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    groups = {}
    for k, (scene, _, prompt) in enumerate(heldout):  # the rows of each call, as describe batches them
        first = scene.objects[0]
        text = f" There is a {first.colour} {first.category} ." if k % 2 == 0 else ""
        groups.setdefault(prompt, []).append(tokenizer.encode(text, add_special_tokens=False) + [end])
    calls = iter(groups.values())
    state = {}

    def writes(input_ids=None, inputs_embeds=None, cache=None, use_cache=None, **kw):
        if inputs_embeds is not None:  # a new group's prompt
            state["rows"], state["t"] = next(calls), 0
        rows, t = state["rows"], state["t"]
        state["t"] += 1
        logits = torch.zeros(len(rows), 1, len(tokenizer))
        for i, row in enumerate(rows):
            logits[i, 0, row[min(t, len(row) - 1)]] = 1.0
        return type("Out", (), {"logits": logits, "cache": "kept"})()

    model.llm.forward = writes
    pairs = [len({(o.colour, o.category) for o in scene.objects}) for scene, _, _ in heldout]
    assert stage.describe() == round(6 / sum(pairs), 4)  # six scenes named, one pair each
    assert next(calls, None) is None  # every prompt's group was described


def test_ground_scores_acc_at_half_iou_mean_iou_and_parsed_share(tmp_path, tokenizer):
    """Held-out grounding prompts each about one object; answers by hand: the true box for every third scene, a
    box apart from it for the next, words without a box for the last: Acc@0.5 1/3, mean IoU 1/3, parsed 2/3."""
    stage, _ = _read(tmp_path, tokenizer, ground_scenes=9)
    heldout = stage.ground_heldout
    assert len(heldout) == 9
    texts = {}
    for k, (scene, _, prompt, truth) in enumerate(heldout):
        assert re.fullmatch(re.escape(GROUNDING_PROMPT).replace(re.escape("{expression}"), "the .+"), prompt)
        assert truth in [pixel_to_grid(o.bbox, scene.width, scene.height, square_pad=False) for o in scene.objects]
        apart = [0, 0, 10, 10] if truth[0] >= 500 else [990, 990, 1000, 1000]
        assert iou(apart, truth) == 0.0
        texts[prompt] = [f" {format_box(truth)}", f" {format_box(apart)}", " the moon"][k % 3]
    stage._greedy = lambda prompt, scenes, images, max_new_tokens: [texts[prompt]]
    assert stage.ground() == {"acc": round(3 / 9, 4), "iou": round(3 / 9, 4), "parsed": round(6 / 9, 4)}


def test_a_field_added_at_its_default_keeps_the_fingerprints_of_finished_stages(tmp_path, tokenizer):
    """Adding box_read_weight (default 0: no box read) changed every recorded chain fingerprint, so finished runs
    refused to resume. Now fields at their defaults are left out, and a record from before that is still taken."""
    settle = StageSettings(kind="read", steps=3, lr=1e-3, trains={"llm": 1.0}, pointer_weight=1.0,
                           pointer_attention=True, eval_every=7)

    def digest(fields):
        return hashlib.sha256(json.dumps([fields], sort_keys=True).encode()).hexdigest()[:16]

    every = {k: v for k, v in base_recipe._jsonable(settle).items() if k not in base_recipe._NOT_TRAINING}
    set_only = {k: every[k] for k in ("kind", "steps", "lr", "trains", "pointer_weight", "pointer_attention")}
    assert base_recipe.chain_fingerprint([settle]) == digest(set_only)
    # as stop 37 wrote it: every field of the time (box_read_weight and the fields after it did not exist yet)
    recorded_before = digest({k: v for k, v in every.items() if k not in base_recipe._ADDED_SINCE_STOP38})
    assert {"box_read_weight", "box_role_weight", "box_heads"} <= base_recipe._ADDED_SINCE_STOP38
    stage, _ = _read(tmp_path, tokenizer)
    stage.after, stage.after_before_stop38 = (base_recipe.chain_fingerprint([settle]),
                                              base_recipe.chain_fingerprint([settle], as_before_stop38=True))
    stage._check_same_chain(tmp_path / "done.json", recorded_before)  # taken
    stage._check_same_chain(tmp_path / "done.json", digest(set_only))
    with pytest.raises(ValueError, match="other earlier stages"):
        stage._check_same_chain(tmp_path / "done.json", digest(every | {"steps": 4}))


def test_a_stage_is_never_resumed_or_reused_on_top_of_another_chain(tmp_path, tokenizer, monkeypatch):
    """Its state and done.json record the earlier stages' settings (a fingerprint): with an earlier stage changed
    since, a stopped stage refuses to resume and a finished one to be reused, naming the file; with the same
    earlier stages both go on."""
    first = StageSettings(kind="read", steps=3, lr=1e-3, trains={"llm": 1.0})
    changed = StageSettings(kind="read", steps=5, lr=1e-3, trains={"llm": 1.0})
    assert base_recipe.chain_fingerprint([first]) != base_recipe.chain_fingerprint([changed])
    same = StageSettings(kind="read", steps=3, lr=1e-3, trains={"llm": 1.0}, eval_every=7, name="first")
    assert base_recipe.chain_fingerprint([first]) == base_recipe.chain_fingerprint([same])  # curve and name only

    def stage(after):
        stage, _ = _read(tmp_path, tokenizer)
        stage.after = base_recipe.chain_fingerprint(after)
        return stage

    save = BaseStage._save
    monkeypatch.setattr(BaseStage, "_save", _stop_after_saving(2))
    with pytest.raises(KeyboardInterrupt):
        stage([first]).run(progress=lambda line: None)
    monkeypatch.setattr(BaseStage, "_save", save)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "state.pt")) + ".*other earlier stages"):
        stage([changed]).run(progress=lambda line: None)
    lines = []
    stage([same]).run(progress=lines.append)
    assert lines[0].startswith("read: resuming at step 2")
    assert json.loads((tmp_path / "done.json").read_text())["after"] == base_recipe.chain_fingerprint([first])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "done.json")) + ".*other earlier stages"):
        stage([changed]).run(progress=lambda line: None)
    stage([first]).run(progress=lambda line: None)  # reused
