"""Generate the two example datasets under examples/data/ (seeded: the same files every run).

Two made-up tasks SmolLM2-135M-Instruct cannot do out of the box (its exact-match accuracy is 0%),
but a small LoRA learns in a couple of minutes of CPU training. Each answer is computed from the
prompt by a task function below, so a program can score a model by exact match.

* ``vex`` — rewrite an ISO date in the made-up "Vex" calendar: day, a made-up month name, year
  (``Convert 2023-07-15 to a Vex date.`` → ``15 Gilo 2023``).
* ``badge`` — turn a record whose fields come in random order into a badge line with a fixed layout
  (``Make a badge: year=1987; city=Lyon; name=Maya`` → ``Maya @ Lyon # 1987``).

Files, per task: ``<task>_train.jsonl`` (chat ``{"messages": [...]}`` lines for the trainer) and
``<task>_eval.jsonl`` (``{"prompt", "answer"}``: held-out prompts, none of which is in the train set).

    python examples/make_datasets.py [--out examples/data] [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20240601
DATA_DIR = Path(__file__).resolve().parent / "data"

# --- task A: Vex dates --------------------------------------------------------------------------

# The twelve months of the made-up Vex calendar, January first.
VEX_MONTHS = ("Azu", "Belo", "Cira", "Doma", "Eshu", "Faro", "Gilo", "Hema", "Iru", "Joba", "Kesi", "Lumo")


def vex_prompt(year: int, month: int, day: int) -> str:
    return f"Convert {year:04d}-{month:02d}-{day:02d} to a Vex date."


def vex_answer(prompt: str) -> str:
    """'Convert 2023-07-15 to a Vex date.' -> '15 Gilo 2023' (day, Vex month, year)."""
    prefix, suffix = "Convert ", " to a Vex date."
    if not (prompt.startswith(prefix) and prompt.endswith(suffix)):
        raise ValueError(f"not a Vex prompt: {prompt!r}")
    year, month, day = prompt[len(prefix):-len(suffix)].split("-")
    if not (len(year) == 4 and len(month) == 2 and len(day) == 2 and (year + month + day).isdigit()
            and 1 <= int(month) <= 12 and 1 <= int(day) <= 31):
        raise ValueError(f"not a YYYY-MM-DD date: {prompt!r}")
    return f"{day} {VEX_MONTHS[int(month) - 1]} {year}"


def vex_sample(rng: random.Random) -> str:
    return vex_prompt(rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28))


# --- task B: badge lines ------------------------------------------------------------------------

NAMES = ("Maya", "Omar", "Lena", "Ravi", "Sofia", "Jonas", "Amara", "Kenji", "Elena", "Tariq", "Nora", "Diego",
         "Ingrid", "Kofi", "Yara", "Mateo", "Hana", "Felix", "Zara", "Leo", "Priya", "Hugo", "Aisha", "Ivan",
         "Mila", "Sami", "Clara", "Tomas", "Nadia", "Oscar", "Lucia", "Arjun", "Greta", "Emil", "Rosa", "Malik")
CITIES = ("Lyon", "Oslo", "Lima", "Pune", "Kyoto", "Porto", "Cairo", "Quito", "Dakar", "Perth", "Bergen", "Turin",
          "Accra", "Hanoi", "Seville", "Gdansk", "Nairobi", "Tbilisi", "Austin", "Leeds", "Graz", "Bilbao", "Cork",
          "Malmo", "Riga", "Tunis", "Busan", "Denver", "Recife", "Krakow")
BADGE_FIELDS = ("name", "city", "year")


def badge_prompt(fields: dict[str, str], order: tuple[str, ...]) -> str:
    return "Make a badge: " + "; ".join(f"{key}={fields[key]}" for key in order)


def badge_answer(prompt: str) -> str:
    """'Make a badge: year=1987; city=Lyon; name=Maya' -> 'Maya @ Lyon # 1987'."""
    prefix = "Make a badge: "
    if not prompt.startswith(prefix):
        raise ValueError(f"not a badge prompt: {prompt!r}")
    fields = dict(part.split("=", 1) for part in prompt[len(prefix):].split("; "))
    if sorted(fields) != sorted(BADGE_FIELDS):
        raise ValueError(f"a badge prompt needs the fields {BADGE_FIELDS}, got {sorted(fields)}")
    return f"{fields['name']} @ {fields['city']} # {fields['year']}"


def badge_sample(rng: random.Random) -> str:
    fields = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "year": str(rng.randint(1900, 2024))}
    order = list(BADGE_FIELDS)
    rng.shuffle(order)
    return badge_prompt(fields, tuple(order))


# --- the datasets ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    description: str
    sample: Callable[[random.Random], str]   # a random prompt
    answer: Callable[[str], str]             # the exact expected answer for a prompt
    train_size: int
    eval_size: int


TASKS: dict[str, Task] = {
    "vex": Task("vex", "ISO date -> made-up calendar", vex_sample, vex_answer, train_size=800, eval_size=48),
    "badge": Task("badge", "record with shuffled fields -> fixed badge layout", badge_sample, badge_answer,
                  train_size=800, eval_size=48),
}


def make_prompts(task: Task, seed: int = SEED) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): distinct prompts, eval disjoint from train, seeded per task."""
    rng = random.Random(f"{seed}:{task.name}")
    seen: set[str] = set()
    prompts: list[str] = []
    want = task.train_size + task.eval_size
    for _ in range(want * 100):  # bounded: stops even if the task had too few distinct prompts
        prompt = task.sample(rng)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
            if len(prompts) == want:
                break
    if len(prompts) < want:
        raise RuntimeError(f"task {task.name} yields only {len(prompts)} distinct prompts, {want} wanted")
    return prompts[task.eval_size:], prompts[:task.eval_size]


def train_line(task: Task, prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": task.answer(prompt)}]}


def eval_line(task: Task, prompt: str) -> dict:
    return {"prompt": prompt, "answer": task.answer(prompt)}


def render(task: Task, seed: int = SEED) -> dict[str, str]:
    """File name -> JSONL text for one task."""
    train, evaluation = make_prompts(task, seed)
    dump = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return {f"{task.name}_train.jsonl": dump(train_line(task, p) for p in train),
            f"{task.name}_eval.jsonl": dump(eval_line(task, p) for p in evaluation)}


def read_eval(path: str | Path) -> list[dict]:
    """The eval lines of a task file: [{"prompt", "answer"}, ...]."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after trimming surrounding whitespace (generation may end with a newline)."""
    return prediction.strip() == answer.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stale = []
    for task in TASKS.values():
        for name, text in render(task).items():
            path = args.out / name
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
                continue
            path.write_text(text)
            print(f"wrote {path} ({len(text.splitlines())} lines, {len(text.encode())} bytes)")
    if stale:
        print("stale (rerun python examples/make_datasets.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
