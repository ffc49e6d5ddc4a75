"""The exercise's scripts run as they are (their defaults: the shipped model, a synthetic world) with tiny budgets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mllm.world.synth import generate

    path = tmp_path_factory.mktemp("scripts") / "world"
    generate(path, n_train=12, n_test=4, seed=11, caption_noise=0.0, progress=False)
    return path


def run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script, extra_env, check", [
    ("finetune_ds_witheval.sh", {}, "model.safetensors"),
    ("finetune_grounding.sh", {"EVAL_LIMIT": "4"}, "model.safetensors"),
    ("finetune_preference.sh", {}, "model.safetensors"),
])
def test_training_scripts_run_on_their_defaults(script, extra_env, check, world, tmp_path):
    out = tmp_path / "out"
    done = run(script, {"WORLD": str(world), "OUTPUT_DIR": str(out), **extra_env},
               "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / check).is_file()


def test_eval_script_answers_and_scores_a_synthetic_bench(tmp_path):
    out = tmp_path / "eval"
    mllm = str(Path(sys.executable).with_name("mllm"))
    done = run("eval.sh", {"OUT": str(out), "MLLM": mllm, "N_TEST": "3", "DECODING": "greedy"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "chair.json").read_text())
    bench = (out / "world" / "bench.jsonl").read_text().splitlines()
    assert result["counts"]["captions"] == len(bench) > 0  # every bench question answered and scored
