"""`mllm <verb> ...`: the one table of verbs.

Each verb names the `mllm.cli` module whose `main(argv)` parses its arguments and calls the library; modules
are imported only when their verb runs, so `mllm --help` stays fast and a verb's heavy imports never slow down
another.

A user's mistake (a missing or unreadable file, a malformed record, a stale cache, a bad value) surfaces from the
library as an OSError or a ValueError with a message naming the file and field; here it becomes one line,
`mllm <verb>: <message>`, and exit status 1, never a Python traceback. `MLLM_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# verb -> (module, one-line help). A verb with sub-verbs maps "verb sub" keys.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("mllm.cli.demo", "describe, question and ground fresh synthetic scenes with the shipped model; write a report"),
    "chat": ("mllm.cli.chat", "chat about an image (streams; interactive without a question)"),
    "answer": ("mllm.cli.answer", "answer a question file (Object HalBench jsonl) into an answers jsonl; resumable"),
    "ground": ("mllm.cli.ground", "find a referring expression in an image; print and draw the box"),
    "synth": ("mllm.cli.synth", "generate the synthetic scene world and every task file"),
    "eval chair": ("mllm.cli.eval_chair", "CHAIR hallucination metrics of an answers file"),
    "eval yesno": ("mllm.cli.eval_yesno", "yes/no accuracy (MME acc / acc+) of an answers file"),
    "eval grounding": ("mllm.cli.eval_grounding", "Acc@IoU>=0.5 per split of predicted boxes (or of a model on REC files)"),
    "train sft": ("mllm.cli.train_sft", "supervised fine-tuning"),
    "train grounding": ("mllm.cli.train_grounding", "visual-grounding fine-tuning"),
    "train preference": ("mllm.cli.train_preference", "preference alignment (DPO family)"),
    "grounding prepare": ("mllm.cli.grounding_prepare", "Shikra-format annotations -> grounding SFT conversations"),
    "preference pairs": ("mllm.cli.preference_pairs", "preference pairs from a model's own sampled descriptions, "
                                                      "judged by the synthetic world's ground truth"),
    "logp": ("mllm.cli.logp", "cache reference log-probs of a preference file"),
    "course": ("mllm.cli.course", "run the exercise's arc on the tiny model, stage by stage"),
    "init": ("mllm.cli.init", "write a randomly initialised checkpoint of a preset"),
    "merge": ("mllm.cli.merge", "fold a LoRA adapter into its base model and write a plain checkpoint"),
    "serve": ("mllm.cli.serve", "an OpenAI-compatible HTTP API (chat completions, streaming) for a model"),
    "web": ("mllm.cli.web", "a web demo (gradio): chat about images, ground expressions, try fresh synthetic scenes"),
}


def _usage() -> str:
    lines = ["usage: mllm <verb> [args...]", "", "verbs:"]
    width = max(len(v) for v in VERBS)
    for verb, (_, text) in VERBS.items():
        lines.append(f"  {verb:<{width}}  {text}")
    lines += ["", "Run `mllm <verb> --help` for a verb's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    key = argv[0]
    rest = argv[1:]
    if key not in VERBS and rest and f"{key} {rest[0]}" in VERBS:
        key, rest = f"{key} {rest[0]}", rest[1:]
    if key not in VERBS:
        subs = [v for v in VERBS if v.startswith(key + " ")]
        if subs:
            print(f"mllm {key}: choose one of: {', '.join(s.split(' ', 1)[1] for s in subs)}", file=sys.stderr)
        else:
            print(f"mllm: unknown verb {key!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = VERBS[key]
    module = importlib.import_module(module_name)
    try:
        return int(module.main(rest) or 0)
    except (OSError, ValueError) as err:
        if os.environ.get("MLLM_DEBUG"):
            raise
        print(f"mllm {key}: {user_message(err)}\n(set MLLM_DEBUG=1 to see where it came from)", file=sys.stderr)
        return 1


def user_message(err: BaseException) -> str:
    """The message of a user-facing error: `path: reason` for a file the system could not open, the message
    itself for this project's errors, the exception's type beside any other message."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror.lower()}"
    text = str(err).strip()
    if not text:
        return type(err).__name__
    if type(err) in (ValueError, OSError) or type(err).__module__.startswith("mllm"):
        return text
    return f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
