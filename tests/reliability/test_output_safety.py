"""`mllm demo`, `mllm init` and `mllm synth` never destroy a folder's contents they did not write."""

import json

from test_answer_safety import mllm


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_refuses_a_folder_it_did_not_write_and_keeps_user_files_in_its_own(tmp_path, tiny_checkpoint, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    args = ["--model", tiny_checkpoint, "--n-eval", "2", "--seed", "3"]
    assert mllm("demo", "--out", mine, *args) != 0
    assert snapshot(mine) == {"thesis.tex": b"months of work"}
    assert "not empty" in capsys.readouterr().err

    out = tmp_path / "demo"
    assert mllm("demo", "--out", out, *args) == 0
    (out / "notes.txt").write_text("my notes on the report")
    assert mllm("demo", "--out", out, *args) == 0  # a rerun replaces only what the demo wrote
    assert (out / "notes.txt").read_text() == "my notes on the report"
    assert (out / "report.html").is_file()


def test_init_refuses_to_replace_a_checkpoint_unless_told(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert mllm("init", "--out", out, "--vocab-size", "300") == 0
    before = snapshot(out)
    assert mllm("init", "--out", out, "--vocab-size", "300", "--seed", "1") != 0
    assert snapshot(out) == before
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert mllm("init", "--out", out, "--vocab-size", "300", "--seed", "1", "--overwrite") == 0
    assert snapshot(out)["model.safetensors"] != before["model.safetensors"]


def test_synth_refuses_foreign_folders_and_other_worlds(tmp_path, capsys):
    world = tmp_path / "world"
    assert mllm("synth", "--out", world, "--n-train", "4", "--n-test", "2", "--quiet") == 0
    before = snapshot(world)
    assert mllm("synth", "--out", world, "--n-train", "4", "--n-test", "2", "--quiet") == 0  # same world: same bytes
    assert snapshot(world) == before
    assert mllm("synth", "--out", world, "--n-train", "3", "--n-test", "2", "--quiet") != 0
    assert snapshot(world) == before
    assert "n_train differ" in capsys.readouterr().err
    assert mllm("synth", "--out", world, "--n-train", "3", "--n-test", "2", "--quiet", "--overwrite") == 0
    images = sorted(p.name for p in (world / "images" / "train").iterdir())
    assert len(images) == 3  # no image of the old world left beside the new ones
    assert json.loads((world / "meta.json").read_text())["n_train"] == 3

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    for extra in ([], ["--overwrite"]):
        assert mllm("synth", "--out", foreign, "--n-train", "2", "--n-test", "1", "--quiet", *extra) != 0
    assert snapshot(foreign) == {"cat.jpg": b"\xff\xd8"}
