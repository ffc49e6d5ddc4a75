"""`mllm web`: a gradio demo of a loaded model in the browser.

What a visitor can do, in the order the page offers it:

- put one or more images in the gallery (upload them, or press "New synthetic scene" to draw a fresh scene of
  the built-in world, whose objects are then listed as ground truth beside the answers);
- chat about the images, several turns, the answer streamed in as it is decoded (beam search shows its answer
  whole: its best sequence is only known at the end);
- ground a referring expression: the model is asked with the exercise's grounding prompt and the box it answers
  is drawn on the image (red), beside the raw answer; on a synthetic scene the true box is drawn too (green)
  and the IoU shown;
- choose the decoding (greedy, sampling with temperature / top-p, beam) and the most new tokens.

`WebDemo` holds the model and answers the page's events (plain methods, testable without a browser);
`WebDemo.build` lays out the page; `launch` serves it. Mistakes (no image, an empty question, an unreadable
file) are answered in the page's status lines, never with a traceback.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Iterator

# A local demo has no business phoning home (and on a machine without a network the check only costs time).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from mllm.data.boxes import iou  # noqa: E402
from mllm.data.grounding_prepare import GROUNDING_PROMPT  # noqa: E402
from mllm.eval.grounding import ground  # noqa: E402
from mllm.eval.grounding_draw import draw_case  # noqa: E402
from mllm.model.generation import GenerationSettings  # noqa: E402
from mllm.model.image_processing import load_image  # noqa: E402
from mllm.world import scenes  # noqa: E402

TITLE = "mllm web demo"
DECODINGS = ("greedy", "sample", "beam")
GROUND_TOKENS = 64  # a box answer is about 20 tokens; what `mllm ground` allows too
NO_IMAGE = "**Add an image first:** upload one or more on the left, or press **New synthetic scene**."
NO_QUESTION = "**Type a question first**, e.g. *Describe the image in detail.*"
NO_EXPRESSION = ("**Type what to find first**, e.g. *the red star*; on a synthetic scene, "
                 "**Sample a referring expression** writes one for you.")
NO_SCENE_TRUTH = ("*No synthetic scene in the gallery.* Press **New synthetic scene** to draw one: its objects are "
                  "listed here so you can judge the answers.")
# Small synthetic images are enlarged by the browser; nearest-neighbour keeps their edges honest.
CSS = """
#images img, #ground-image img { image-rendering: pixelated; }
#chat-status p, #ground-status p { margin: 0; }
"""


@dataclass(frozen=True)
class SceneState:
    """The synthetic scene in the gallery (first image), with the seed that draws it again."""

    seed: int
    scene: scenes.Scene


# ---- reading the page's inputs ---------------------------------------------------------------------------------

def gallery_images(items) -> list[Image.Image]:
    """RGB images of a gallery value (file paths, or (path, caption) pairs); ValueError names an unreadable one."""
    images = []
    for item in items or []:
        source = item[0] if isinstance(item, (list, tuple)) else item
        images.append(load_image(source if isinstance(source, Image.Image) else str(source)))
    return images


def generation_settings(decoding: str, temperature: float, top_p: float, max_new_tokens: int) -> GenerationSettings:
    """The settings of the decoding controls; temperature and top-p only matter to sampling."""
    overrides = {"temperature": float(temperature), "top_p": float(top_p)} if decoding == "sample" else {}
    return GenerationSettings(decoding=decoding, max_new_tokens=int(max_new_tokens), overrides=overrides)


# ---- what the page shows about a synthetic scene ---------------------------------------------------------------

def scene_truth_markdown(state: SceneState | None) -> str:
    """The scene's objects as a table: colour, category, position phrase and pixel box."""
    if state is None:
        return NO_SCENE_TRUTH
    scene = state.scene
    rows = ["| # | colour | object | where | box (pixels) |", "|---|---|---|---|---|"]
    for i, obj in enumerate(scene.objects, 1):
        where = scenes.CELL_PHRASES[scenes.grid_cell(obj, scene.width, scene.height)]
        rows.append(f"| {i} | {obj.colour} | {obj.category} | {where} | {list(obj.bbox)} |")
    count = scenes.number_phrase(len(scene.objects), "object")
    return (f"**Ground truth** of scene {state.seed} ({scene.width}x{scene.height} px): {count}.\n\n"
            + "\n".join(rows))


def true_object(state: SceneState | None, expression: str) -> tuple[int | None, str]:
    """(index of the one scene object `expression` names, or None; a note for the page when there is none)."""
    if state is None:
        return None, ""
    try:
        colour, category, qualifier = scenes.parse_referring_expression(expression.strip().rstrip(".").lower())
    except ValueError:
        return None, ("*No true box: the expression is not in the scene world's words* "
                      "(`the <colour> <object> [<position>]`, e.g. `the red star on the left`).")
    hits = scenes.objects_matching(state.scene, colour, category, qualifier)
    if len(hits) == 1:
        return hits[0], ""
    return None, f"*No true box: the expression fits {len(hits)} objects of the scene, not exactly one.*"


# ---- the model behind the page ---------------------------------------------------------------------------------

class WebDemo:
    """One loaded model and the page's event handlers. Handlers take and return plain values (gradio's inputs
    and outputs in order), so tests can call them without a browser."""

    def __init__(self, model, tokenizer, processor):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    # -- chat ------------------------------------------------------------------------------------------------------
    def chat(self, question: str, items, history: list[dict] | None, decoding: str, temperature: float,
             top_p: float, max_new_tokens: int) -> Iterator[tuple[list[dict], str, str]]:
        """Yield (conversation, question box, status) as the answer grows; the conversation holds plain-text
        {role, content} turns (the images go in front of the first question, as in training)."""
        history = list(history or [])
        question = (question or "").strip()
        if not items:
            yield history, question, NO_IMAGE
            return
        if not question:
            yield history, "", NO_QUESTION
            return
        try:
            images = gallery_images(items)
            settings = generation_settings(decoding, temperature, top_p, max_new_tokens)
        except ValueError as err:
            yield history, question, f"**Cannot use that:** {err}"
            return
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": ""})
        yield history, "", f"*answering ({decoding}) ...*"
        start = time.perf_counter()
        try:
            stream = settings.decoding != "beam"  # beam search's best sequence is only known at the end
            result = self.model.chat(images, history[:-1], self.tokenizer, processor=self.processor, stream=stream,
                                     decoding=settings.decoding, max_new_tokens=settings.max_new_tokens,
                                     **settings.overrides)
            for piece in (result if stream else [result]):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history, "", f"*answering ({decoding}) ...*"
        except (ValueError, RuntimeError) as err:  # e.g. a prompt longer than the model's context
            history[-1] = {"role": "assistant", "content": "(no answer)"}
            yield history, "", f"**The model could not answer:** {err}"
            return
        if not history[-1]["content"]:
            history[-1] = {"role": "assistant", "content": "(empty answer)"}
        n_images = f"{len(images)} image{'s' if len(images) > 1 else ''}"
        yield history, "", f"{decoding}, {n_images}, {time.perf_counter() - start:.2f} s"

    # -- grounding -------------------------------------------------------------------------------------------------
    def ground(self, expression: str, items, selected: int, scene: SceneState | None,
               max_new_tokens: int = GROUND_TOKENS) -> tuple[Image.Image | None, str, str]:
        """(picture with the boxes, answer text, status) for `expression` in the selected gallery image."""
        expression = (expression or "").strip()
        if not items:
            return None, "", NO_IMAGE
        if not expression:
            return None, "", NO_EXPRESSION
        index = selected if 0 <= (selected or 0) < len(items) else 0
        try:
            image = gallery_images([items[index]])[0]
        except ValueError as err:
            return None, "", f"**Cannot use that:** {err}"
        start = time.perf_counter()
        try:
            # Greedy, as the model was trained and is evaluated; the unpadded frame is the course's convention.
            result = ground(self.model, self.tokenizer, self.processor, image, expression,
                            max_new_tokens=int(max_new_tokens))
        except (ValueError, RuntimeError) as err:
            return None, "", f"**The model could not answer:** {err}"
        truth_index, note = true_object(scene if index == 0 else None, expression)
        gt = list(scene.scene.objects[truth_index].bbox) if truth_index is not None else None
        pred = result["pixel_box"]
        picture = draw_case(image, expression, gt=gt, pred=pred)
        lines = [f"**Asked:** {GROUNDING_PROMPT.format(expression=expression)}",
                 f"**Answer:** `{result['answer'] or '(empty)'}`"]
        if pred is None:
            lines.append("**Box:** none: the answer holds no box, so nothing is drawn.")
        else:
            lines.append(f"**Box (red):** {fmt_box(pred)} pixels in the {image.width}x{image.height} image "
                         f"(grid {fmt_box(result['grid_box'])} of 0-1000)")
        if gt is not None:
            overlap = iou(pred, gt) if pred is not None else 0.0
            verdict = "a hit (IoU >= 0.5)" if overlap >= 0.5 else "a miss (IoU < 0.5)"
            lines.append(f"**True box (green):** {fmt_box(gt)}; IoU {overlap:.2f}, {verdict}")
        elif note:
            lines.append(note)
        status = f"image {index + 1} of {len(items)}, greedy, {time.perf_counter() - start:.2f} s"
        return picture, "\n\n".join(lines), status

    # -- synthetic scenes ------------------------------------------------------------------------------------------
    def new_scene(self, seed: int | None = None) -> tuple[list, SceneState, str, list, str, str]:
        """A fresh scene in the gallery: (gallery, scene state, truth, emptied conversation, chat status,
        grounding status)."""
        seed = random.SystemRandom().randrange(1_000_000) if seed is None else int(seed)
        image, scene = scenes.render_scene(scenes.sample_scene(random.Random(seed), f"web-{seed}"))
        state = SceneState(seed, scene)
        started = f"New scene {seed}: conversation restarted."
        return [(image, scene_caption(seed))], state, scene_truth_markdown(state), [], started, started

    def sample_expression(self, scene: SceneState | None) -> tuple[str, str]:
        """(a referring expression naming one object of the scene, status)."""
        if scene is None:
            return "", "**Draw a synthetic scene first:** the helper picks one of its objects."
        rng = random.Random()
        order = list(range(len(scene.scene.objects)))
        rng.shuffle(order)
        for index in order:
            expression = scenes.referring_expression(scene.scene, index, rng)
            if expression is not None:
                return expression, f"Object {index + 1} of the ground truth table."
        return "", "No object of this scene can be named alone; draw another scene."

    # -- the page --------------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """The page: images and decoding controls on the left, chat and grounding tabs on the right."""
        with gr.Blocks(title=TITLE) as page:
            scene = gr.State(None)
            history = gr.State([])
            selected = gr.State(0)
            gr.Markdown(f"## {TITLE}\nAsk the model about images, or let it find things in them. "
                        "A synthetic scene comes with its ground truth, so you can judge the answers.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=300):
                    gr.Markdown("**Images**: the model sees all of them; grounding looks at the selected one.")
                    gallery = gr.Gallery(show_label=False, type="filepath", format="png", file_types=["image"],
                                         interactive=True, columns=2, fit_columns=False, object_fit="contain",
                                         preview=False, height=250, elem_id="images")
                    with gr.Row(equal_height=True):
                        new_scene = gr.Button("New synthetic scene", scale=2, elem_id="new-scene")
                        scene_seed = gr.Textbox("", show_label=False, container=False, max_lines=1,
                                                placeholder="seed (optional)", scale=1, min_width=140,
                                                elem_id="scene-seed")
                    truth = gr.Markdown(NO_SCENE_TRUTH, elem_id="scene-truth")
                with gr.Column(scale=3, min_width=360):
                    with gr.Tabs():
                        with gr.Tab("Chat", elem_id="tab-chat"):
                            chatbot = gr.Chatbot(label="Conversation", height=340, elem_id="chatbot",
                                                 placeholder="Answers appear here, streamed as they are written.",
                                                 feedback_options=None, buttons=["copy", "copy_all"])
                            question = gr.Textbox(label="Question", placeholder="e.g. Describe the image in detail.",
                                                  lines=1, elem_id="question")
                            with gr.Row():
                                send = gr.Button("Send", variant="primary", elem_id="send")
                                clear = gr.Button("Clear conversation", elem_id="clear")
                            chat_status = gr.Markdown("", elem_id="chat-status")
                            with gr.Accordion("Decoding", open=True):
                                with gr.Row():
                                    decoding = gr.Radio(list(DECODINGS), value="greedy", label="Decoding",
                                                        info="beam search answers whole (it cannot stream)",
                                                        elem_id="decoding")
                                    max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="Max new tokens",
                                                               elem_id="max-new-tokens")
                                with gr.Row():
                                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature",
                                                            visible=False, elem_id="temperature")
                                    top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p", visible=False,
                                                      elem_id="top-p")
                        with gr.Tab("Grounding", elem_id="tab-grounding"):
                            expression = gr.Textbox(label="Referring expression", lines=1, elem_id="expression",
                                                    placeholder="e.g. the red star on the left")
                            with gr.Row():
                                find = gr.Button("Find it", variant="primary", elem_id="find")
                                sample = gr.Button("Sample a referring expression", elem_id="sample-expression")
                            with gr.Row(equal_height=False):
                                picture = gr.Image(label="Boxes (red: model, green: truth)", type="pil",
                                                   format="png", interactive=False, height=380,
                                                   elem_id="ground-image")
                                answer = gr.Markdown("*The model's answer and box appear here.*",
                                                     elem_id="ground-answer")
                            ground_status = gr.Markdown("", elem_id="ground-status")
                            gr.Markdown(f"The model is asked `{GROUNDING_PROMPT}` and decodes greedily, as in its "
                                        "training; the box is read on the 0-1000 grid of the image.")

            model_events = dict(concurrency_id="model", concurrency_limit=1)  # one model: one answer at a time
            chat_inputs = [question, gallery, history, decoding, temperature, top_p, max_new_tokens]

            def chat(*args):
                for turns, box, status in self.chat(*args):
                    yield turns, turns, box, status

            for trigger in (send.click, question.submit):
                trigger(chat, chat_inputs, [chatbot, history, question, chat_status], **model_events)
            clear.click(lambda: ([], [], "", "", None, "", ""), None,
                        [chatbot, history, question, chat_status, picture, answer, ground_status])

            ground_inputs = [expression, gallery, selected, scene]
            for trigger in (find.click, expression.submit):
                trigger(self.ground, ground_inputs, [picture, answer, ground_status], **model_events)
            sample.click(self.sample_expression, scene, [expression, ground_status])

            def draw_scene(seed_text):
                seed = (seed_text or "").strip()
                if seed and not seed.isdigit():
                    note = f"**The seed must be a whole number** (or empty for a fresh scene), not `{seed}`."
                    return (*(gr.skip(),) * 6, note, gr.skip(), gr.skip(), note)
                images, state, text, turns, chat_note, ground_note = self.new_scene(int(seed) if seed else None)
                return images, state, text, turns, turns, 0, chat_note, None, "", ground_note

            new_scene.click(draw_scene, scene_seed, [gallery, scene, truth, chatbot, history, selected, chat_status,
                                               picture, answer, ground_status])

            # New images make the conversation (and any scene's truth) about something else. `change` also fires
            # when "New synthetic scene" fills the gallery: that one is recognised by its caption and kept.
            def images_changed(items, state):
                if state is not None and is_scene_gallery(items, state):
                    return (gr.skip(),) * 7
                note = "New images: conversation restarted." if items else "No images: add one to start."
                return None, NO_SCENE_TRUTH, [], [], 0, note, note

            gallery.change(images_changed, [gallery, scene],
                           [scene, truth, chatbot, history, selected, chat_status, ground_status])
            chatbot.clear(lambda: ([], ""), None, [history, chat_status])
            def select(evt: gr.SelectData):
                return evt.index

            gallery.select(select, None, selected)
            decoding.change(lambda d: (gr.update(visible=d == "sample"),) * 2, decoding, [temperature, top_p])
        return page


def scene_caption(seed: int) -> str:
    return f"synthetic scene {seed}"


def is_scene_gallery(items, state: SceneState) -> bool:
    """Whether the gallery holds just the image "New synthetic scene" put there (recognised by its caption)."""
    if not items or len(items) != 1 or not isinstance(items[0], (list, tuple)) or len(items[0]) < 2:
        return False
    return items[0][1] == scene_caption(state.seed)


def fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def build_app(model, tokenizer, processor) -> gr.Blocks:
    """The demo's page for a loaded (model, tokenizer, processor)."""
    return WebDemo(model, tokenizer, processor).build()


def launch(model, tokenizer, processor, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, announce=None) -> gr.Blocks:
    """Serve the demo on host:port (loopback by default; `share=True` opens a public gradio link, only when asked).

    `announce(url)` is called once the server answers. With `block` the call serves until Ctrl-C; without it
    returns the running page (`page.close()` stops it)."""
    page = build_app(model, tokenizer, processor)
    page.queue(default_concurrency_limit=1)
    _, url, share_url = page.launch(server_name=host, server_port=port, share=share, quiet=True,
                                    prevent_thread_lock=True, ssr_mode=False, css=CSS, footer_links=[])
    if announce is not None:
        announce(share_url or url)
    if block:
        page.block_thread()
    return page
