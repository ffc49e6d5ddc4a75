"""Yes/no accuracy in the MME style (acc, acc+, score per category), beside the exercise's substring accuracy.

Parsing (the official MME `calculation.py`, eval_facts §4.2): lowercase the answer; an exact "yes"/"no" is
taken as is; otherwise "yes" within the first 4 characters -> yes, else "no" there -> no, else "other", which
is always wrong. So "Yes." -> yes, "Not sure" -> no (a known quirk), "sure, yes" -> other.

- acc  = correct questions / questions; acc+ = images whose every question (two in MME) is correct / images.
  Questions are grouped by image, not by line order, so a shuffled answers file scores the same.
- score = 100*acc + 100*acc+ per category (max 200); the MME perception (10 categories) and cognition
  (4 categories) sums are added when those category names are present.
- The exercise's accuracy (`finetune_eval.py`): the target ("Yes"/"No") is a case-sensitive substring of the
  answer; reported beside the MME numbers, together with exact match after strip.
- Category: the test item's `category`, else the image's folder name (MME: data/images/<category>/x.jpg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(answer: str) -> str:
    """"yes", "no" or "other" by the MME rule (exact word, else the first 4 lowercased characters)."""
    text = (answer or "").lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def _label_of_target(target: str) -> str:
    label = target.strip().lower().rstrip(".")
    if label not in ("yes", "no"):
        raise ValueError(f"target {target!r} is not Yes or No")
    return label


def _rates(questions: list[dict]) -> dict[str, Any]:
    """acc, acc+, score and counts of one group of scored questions."""
    by_image: dict[str, list[bool]] = {}
    for q in questions:
        by_image.setdefault(q["image"], []).append(q["correct"])
    n = len(questions)
    acc = sum(q["correct"] for q in questions) / n if n else 0.0
    acc_plus = sum(all(c) for c in by_image.values()) / len(by_image) if by_image else 0.0
    return {"n_questions": n, "n_images": len(by_image), "acc": acc, "acc_plus": acc_plus,
            "score": 100 * acc + 100 * acc_plus, "other": sum(q["pred"] == "other" for q in questions),
            "unpaired_images": sum(len(c) != 2 for c in by_image.values())}


def score(records: list[dict]) -> dict:
    """MME-style and exercise accuracies of records {answer, target, image, category (optional)}."""
    if not records:
        raise ValueError("no answers to score")
    questions = []
    confusion = {gt: {"yes": 0, "no": 0, "other": 0} for gt in ("yes", "no")}
    for r in records:
        gt, pred = _label_of_target(r["target"]), parse_yes_no(r["answer"])
        confusion[gt][pred] += 1
        category = r.get("category") or "all"
        questions.append({"category": category, "image": f"{category}/{r['image']}", "pred": pred,
                          "correct": pred == gt, "substring": r["target"] in (r["answer"] or ""),
                          "exact": (r["answer"] or "").strip() == r["target"].strip()})
    categories = sorted({q["category"] for q in questions})
    per_category = {c: _rates([q for q in questions if q["category"] == c]) for c in categories}
    overall = _rates(questions)
    overall["exercise_accuracy"] = sum(q["substring"] for q in questions) / len(questions)
    overall["exact_match"] = sum(q["exact"] for q in questions) / len(questions)
    result: dict[str, Any] = {"overall": overall, "categories": per_category, "confusion": confusion}
    if any(c in MME_PERCEPTION + MME_COGNITION for c in categories):
        perception = sum(per_category[c]["score"] for c in MME_PERCEPTION if c in per_category)
        cognition = sum(per_category[c]["score"] for c in MME_COGNITION if c in per_category)
        result["mme"] = {"perception": perception, "cognition": cognition, "total": perception + cognition,
                         "missing_categories": [c for c in MME_PERCEPTION + MME_COGNITION if c not in per_category]}
    return result


# ----------------------------------------------------------------------------------------------- I/O


def _category_of_image(image: str | None) -> str | None:
    parent = Path(image).parent.name if image else ""
    return parent or None


def _user_and_assistant(item: dict) -> tuple[str, str]:
    turns = item.get("conversations") or []
    user = next((t["content"] for t in turns if t.get("role") == "user"), "")
    assistant = next((t["content"] for t in reversed(turns) if t.get("role") == "assistant"), None)
    if assistant is None:
        raise ValueError(f"test item {item.get('id')!r} has no assistant turn")
    return user, assistant


def _same_question(answer_question: str, test_user: str) -> bool:
    a = " ".join(answer_question.replace("<image>", " ").split())
    b = " ".join(test_user.replace("<image>", " ").split())
    return a in b or b in a


def join_with_test(answers: list[dict], test_items: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Score records for answers matched to test items by `id` (top level or metainfos), else by `idx`."""
    by_id = {item["id"]: item for item in test_items if "id" in item}
    records, problems = [], {"unmatched": 0, "question_mismatch": 0}
    for answer in answers:
        meta = answer.get("metainfos") or {}
        item_id = answer.get("id", meta.get("id"))
        item = by_id.get(item_id)
        if item is None and isinstance(answer.get("idx"), int) and 0 <= answer["idx"] < len(test_items):
            item = test_items[answer["idx"]]
        if item is None:
            problems["unmatched"] += 1
            continue
        user, target = _user_and_assistant(item)
        if answer.get("question") and not _same_question(answer["question"], user):
            problems["question_mismatch"] += 1
        image = item.get("image") or str(item.get("id"))
        records.append({"answer": answer.get("answer") or "", "target": target, "image": image,
                        "category": item.get("category") or _category_of_image(item.get("image")) or "all"})
    return records, problems


def records_from_answers(answers: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Score records for answers that carry `target` (and `image`/`category`) themselves or in metainfos."""
    records, problems = [], {"no_target": 0}
    for answer in answers:
        fields = {**(answer.get("metainfos") or {}), **answer}
        if fields.get("target") is None:
            problems["no_target"] += 1
            continue
        image = fields.get("image") or fields.get("image_id") or fields.get("idx")
        records.append({"answer": fields.get("answer") or "", "target": fields["target"], "image": str(image),
                        "category": fields.get("category") or _category_of_image(fields.get("image")) or "all"})
    return records, problems


def format_table(result: dict) -> str:
    lines = [f"{'category':<24}{'n':>6}{'acc':>8}{'acc+':>8}{'score':>8}{'other':>7}"]
    for name, r in [*result["categories"].items(), ("overall", result["overall"])]:
        lines.append(f"{name:<24}{r['n_questions']:>6}{100 * r['acc']:>8.2f}{100 * r['acc_plus']:>8.2f}"
                     f"{r['score']:>8.2f}{r['other']:>7}")
    lines.append(f"exercise accuracy (target substring of answer): {100 * result['overall']['exercise_accuracy']:.2f}")
    if "mme" in result:
        m = result["mme"]
        lines.append(f"MME perception {m['perception']:.2f}  cognition {m['cognition']:.2f}  total {m['total']:.2f}")
    return "\n".join(lines)
