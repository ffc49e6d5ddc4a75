"""Load test of `mllm serve`: N concurrent clients send chat completions for a fixed time, over loopback only.

Every client loops: pick a question about a rendered scene (the image as a PNG data URI), POST it, wait for the
answer, repeat until the time is up. Reported: requests/s, p50/p99 latency, how many requests shared a batch
(in-process server) and whether any request was lost (every request sent must get a 200 with an answer).

    python benchmarks/bench_serve.py [--quick] [--clients 8] [--seconds 30] [--url http://127.0.0.1:8000]

Without --url the shipped tiny model is served in this process on a free loopback port.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import threading
import time
from urllib.parse import urlparse

import httpx

from mllm.world import scenes

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_requests(n: int, seed: int = 0, max_tokens: int = 32) -> list[dict]:
    """n chat-completion bodies (model name left out): a question about a fresh scene each."""
    rng = random.Random(f"bench-serve/{seed}")
    bodies = []
    for i in range(n):
        image, scene = scenes.render_scene(scenes.sample_scene(rng, f"s{i}"))
        question = rng.choice(scenes.DETAILED_PROMPTS) if i % 2 else rng.choice(scenes.yesno_pair(scene, rng)[1])[0]
        bodies.append({"max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(image)}}, {"type": "text", "text": question}]}]})
    return bodies


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def load_test(url: str, model: str, clients: int = 4, seconds: float = 5.0, bodies: list[dict] | None = None,
              timeout: float = 60.0) -> dict:
    """`clients` threads POSTing for `seconds` (each finishes the request it has started); the numbers."""
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: the load test runs against a loopback address only")
    bodies = bodies or sample_requests(16)
    latencies: list[float] = []
    failures: list[str] = []
    sent = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while time.monotonic() < deadline:
                body = {**rng.choice(bodies), "model": model}
                with lock:
                    sent[0] += 1
                start = time.perf_counter()
                try:
                    reply = http.post("/v1/chat/completions", json=body)
                    answer = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else None
                    problem = None if isinstance(answer, str) else f"HTTP {reply.status_code}: {reply.text[:200]}"
                except Exception as err:  # a dropped connection, a timeout: counted as lost
                    problem = f"{type(err).__name__}: {err}"
                elapsed = time.perf_counter() - start
                with lock:
                    (failures.append(problem) if problem else latencies.append(elapsed))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "seconds": round(wall, 2), "sent": sent[0], "answered": len(latencies),
            "failed": len(failures), "failures": failures[:5], "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients for 5 s")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8, help="of the in-process server")
    parser.add_argument("--url", default=None, help="a running server (loopback); default: serve one here")
    parser.add_argument("--model", default="tiny-base", help="the model id to send with --url")
    args = parser.parse_args()
    clients, seconds = (4, 5.0) if args.quick else (args.clients, args.seconds)
    bodies = sample_requests(32, max_tokens=args.max_tokens)
    if args.url:
        print(load_test(args.url, args.model, clients, seconds, bodies))
        return
    import torch

    from mllm.model.loading import default_model_dir, load_pretrained
    from mllm.serve.openai_api import BackgroundServer, create_app

    model, tokenizer, processor = load_pretrained(default_model_dir(), dtype=torch.float32, device="cpu")
    app = create_app(model, tokenizer, processor, "tiny-base", max_batch=args.max_batch)
    with BackgroundServer(app) as server:
        result = load_test(server.url, "tiny-base", clients, seconds, bodies)
        stats = app.state.engine.stats()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {clients} clients x {seconds:g} s, "
          f"max_tokens {args.max_tokens}, max_batch {args.max_batch}")
    print(f"{result['answered']} answered of {result['sent']} sent ({result['failed']} failed): "
          f"{result['requests_per_s']} requests/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    print(f"batches run: {stats['batches']}, by size: {stats['batch_sizes']}")
    if result["failed"]:
        print("failures:", *result["failures"], sep="\n  ")


if __name__ == "__main__":
    main()
