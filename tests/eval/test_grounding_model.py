"""Grounding with a model: REC files -> questions -> resumable answers -> per-split table and pictures;
`--refcoco-dir` discovery; the `mllm ground` CLI; the drawing; the course stage's plumbing.
The model is a random tiny checkpoint: these tests check plumbing, not accuracy."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mllm.cli import eval_grounding
from mllm.cli import ground as ground_cli
from mllm.eval import grounding
from mllm.eval.grounding_draw import GT_COLOUR, PRED_COLOUR, contact_sheet, draw_case


def _rec_files(folder, splits=("REC_refcoco_unc_val", "synthetic_test"), n=3):
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    files = []
    for s, split in enumerate(splits):
        lines = []
        for i in range(n):
            size = [(56, 56), (84, 42), (30, 90)][i % 3]
            Image.new("RGB", size, (40 * i, 90, 30 * s)).save(folder / "imgs" / f"{s}_{i}.png")
            lines.append(json.dumps({"img_path": f"imgs/{s}_{i}.png", "expression": f"the red star {i}",
                                     "bbox": [2, 3, 20, 25], "width": size[0], "height": size[1]}))
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files


def test_evaluate_model_tables_pictures_and_resume(tmp_path, tiny_checkpoint):
    files = _rec_files(tmp_path)
    out = tmp_path / "eval"
    result = grounding.evaluate_model(tiny_checkpoint, files, out, max_new_tokens=6, batch_size=2, draw=3,
                                      quiet=True)
    assert set(result["splits"]) == {"refcoco_val", "synthetic_test"}
    assert result["overall"]["n"] == 6 and result["inputs"]["refcoco_val"]["answered"] == 3
    assert json.loads((out / "grounding.json").read_text())["overall"]["n"] == 6
    question = json.loads((out / "questions" / "refcoco_val.jsonl").read_text().splitlines()[0])
    assert question["question"] == "Where is the red star 0 in image? answer in [x0,y0,x1,y1] format."
    assert question["square_pad"] is False and question["split"] == "refcoco_val"
    pictures = result["pictures"]
    assert len(pictures) == 4 and pictures[-1].endswith("contact_sheet.png")
    assert all(Image.open(p).size[0] >= 256 for p in pictures[:-1])

    # A killed run: one complete answer and a torn line are left. The rerun answers only the rest.
    answers = out / "answers" / "refcoco_val.jsonl"
    first = answers.read_text().splitlines()[0]
    answers.write_text(first + "\n" + '{"idx": 1, "answ')
    again = grounding.evaluate_model(tiny_checkpoint, files, out, max_new_tokens=6, batch_size=2, quiet=True)
    assert again["inputs"]["refcoco_val"]["already_answered"] == 1
    assert again["inputs"]["refcoco_val"]["answered"] == 2
    assert again["inputs"]["synthetic_test"]["answered"] == 0
    assert again["overall"]["n"] == 6
    assert [r["answer"] for r in map(json.loads, answers.read_text().splitlines())][:1] == [json.loads(first)["answer"]]

    with pytest.raises(ValueError, match="other settings"):  # resuming under another prompt is refused
        grounding.evaluate_model(tiny_checkpoint, files, out, max_new_tokens=6, template=1, quiet=True)


def test_missing_images_are_reported_not_asked(tmp_path, tiny_checkpoint, capsys):
    (rec,) = _rec_files(tmp_path, splits=("mine",), n=2)
    (tmp_path / "imgs" / "0_1.png").unlink()
    result = grounding.evaluate_model(tiny_checkpoint, [rec], tmp_path / "eval", max_new_tokens=2, quiet=True)
    assert result["overall"]["n"] == 1 and result["inputs"]["mine"]["missing_images"] == 1
    assert "not asked" in capsys.readouterr().err


def test_refcoco_dir_order_and_cli(tmp_path, tiny_checkpoint, capsys):
    names = ["REC_refcocog_umd_test", "REC_refcoco+_unc_testB", "REC_refcoco_unc_val"]
    _rec_files(tmp_path, splits=names, n=1)
    found = grounding.refcoco_files(tmp_path)
    assert [p.stem for p in found] == ["REC_refcoco_unc_val", "REC_refcoco+_unc_testB", "REC_refcocog_umd_test"]
    out = tmp_path / "cli"
    code = eval_grounding.main(["--model", str(tiny_checkpoint), "--refcoco-dir", str(tmp_path), "--out-dir", str(out),
                           "--max-new-tokens", "4", "--draw", "2"])
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["refcoco_val", "refcoco+_testB", "refcocog_test", "overall"]
    assert (out / "pictures" / "contact_sheet.png").is_file()
    # the answers file records its frame, so scoring it alone gives the same numbers
    rescored = grounding.score_files(out / "answers" / "refcoco_val.jsonl")
    assert rescored["overall"]["n"] == 1
    with pytest.raises(SystemExit):
        eval_grounding.main(["--model", str(tiny_checkpoint), "--out-dir", str(out)])
    with pytest.raises(SystemExit):
        eval_grounding.main(["--refcoco-dir", str(tmp_path / "nothing")])


def test_score_uses_each_answer_frame():
    ref = {"bbox": [64, 144, 320, 360], "width": 640, "height": 480}
    padded = grounding.score(["[100,300,500,750]"], [ref | {"square_pad": True}], square_pad=False)
    unpadded = grounding.score(["[100,300,500,750]"], [ref | {"square_pad": False}], square_pad=True)
    assert padded["samples"][0]["pred_box"] == pytest.approx([64, 112, 320, 400])
    assert unpadded["samples"][0]["pred_box"] == pytest.approx([64, 144, 320, 360])


def test_draw_case_colours_and_sheet():
    picture = draw_case(Image.new("RGB", (64, 32), (0, 0, 0)), "the red star", gt=[8, 8, 24, 24], pred=[32, 4, 60, 28])
    scale = 256 / 32  # the short side is enlarged to 256
    assert picture.size == (512, 256 + 36)
    assert picture.getpixel((int(8 * scale) + 1, int(16 * scale))) == GT_COLOUR  # left edge of the GT box
    assert picture.getpixel((int(32 * scale) + 1, int(16 * scale))) == PRED_COLOUR
    assert picture.getpixel((100, 256 + 30)) != (0, 0, 0)  # the caption strip is white
    sheet = contact_sheet([picture] * 5, columns=4, cell=100)
    assert sheet.size == (400, 200)


def test_ground_cli(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (200, 100), (250, 250, 250)).save(image)
    # a random model rarely writes a box: the CLI still answers, says so and draws the picture
    code = ground_cli.main(["--model", str(tiny_checkpoint), "--image", str(image), "--max-new-tokens", "4",
                            "the red star"])
    assert code in (0, 1) and (tmp_path / "scene.ground.png").is_file()
    # with a known answer the box is mapped from the 0-1000 grid of the unpadded image to pixels
    import mllm.model.generation as generation

    monkeypatch.setattr(generation, "generate", lambda *a, **k: ["[100,200,500,600]"])
    out = tmp_path / "found.png"
    assert ground_cli.main(["--model", str(tiny_checkpoint), "--image", str(image), "--out", str(out),
                            "the red star"]) == 0
    printed = capsys.readouterr().out
    assert "pixels [20, 20, 100, 60]" in printed and "grid [100,200,500,600]" in printed
    assert Image.open(out).getpixel((int(20 * 2.56) + 1, int(40 * 2.56))) == PRED_COLOUR
    assert ground_cli.main(["--model", str(tiny_checkpoint), "--image", str(image), "--square-pad", "--json",
                            "--out", str(out), "the red star"]) == 0
    # 200x100 padded to 200x200 (50 px on top): y = 200/1000*200 - 50 = -10, 600/1000*200 - 50 = 70
    assert json.loads(capsys.readouterr().out)["pixel_box"] == [20.0, -10.0, 100.0, 70.0]
