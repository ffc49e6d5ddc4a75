"""`mllm serve`'s OpenAI-compatible API, end to end: the shipped tiny model served by uvicorn on a free loopback port
in a background thread, called with the `openai` client and with raw HTTP."""

import random
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_serve import data_uri, load_test, sample_requests  # noqa: E402

openai = pytest.importorskip("openai")

MODEL = "tiny-base"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def loaded():
    from mllm.model.loading import default_model_dir, load_pretrained

    return load_pretrained(default_model_dir(), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    scene_image(0).save(root / "scene0.png")
    return root


@pytest.fixture(scope="module")
def server(loaded, image_root):
    from mllm.serve.openai_api import BackgroundServer, create_app

    model, tokenizer, processor = loaded
    app = create_app(model, tokenizer, processor, MODEL, max_batch=MAX_BATCH, image_root=image_root)
    with BackgroundServer(app) as running:
        running.engine = app.state.engine
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def scene_image(seed: int):
    from mllm.world import scenes

    image, _ = scenes.render_scene(scenes.sample_scene(random.Random(seed), "x"))
    return image


def image_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def direct_answer(loaded, image, question: str, max_new_tokens: int) -> tuple[str, int]:
    """(greedy answer, prompt tokens) of the model called directly, as `mllm chat` does."""
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate

    model, tokenizer, processor = loaded
    text, images = build_chat_prompt([{"role": "user", "content": [image, question]}], tokenizer,
                                     question_first=model.config.question_first)
    inputs = processor([text], [images])
    answer = generate(model, inputs, tokenizer, GenerationSettings("greedy", max_new_tokens))[0]
    return answer, int(inputs["attention_mask"].sum())


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60, **kwargs)


def assert_openai_error(reply: httpx.Response, status: int, code=None, says: str = ""):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    if code is not None:
        assert error["code"] == code


# ---- the openai client -----------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "mllm" and models.data[0].object == "model"


def test_image_chat_answers_as_the_model_does_directly(client, loaded):
    image, question = scene_image(0), "Describe the image."
    expected, prompt_tokens = direct_answer(loaded, image, question, 48)
    reply = client.chat.completions.create(model=MODEL, messages=image_message(data_uri(image), question),
                                           max_tokens=48, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected and expected
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 48
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    reply = client.chat.completions.create(model=MODEL, messages=image_message(data_uri(scene_image(0)),
                                                                               "Describe the image."), max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_streamed_deltas_join_to_the_answer(client):
    messages = image_message(data_uri(scene_image(1)), "Describe the image.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage.completion_tokens > 0 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_a_stream_left_early_does_not_stop_the_server(server):
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "Describe."}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        first = next(reply.iter_lines())
        assert first.startswith("data: ") and '"role": "assistant"' in first
    again = post(server, {**body, "stream": False})
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]


def test_sampling_with_a_seed_repeats(client):
    messages = image_message(data_uri(scene_image(2)), "Describe the image.")
    answers = {client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=1.5,
                                              top_p=0.95, seed=7).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1


# ---- refusals over raw HTTP ----------------------------------------------------------------------------------------

def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, image_root):
    good = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Describe the image."}]}
    assert_openai_error(post(server, {"model": MODEL, "messages": []}), 400, says="at least one message")
    assert_openai_error(post(server, {"model": MODEL}), 400, says="messages")
    assert_openai_error(post(server, {**good, "model": "gpt-4o"}), 404, "model_not_found", "gpt-4o")
    not_an_image = "data:image/png;base64,aGVsbG8gd29ybGQ="  # "hello world"
    assert_openai_error(post(server, {**good, "messages": image_message(not_an_image, "What is it?")}), 400,
                        "invalid_image")
    assert_openai_error(post(server, {**good, "messages": image_message("data:image/png;base64,%%%", "?")}), 400,
                        "invalid_image", "base64")
    outside = image_root.parent / "outside.png"
    scene_image(3).save(outside)
    for path in (str(outside), "../outside.png", outside.as_uri(), "/etc/passwd"):
        assert_openai_error(post(server, {**good, "messages": image_message(path, "?")}), 400,
                            "local_path_not_allowed", "outside the server's image root")
    assert_openai_error(post(server, {**good, "messages": image_message("https://example.com/a.png", "?")}), 400,
                        "invalid_image_url", "does not fetch")
    assert_openai_error(post(server, {**good, "max_tokens": 0}), 400, says="max_tokens")
    assert_openai_error(post(server, {**good, "messages": [{"role": "user", "content": 3}]}), 400)
    assert_openai_error(post(server, {**good, "messages": [{"role": "tool", "content": "x"}]}), 400,
                        says="messages[0].role")
    assert_openai_error(post(server, {**good, "n": 2}), 400, "unsupported_parameter")
    assert_openai_error(httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                                   headers={"content-type": "application/json"}), 400, "invalid_json")
    reply = post(server, good)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_files_inside_the_image_root_are_read(client, image_root):
    by_data = client.chat.completions.create(model=MODEL, messages=image_message(data_uri(scene_image(0)), "?"),
                                             max_tokens=16).choices[0].message.content
    inside = (image_root / "scene0.png").resolve()
    for url in ("scene0.png", str(inside), inside.as_uri()):
        reply = client.chat.completions.create(model=MODEL, messages=image_message(url, "?"), max_tokens=16)
        assert reply.choices[0].message.content == by_data, url


def test_a_question_first_model_is_served_its_image_after_the_question(client, loaded, monkeypatch):
    """A model trained with the question first (its config's `question_first`) gets each image after the user's
    text, whatever order the message's parts come in, as `mllm chat` gives it; the answer is the direct one."""
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate
    from mllm.serve import openai_api

    model, tokenizer, processor = loaded
    monkeypatch.setattr(model.config, "question_first", True)
    seen = []
    prepare = openai_api.prepare_job
    monkeypatch.setattr(openai_api, "prepare_job", lambda *a: seen.append(a[-1]) or prepare(*a))
    image, question = scene_image(2), "Is there a red moon in the image?"
    reply = client.chat.completions.create(model=MODEL, messages=image_message(data_uri(image), question),
                                           max_tokens=8, temperature=0)
    assert seen == [True]
    text, images = build_chat_prompt([{"role": "user", "content": [image, question]}], tokenizer,
                                     question_first=True)
    assert text.index(question) < text.index("(<image>./</image>)")
    inputs = processor([text], [images])
    assert reply.choices[0].message.content == generate(model, inputs, tokenizer, GenerationSettings("greedy", 8))[0]
    assert reply.usage.prompt_tokens == int(inputs["attention_mask"].sum())
    job = prepare(openai_api.ChatRequest(model=MODEL, messages=image_message(data_uri(image), question)), tokenizer,
                  processor, None, 4096, True)
    assert torch.equal(job.inputs["input_ids"], inputs["input_ids"])


# ---- the queue -----------------------------------------------------------------------------------------------------

def test_concurrent_requests_share_a_batch_and_each_gets_its_own_answer(server, loaded):
    questions = ["Describe the image.", "How many objects are there?", "Is there a red circle in the image? "
                 "Please answer yes or no.", "What color is the star?", "Describe the image in detail.", "Where?"]
    images = [scene_image(10 + i) for i in range(len(questions))]
    expected = [direct_answer(loaded, image, q, 32)[0] for image, q in zip(images, questions)]
    before = server.engine.stats()["batch_sizes"]
    replies = [None] * len(questions)

    def ask(i):
        replies[i] = post(server, {"model": MODEL, "max_tokens": 32,
                                   "messages": image_message(data_uri(images[i]), questions[i])})

    server.engine.pause()  # hold the queue until every request is in it, so the batch is certain
    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while server.engine.pending() < len(questions) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.pending() == len(questions)
    finally:
        server.engine.resume()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == expected
    after = server.engine.stats()["batch_sizes"]
    new = {size: after.get(size, 0) - before.get(size, 0) for size in after if after.get(size, 0) > before.get(size, 0)}
    assert new == {MAX_BATCH: 1, len(questions) - MAX_BATCH: 1}  # the oldest four together, then the other two


def test_collate_equals_the_processor_on_the_whole_batch(loaded):
    from mllm.model.generation import build_chat_prompt
    from mllm.serve.engine import collate

    _, tokenizer, processor = loaded
    prompts = [build_chat_prompt([{"role": "user", "content": [scene_image(i), q]}], tokenizer)
               for i, q in enumerate(["Describe the image.", "How many?"])]
    whole = processor([t for t, _ in prompts], [imgs for _, imgs in prompts])
    joined = collate([processor([t], [imgs]) for t, imgs in prompts], processor.pad_id)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(whole[key], joined[key])
    for key in ("image_bound", "tgt_sizes"):
        assert all(torch.equal(a, b) for a, b in zip(whole[key], joined[key]))
    assert all(torch.equal(a, b) for x, y in zip(whole["pixel_values"], joined["pixel_values"]) for a, b in zip(x, y))


# ---- load ----------------------------------------------------------------------------------------------------------

def test_load_loses_no_request(server):
    result = load_test(server.url, MODEL, clients=4, seconds=5, bodies=sample_requests(8, max_tokens=16))
    print(f"\nload: {result}")
    assert result["failed"] == 0, result["failures"]
    assert result["answered"] == result["sent"] > 0
    assert result["requests_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0


# ---- the command ---------------------------------------------------------------------------------------------------

def test_mllm_serve_listens_on_loopback_prints_its_url_and_stops_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess

    from mllm.cli.serve import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mllm.cli.main", "serve", "--port", "0", "--device", "cpu",
                                "--served-model-name", "tiny", "--image-root", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving 'tiny' on http://127.0.0.1:"), line
        url = line.split(" on ", 1)[1].split()[0]
        assert [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]] == ["tiny"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_mllm_serve_refuses_a_missing_image_root(tmp_path, capsys):
    from mllm.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "--image-root", str(tmp_path / "missing")])
    assert stop.value.code == 2 and "not a directory" in capsys.readouterr().err
