"""Accuracy on the negation questions of a split by form, for one or more model directories of either arm: which
kind of negated question a stage of training loses (docs/dpo.md).

    python benchmarks/negation_forms.py --raw runs/demo/data --split val MODEL_DIR [MODEL_DIR ...]

Forms, from each question's program (``world/questions.py``): ``no_combo`` "Is it true that there is no red
square?" split by whether the combo is ``present`` in the scene (answer "no") or ``absent`` ("yes"); ``none_color``
"Is it true that none of the objects is red?"; ``count`` "How many objects are not red?"; ``query`` "What colour
is the object that is not a square?". Prints right/total per form and model. Reads only the split given.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from chameleon_lite.comparison.evaluate import answer_questions
from chameleon_lite.data.readers import qa_dataset
from chameleon_lite.training.lit_preference import load_policy
from chameleon_lite.world.questions import normalize_answer


def form(sample: dict) -> str:
    program = sample["meta"]["program"]
    if program["op"] == "not_exists":
        if "shape" not in program["where"]:
            return "none_color"
        return "no_combo, " + ("present" if normalize_answer(sample["answer"]) == "no" else "absent")
    return program["op"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the world directory")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("models", nargs="+", help="model directories of either arm")
    args = parser.parse_args()
    questions = [s for s in qa_dataset(str(Path(args.raw) / args.split / "qa-*.tar")) if s["category"] == "negation"]
    forms = sorted({form(s) for s in questions})
    print("| model | " + " | ".join(forms) + " |")
    print("|---|" + "---|" * len(forms))
    for model_dir in args.models:
        model = load_policy(model_dir).eval()
        right, total = Counter(), Counter()
        for start in range(0, len(questions), args.batch_size):
            chunk = questions[start:start + args.batch_size]
            answers = answer_questions(model, [s["image"] for s in chunk], [s["question"] for s in chunk])
            for sample, answer in zip(chunk, answers):
                total[form(sample)] += 1
                right[form(sample)] += normalize_answer(answer) == normalize_answer(sample["answer"])
        print(f"| {model_dir} | " + " | ".join(f"{right[f]}/{total[f]}" for f in forms) + " |", flush=True)


if __name__ == "__main__":
    main()
