"""`mllm demo`: the shipped tiny model on fresh synthetic scenes it has never seen.

It generates scenes with a new seed, lets the model describe a few of them, answer their yes/no questions
and ground a referring expression, scores it on a small held-out set (CHAIR on descriptions, yes/no accuracy,
grounding Acc@IoU>=0.5), and writes an HTML report with the images, drawn boxes and answers. Every score stands
beside its n, the score of chance on the same items and a verdict; every answer is marked right or wrong and the
object words a description invents are highlighted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
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


# ---- calibration: what the scores would be by chance --------------------------------------------------------------

def binomial_verdict(score: float, chance: float, n: int) -> str:
    """'at chance' when `score` is within two binomial standard errors of `chance` (or below it)."""
    se = math.sqrt(max(chance * (1 - chance), 1e-12) / max(n, 1))
    if score <= chance + 2 * se:
        return f"AT CHANCE: within 2 standard errors ({2 * se:.3f}) of {chance:.3f}"
    return f"above chance (by {(score - chance) / se:.1f} standard errors)"


def grounding_chance(world: Path, threshold: float = 0.5) -> float:
    """Acc@IoU>=threshold of answering each expression with the true box of another expression of the set: a
    guess with the right box sizes and places in general, but no look at this image."""
    from mllm.data.boxes import iou

    boxes = [json.loads(line)["bbox"] for line in (world / "rec_test.jsonl").read_text().splitlines()]
    hits = pairs = 0
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes):
            if i != j:
                hits += iou(b, a) >= threshold
                pairs += 1
    return hits / pairs if pairs else 0.0


def chair_chance(sentences: list[dict], n_categories: int) -> dict:
    """CHAIRs, CHAIRi and Recall of a describer that names, for each image, as many distinct object categories as
    the model did, drawn uniformly from the vocabulary's `n_categories` (expected values)."""
    chairs = chairi = recall = 0.0
    for s in sentences:
        k = min(len(set(s["mscoco_generated_words"])), n_categories)
        present = min(len(s["mscoco_gt_words"]), n_categories)
        chairs += 1 - math.comb(present, k) / math.comb(n_categories, k) if k else 0.0
        chairi += 1 - present / n_categories if k else 0.0
        recall += k / n_categories
    n = max(len(sentences), 1)
    return {"CHAIRs": chairs / n, "CHAIRi": chairi / n, "Recall": recall / n}


def highlight_hallucinations(text: str, vocab, present: set[str]) -> str:
    """HTML of a description with each object word the image does not hold marked (CHAIR's own word mapping)."""
    from mllm.eval.chair import singularize

    pieces = []
    for piece in re.findall(r"[A-Za-z]+|[^A-Za-z]+", text):
        node = vocab.node_of.get(singularize(piece.lower())) if piece[0].isalpha() else None
        escaped = html.escape(piece)
        pieces.append(f"<mark title='not in the image'>{escaped}</mark>" if node and node not in present else escaped)
    return "".join(pieces)


MARK = {True: "<span class='ok' title='right'>&#10003;</span>", False: "<span class='no' title='wrong'>&#10007;</span>"}


def report_html(cases: list[dict], rows: list[dict], model_dir: Path, seconds: float, vocab, gt: dict) -> str:
    """The report: held-out scores with n, a chance baseline and a verdict each, then the showcase cases with a
    mark per answer and hallucinated object words highlighted. Fits a phone screen."""
    blocks = []
    for c in cases:
        qa = "".join(f"<li>{MARK[q['answer'].strip().lower().startswith(q['target'].strip().lower())]} "
                     f"{html.escape(q['question'])} &rarr; <b>{html.escape(q['answer'])}</b> "
                     f"(truth: {html.escape(q['target'])})</li>" for q in c["yesno"])
        g = c["grounding"]
        ground = (f"<p>{MARK[g['iou'] >= 0.5]} <b>Grounding</b> &ldquo;{html.escape(g['expression'])}&rdquo; &rarr; "
                  f"<code>{html.escape(g['answer'])}</code>, IoU {g['iou']:.2f} "
                  f"(green: truth, red: model)</p>") if g else ""
        present = set(gt.get(c["image_id"], gt.get(str(c["image_id"]), [])))
        description = highlight_hallucinations(c["description"], vocab, present)
        blocks.append(f"<div class='case'><img src='{c['picture']}' alt='scene {html.escape(str(c['image_id']))}'>"
                      f"<div><p><i>{html.escape(c['question'])}</i></p><p>{description}</p><ul>{qa}</ul>{ground}"
                      f"</div></div>")
    table = "".join(f"<tr><td data-label='metric'>{html.escape(r['metric'])}</td>"
                    f"<td data-label='model'><b>{html.escape(r['value'])}</b></td>"
                    f"<td data-label='n'>{r['n']}</td><td data-label='chance'>{html.escape(r['chance'])}</td>"
                    f"<td data-label='verdict' class='{'chance' if r['verdict'].startswith('AT CHANCE') else ''}'>"
                    f"{html.escape(r['verdict'])}</td></tr>" for r in rows)
    at_chance = [r["metric"] for r in rows if r["verdict"].startswith("AT CHANCE")]
    warning = (f"<p class='warn'>At chance: {html.escape(', '.join(at_chance))}. On these the model does no better "
               f"than guessing.</p>") if at_chance else ""
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>mllm demo</title><style>
body{{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 .8em;line-height:1.4}}
.case{{display:flex;flex-wrap:wrap;gap:1em 1.5em;margin:1.5em 0;border-bottom:1px solid #ddd;padding-bottom:1em}}
.case>div{{flex:1 1 280px;min-width:0}} img{{image-rendering:pixelated;width:340px;max-width:100%;align-self:start}}
.scroll{{overflow-x:auto}} table{{border-collapse:collapse}} td,th{{padding:.25em .7em;text-align:left;
vertical-align:top;border-bottom:1px solid #eee}} mark{{background:#fdd;color:#a00;padding:0 .1em}}
.ok{{color:#1a7a3a;font-weight:bold}} .no{{color:#c0262d;font-weight:bold}} .chance{{color:#c0262d}}
.warn{{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em .8em}} code{{word-break:break-all}}
@media (max-width:600px){{table,tbody,tr,td{{display:block}} tr:first-child{{display:none}}
tr{{border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.3em}} td{{border:0;padding:.15em .4em}}
td::before{{content:attr(data-label) ": ";color:#666}} td[data-label=metric]{{font-weight:bold}}
td[data-label=metric]::before{{content:""}}}}
</style></head><body><h1>mllm demo</h1>
<p>Model: <code>{html.escape(str(model_dir))}</code>. Fresh synthetic scenes (never seen in training); {seconds:.0f} s.</p>
<h2>Held-out scores</h2>{warning}<div class='scroll'><table><tr><th>metric</th><th>model</th><th>n</th>
<th>chance</th><th>verdict</th></tr>{table}</table></div>
<p>Chance: yes/no answered by a coin (acc 0.5, both questions of a pair right 0.25); grounding answered with the
true box of another expression of the set; CHAIR of a describer naming as many object categories as the model did,
drawn at random.</p>
<h2>Cases</h2><p><mark>marked</mark> words name objects the image does not hold; &#10003; / &#10007; mark each
answer right or wrong.</p>{''.join(blocks)}</body></html>"""


def score_rows(chair_result: dict, yesno_result: dict, grounding_result: dict, world: Path, vocab) -> list[dict]:
    """One row per held-out metric: value, n, chance baseline and verdict."""
    overall = chair_result["overall_metrics"]
    chance = chair_chance(chair_result.get("sentences", []), len(set(vocab.node_of.values())))
    n_captions = chair_result.get("counts", {}).get("captions", 0)
    yn = yesno_result["overall"]
    n_pairs = yn["n_images"]
    ground = grounding_result["overall"]
    ground_chance = grounding_chance(world)
    better = "lower than a random describer" if overall["CHAIRi"] < chance["CHAIRi"] else "NOT lower than random"
    return [
        {"metric": "CHAIRs / CHAIRi (lower is better)", "n": f"{n_captions} descriptions",
         "value": f"{100 * overall['CHAIRs']:.1f} / {100 * overall['CHAIRi']:.1f}",
         "chance": f"{100 * chance['CHAIRs']:.1f} / {100 * chance['CHAIRi']:.1f}", "verdict": better},
        {"metric": "Recall / Len", "n": f"{n_captions} descriptions",
         "value": f"{100 * overall['Recall']:.1f} / {overall['Len']:.1f}", "chance": f"{100 * chance['Recall']:.1f} / -",
         "verdict": "higher than a random describer" if overall["Recall"] > chance["Recall"] else "NOT above random"},
        {"metric": "yes/no accuracy", "n": f"{yn['n_questions']} questions", "value": f"{yn['acc']:.3f}",
         "chance": "0.500", "verdict": binomial_verdict(yn["acc"], 0.5, yn["n_questions"])},
        {"metric": "yes/no acc+ (both of a pair right)", "n": f"{n_pairs} pairs", "value": f"{yn['acc_plus']:.3f}",
         "chance": "0.250", "verdict": binomial_verdict(yn["acc_plus"], 0.25, n_pairs)},
        {"metric": "grounding Acc@IoU>=0.5", "n": f"{ground['n']} expressions", "value": f"{ground['accuracy']:.3f}",
         "chance": f"{ground_chance:.3f}", "verdict": binomial_verdict(ground["accuracy"], ground_chance, ground["n"])},
    ]


def run(model_dir: Path, out: Path, seed: int, n_eval: int, runtime: dict | None = None) -> Path:
    """The demo of `model_dir` into `out`, which must be claimed (`mllm.outputs.claim_output_dir`)."""
    from mllm.course.shared import answer_yesno, describe_and_score, ground_and_score
    from mllm.eval.chair import load_chair_gt
    from mllm.jsonio import write_json_atomic, write_text_atomic
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
    describe_and_score(model_dir, world, out, runtime=runtime)
    answer_yesno(model_dir, world, out, runtime=runtime)
    ground_and_score(model_dir, world, out, runtime=runtime)
    # the full results the three steps wrote (sentences, per-question counts), for n and the chance baselines
    results = {name: json.loads((out / file).read_text())
               for name, file in (("chair", "chair_greedy.json"), ("yesno", "yesno.json"), ("grounding", "grounding.json"))}
    vocab, gt = load_chair_gt(world / "chair_gt.json")
    rows = score_rows(results["chair"], results["yesno"], results["grounding"], world, vocab)
    report = out / "report.html"
    write_text_atomic(report, report_html(cases, rows, model_dir, time.time() - started, vocab, gt))
    write_json_atomic(out / "scores.json", {"chair": results["chair"]["overall_metrics"],
                                            "yesno": results["yesno"]["overall"],
                                            "grounding": results["grounding"]["overall"],
                                            "rows": rows})
    print("\nheld-out scores (chance in brackets):")
    for r in rows:
        print(f"  {r['metric']:<38} {r['value']:<14} [{r['chance']}]  n={r['n']}  {r['verdict']}")
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
