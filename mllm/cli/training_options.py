"""The options of the `mllm train` verbs: a YAML or JSON config file plus command-line overrides, and a short help.

    mllm train sft configs/sft_tiny.yaml --max_steps 2 --output-dir runs/try

- A config file (first argument, `.yaml` / `.yml` / `.json`, a mapping of option name -> value) gives the
  options; flags after it override it (the later wins, as in TRL). Unknown keys are refused with the file named.
- Option names take dashes or underscores alike (`--max-steps` = `--max_steps`), in flags and in files.
- `--help` is short and grouped (model / data / training, the training group limited to the options people
  use); `--help-all` prints every one of transformers' TrainingArguments too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

# The TrainingArguments the short help shows (the rest: --help-all).
COMMON_TRAINING = ("output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "weight_decay", "logging_steps", "save_strategy", "save_steps", "save_total_limit", "bf16",
                   "activation_checkpointing", "deepspeed", "report_to", "seed", "resume_from_checkpoint",
                   "use_cpu", "dataloader_num_workers")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigFileError(ValueError):
    """A config file that cannot be used: missing, unreadable, not a mapping, or naming unknown options."""


def read_config(path: Path) -> dict:
    """The option mapping of a YAML or JSON file, keys with dashes turned to underscores."""
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    except Exception as err:  # yaml.YAMLError; its mark names the line
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigFileError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config file holds a mapping of option name -> value, "
                              f"not a {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def underscored(argv: list[str]) -> list[str]:
    """Flags with dashes inside their names written with underscores (`--max-steps=3` -> `--max_steps=3`)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def short_help(types: tuple, verb: str, description: str) -> str:
    """The grouped help: every option of this project's dataclasses, the common TrainingArguments."""
    lines = [f"usage: mllm {verb} [CONFIG.yaml|CONFIG.json] [--option value ...]", "", description, "",
             "A config file (YAML or JSON, keys = option names) gives the options; flags after it override it.",
             "Dashes and underscores are the same (--max-steps = --max_steps). Booleans: --flag true|false.", ""]
    groups = {"model": types[0], "data": types[1], "training": types[2]}
    for title, cls in groups.items():
        names = [f.name for f in dataclasses.fields(cls)]
        if title == "training":
            own = [n for n in names if n not in TrainingArguments.__dataclass_fields__]
            names = own + [n for n in COMMON_TRAINING if n in names]
            title += " (the common ones; --help-all lists all of transformers' TrainingArguments)"
        lines.append(f"{title}:")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in names:
            f = fields[name]
            inherited = TrainingArguments.__dataclass_fields__.get(name)
            text = f.metadata.get("help") or (inherited.metadata.get("help", "") if inherited else "")
            text = " ".join(str(text).split())
            text = text if len(text) <= 88 else text[:85] + "..."
            default = f.default if f.default is not dataclasses.MISSING else (
                "(required)" if f.default_factory is dataclasses.MISSING else "")
            default_text = "" if default == "" else f" [default: {default}]"
            lines.append(f"  --{name:<30} {text}{default_text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def parse_training_options(types: tuple, argv: list[str] | None, verb: str, description: str = ""):
    """The verb's dataclasses from an optional config file plus flags. Usage errors exit with status 2 and a
    one-line message (argparse's convention), never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(types, prog=f"mllm {verb}")
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        print(short_help(types, verb, description), end="")
        raise SystemExit(0)
    config = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv[0])
        try:
            config = read_config(path)
        except ConfigFileError as err:
            parser.error(str(err))
        argv = argv[1:]
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(config) - set(actions))
        if unknown:
            parser.error(f"{path}: unknown option(s) {', '.join(unknown)}; `mllm {verb} --help-all` lists them all")
        for key in config:
            actions[key].required = False  # given by the file; a flag may still override it
        parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=underscored(argv))
