"""The example datasets: seeded, committed as generated, answers computed by the task functions."""

from __future__ import annotations

import json
import random

import pytest

from services.trainer.dataset import parse_jsonl
from tests.examples.conftest import REPO

DATA = REPO / "examples" / "data"


def test_generation_is_deterministic_and_matches_the_committed_files(make_datasets, tmp_path):
    assert make_datasets.main(["--out", str(tmp_path)]) == 0
    for task in make_datasets.TASKS.values():
        again = make_datasets.render(task)
        for name, text in again.items():
            assert (tmp_path / name).read_text() == text
            assert (DATA / name).read_text() == text, f"{name} is stale: rerun python examples/make_datasets.py"
    assert make_datasets.main(["--check"]) == 0


def test_check_flags_a_stale_file(make_datasets, tmp_path):
    make_datasets.main(["--out", str(tmp_path)])
    path = tmp_path / "vex_eval.jsonl"
    path.write_text(path.read_text().replace("Azu", "Azz", 1))
    assert make_datasets.main(["--out", str(tmp_path), "--check"]) == 1


def test_another_seed_gives_other_prompts(make_datasets):
    task = make_datasets.TASKS["vex"]
    assert make_datasets.make_prompts(task, seed=1) != make_datasets.make_prompts(task, seed=2)


@pytest.mark.parametrize("task_name", ["vex", "badge"])
def test_files_are_small_valid_and_eval_is_held_out(make_datasets, task_name):
    task = make_datasets.TASKS[task_name]
    train_path, eval_path = DATA / f"{task_name}_train.jsonl", DATA / f"{task_name}_eval.jsonl"
    for path in (train_path, eval_path):
        assert path.stat().st_size < 200_000
    records = parse_jsonl(train_path.read_bytes())  # the trainer's own validation accepts every line
    assert len(records) == task.train_size and {r.kind for r in records} == {"messages"}
    train_prompts = set()
    for r in records:
        user, assistant = r.data["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == task.answer(user["content"])
        train_prompts.add(user["content"])
    items = make_datasets.read_eval(eval_path)
    assert len(items) == task.eval_size
    assert len({it["prompt"] for it in items}) == len(items)
    assert not train_prompts & {it["prompt"] for it in items}
    for it in items:
        assert it["answer"] == task.answer(it["prompt"])


def test_vex_answers_decode_back_to_the_date(make_datasets):
    # An independent inverse: each eval answer names exactly the prompt's day, month and year.
    months = {name: number for number, name in enumerate(make_datasets.VEX_MONTHS, start=1)}
    assert len(months) == 12
    for it in make_datasets.read_eval(DATA / "vex_eval.jsonl"):
        day, month, year = it["answer"].split(" ")
        assert it["prompt"] == f"Convert {year}-{months[month]:02d}-{day} to a Vex date."
    assert make_datasets.vex_answer("Convert 2023-07-15 to a Vex date.") == "15 Gilo 2023"
    assert make_datasets.vex_answer("Convert 1999-12-01 to a Vex date.") == "01 Lumo 1999"
    for bad in ("Convert 2023-13-01 to a Vex date.", "Convert 2023-7-15 to a Vex date.", "Convert 2023-07-15."):
        with pytest.raises(ValueError):
            make_datasets.vex_answer(bad)


def test_badge_answer_ignores_field_order(make_datasets):
    fields = {"name": "Maya", "city": "Lyon", "year": "1987"}
    rng = random.Random(0)
    answers = set()
    for _ in range(6):
        order = list(fields)
        rng.shuffle(order)
        answers.add(make_datasets.badge_answer(make_datasets.badge_prompt(fields, tuple(order))))
    assert answers == {"Maya @ Lyon # 1987"}
    with pytest.raises(ValueError):
        make_datasets.badge_answer("Make a badge: name=Maya; city=Lyon")


def test_exact_match_trims_whitespace_only(make_datasets):
    assert make_datasets.exact_match(" 15 Gilo 2023\n", "15 Gilo 2023")
    assert not make_datasets.exact_match("15 Gilo 2023.", "15 Gilo 2023")
    assert not make_datasets.exact_match("15 gilo 2023", "15 Gilo 2023")


def test_eval_lines_are_plain_json_objects(make_datasets):
    for line in (DATA / "badge_eval.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"prompt", "answer"}
