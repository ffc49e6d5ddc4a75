"""`mllm demo`: the shipped tiny model on fresh synthetic scenes it has never seen.

It generates scenes with a new seed, lets the model describe a few of them, answer their yes/no questions
and ground a referring expression, scores it on a small held-out set (CHAIR on descriptions, yes/no accuracy,
grounding Acc@IoU>=0.5), and writes an HTML report with the images, drawn boxes and answers.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

SHOWCASE = 4


def draw_boxes(image, boxes: list[tuple[list[float], str]]):
    from PIL import ImageDraw

    image = image.copy()
    draw = ImageDraw.Draw(image)
    for box, colour in boxes:
        draw.rectangle([round(v) for v in box], outline=colour, width=2)
    return image


def png_data_uri(image, scale: int = 2) -> str:
    image = image.resize((image.width * scale, image.height * scale))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def showcase(model_dir: Path, world: Path, n: int, runtime: dict | None = None) -> list[dict]:
    """Describe, question and ground the first `n` held-out scenes."""
    from mllm.data.grounding_prepare import GROUNDING_PROMPT
    from mllm.data.boxes import grid_to_pixel, iou, parse_box
    from mllm.model.image_processing import load_image
    from mllm.model.loading import load_pretrained

    from mllm.model.loading import DTYPES

    runtime = runtime or {}
    model, tokenizer, processor = load_pretrained(model_dir, dtype=DTYPES[runtime.get("dtype", "float32")],
                                                  device=runtime.get("device", "cpu"),
                                                  attn_implementation=runtime.get("attn", "sdpa"),
                                                  adapter=runtime.get("adapter"))
    bench = [json.loads(line) for line in (world / "bench.jsonl").read_text().splitlines()][:n]
    yesno = json.loads((world / "yesno_test.json").read_text())
    recs = [json.loads(line) for line in (world / "rec_test.jsonl").read_text().splitlines()]
    cases = []
    for item in bench:
        image = load_image(str(world / item["image"]))
        ask = lambda q, tokens=96: model.chat(image, [{"role": "user", "content": q}], tokenizer,
                                              processor=processor, max_new_tokens=tokens)
        case = {"image_id": item["image_id"], "question": item["question"], "description": ask(item["question"], 160),
                "yesno": [], "grounding": None}
        for q in (q for q in yesno if q["image"] == item["image"]):
            question = q["conversations"][0]["content"].replace("<image>", "").strip()
            case["yesno"].append({"question": question, "answer": ask(question, 4),
                                  "target": q["conversations"][1]["content"]})
        rec = next((r for r in recs if r["img_path"] == item["image"]), None)
        boxes = [(rec["bbox"], "#1a9850")] if rec else []
        if rec:
            answer = ask(GROUNDING_PROMPT.format(expression=rec["expression"]), 24)
            parsed = parse_box(answer)
            predicted = grid_to_pixel(parsed[0], image.width, image.height, square_pad=False) if parsed else None
            case["grounding"] = {"expression": rec["expression"], "answer": answer, "box": predicted,
                                 "iou": iou(predicted, rec["bbox"]) if predicted else 0.0}
            if predicted:
                boxes.append((predicted, "#d73027"))
        case["picture"] = png_data_uri(draw_boxes(image, boxes))
        cases.append(case)
    return cases


def report_html(cases: list[dict], scores: dict, model_dir: Path, seconds: float) -> str:
    rows = []
    for c in cases:
        qa = "".join(f"<li>{html.escape(q['question'])} &rarr; <b>{html.escape(q['answer'])}</b> "
                     f"(truth: {html.escape(q['target'])})</li>" for q in c["yesno"])
        g = c["grounding"]
        ground = (f"<p><b>Grounding</b> &ldquo;{html.escape(g['expression'])}&rdquo; &rarr; "
                  f"<code>{html.escape(g['answer'])}</code>, IoU {g['iou']:.2f} "
                  f"(green: truth, red: model)</p>") if g else ""
        rows.append(f"<div class='case'><img src='{c['picture']}'><div><p><i>{html.escape(c['question'])}</i></p>"
                    f"<p>{html.escape(c['description'])}</p><ul>{qa}</ul>{ground}</div></div>")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in scores.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mllm demo</title><style>
body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} .case{{display:flex;gap:1.5em;margin:1.5em 0;
border-bottom:1px solid #ddd;padding-bottom:1em}} img{{image-rendering:pixelated;max-width:340px;align-self:start}}
td{{padding:.2em 1em}}</style></head><body><h1>mllm demo</h1>
<p>Model: <code>{html.escape(str(model_dir))}</code>. Fresh synthetic scenes (never seen in training); {seconds:.0f} s.</p>
<h2>Held-out scores</h2><table>{table}</table><h2>Cases</h2>{''.join(rows)}</body></html>"""


def run(model_dir: Path, out: Path, seed: int, n_eval: int, runtime: dict | None = None) -> Path:
    """The demo of `model_dir` into `out`, which must be claimed (`mllm.outputs.claim_output_dir`)."""
    from mllm.course.shared import answer_yesno, describe_and_score, ground_and_score
    from mllm.world.synth import generate

    started = time.time()
    world = out / "world"
    generate(world, n_train=0, n_test=n_eval, seed=seed, caption_noise=0.0, progress=False)
    print(f"generated {n_eval} fresh scenes (seed {seed}) in {world}")
    cases = showcase(model_dir, world, SHOWCASE, runtime)
    for c in cases:
        print(f"\n[{c['image_id']}] {c['question']}\n  {c['description']}")
        for q in c["yesno"]:
            print(f"  {q['question']} -> {q['answer']} (truth {q['target']})")
        if c["grounding"]:
            g = c["grounding"]
            print(f"  ground '{g['expression']}' -> {g['answer']} (IoU {g['iou']:.2f})")
    chair = describe_and_score(model_dir, world, out, runtime=runtime)
    yesno = answer_yesno(model_dir, world, out, runtime=runtime)
    grounding = ground_and_score(model_dir, world, out, runtime=runtime)
    scores = {
        "CHAIRs / CHAIRi (lower is better)": f"{100 * chair['CHAIRs']:.1f} / {100 * chair['CHAIRi']:.1f}",
        "Recall / Len": f"{100 * chair['Recall']:.1f} / {chair['Len']:.1f}",
        "yes/no acc / acc+": f"{yesno['acc']:.3f} / {yesno['acc_plus']:.3f}",
        "grounding Acc@IoU>=0.5": f"{grounding['accuracy']:.3f} ({grounding['n']} expressions)",
    }
    report = out / "report.html"
    report.write_text(report_html(cases, scores, model_dir, time.time() - started))
    (out / "scores.json").write_text(json.dumps({"chair": chair, "yesno": yesno, "grounding": grounding}, indent=2))
    print("\nheld-out scores:")
    for k, v in scores.items():
        print(f"  {k:<36} {v}")
    return report


def run_demo(model_dir: Path | None, out: Path, seed: int, n_eval: int, runtime: dict | None = None) -> Path:
    """The whole demo into `out`: the shipped model (or `model_dir`) on `n_eval` new scenes of `seed`; without a
    shipped model, a randomly initialised tiny checkpoint (said so loudly). Returns the report's path.
    `runtime`: where and how the model runs (device, dtype, attn, adapter: `mllm.eval.answer.run`'s names).

    `out` is claimed (`mllm.outputs`): a rerun replaces only what the demo wrote there; a non-empty folder the
    demo did not write is refused with OutputDirError and left as it is."""
    import torch

    from mllm.model.loading import default_model_dir
    from mllm.outputs import claim_output_dir, finish_output_dir

    torch.manual_seed(0)
    claim_output_dir(out, "mllm demo")
    if model_dir is None:
        try:
            model_dir = default_model_dir()
        except FileNotFoundError:
            from mllm.model.random_checkpoint import make_random_checkpoint
            from mllm.world.corpus import default_corpus

            model_dir = out / "random-tiny"
            print("NOTE: the shipped tiny model is missing from this installation (`mllm course --stage base`"
                  f" trains one); the demo runs a RANDOMLY INITIALISED tiny checkpoint written to {model_dir}:"
                  " expect chance-level scores and meaningless text.")
            make_random_checkpoint(model_dir, "tiny", texts=default_corpus(), seed=0)
    report = run(model_dir, out, seed, n_eval, runtime)
    finish_output_dir(out)
    return report
