"""Run course stages in order, keep every stage's results in out/results.json and their table in out/course.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mllm.course.base import stage_base
from mllm.course.grounding import course_stage as stage_grounding
from mllm.course.preference import course_stage as stage_preference
from mllm.course.sft import stage_sft
from mllm.course.shared import STAGES

RUNNERS = {"base": stage_base, "sft": stage_sft, "grounding": stage_grounding, "preference": stage_preference}


# ---- report ------------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = ["| stage | metric | value | exercise target (real model) |", "|---|---|---|---|"]
    if "base" in results:
        c, y = results["base"]["chair"], results["base"]["yesno"]
        rows += [f"| base | CHAIRs / CHAIRi | {100 * c['CHAIRs']:.1f} / {100 * c['CHAIRi']:.1f} | 32.7 / 8.5 |",
                 f"| base | Recall / Len | {100 * c['Recall']:.1f} / {c['Len']:.1f} | 61.7 / 126 |",
                 *([f"| base | descriptions echoing a prompt (a '?') | {100 * c['Echo']:.1f} % | 0 |"]
                   if "Echo" in c else []),
                 f"| base | yes/no acc / acc+ | {y['acc']:.3f} / {y['acc_plus']:.3f} | 0.696 (exercise accuracy) |"]
        if "grounding" in results["base"]:
            rows.append(f"| base | grounding Acc@0.5 | {results['base']['grounding']['accuracy']:.3f} | - |")
    if "sft" in results:
        b, a = results["sft"]["before"], results["sft"]["after"]
        rows += [f"| sft | yes/no test loss | {b['test_loss']:.3f} -> {a['test_loss']:.3f} | < 0.11 |",
                 f"| sft | yes/no acc | {b['acc']:.3f} -> {a['acc']:.3f} | 0.81-0.90 |"]
    for extra in results.values():
        rows += extra.get("table_rows", [])
    smoke = [name for name, result in results.items() if result.get("smoke_test")]
    if smoke:
        rows.append(f"\nSmoke run (`--quick`) for {', '.join(smoke)}: budgets of a few minutes; these numbers are "
                    "not the course's.")
    return "\n".join(rows)


def run(out: Path, stage: str, budget, seed: int = 0) -> dict:
    """Run `stage` (one of STAGES, or "all") under `out`; merge its results into out/results.json, rewrite
    out/course.md, print the table; returns every stage's results so far."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = {}
    for name in STAGES if stage == "all" else [stage]:
        print(f"== stage {name} ==", flush=True)
        result = RUNNERS[name](out, budget, seed) | {"smoke_test": budget.smoke_test}
        # read just before writing: stages run as separate processes side by side keep each other's results
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[name] = result
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, results_path)
        (out / "course.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"results: {results_path}, table: {out / 'course.md'}")
    return results
