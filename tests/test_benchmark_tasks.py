"""MMLU and BBH tasks render their papers' prompts from ../shared/data; BBH answers are
extracted as the protocol says; local GLUE/SuperGLUE files have the official counts."""

import collections
import csv
import json
import os

import numpy as np
import pytest
import seqio

import ift_jax.tasks  # noqa: F401
from ift_jax import evaluation, metrics, suites
from ift_jax.data import instructions, sources
from ift_jax.data.vocabularies import TASK_VOCABULARY
from ift_jax.tasks import bbh, glue, mmlu


def _rendered(name, split):
    return seqio.get_mixture_or_task(name).source.rendered(split)


# --- MMLU --------------------------------------------------------------------------------

# abstract_algebra: the five dev questions, then the first test question, written out in
# the format of hendrycks/test evaluate.py (gen_prompt + format_example).
ABSTRACT_ALGEBRA_5SHOT = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
    "A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
    "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. "
    "Statement 2 | The symmetric group S_10 has 10 elements.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. "
    "Statement 2 | Every subgroup of an abelian group is abelian.\n"
    "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\n"
    "A. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


def test_mmlu_5shot_prompt_equals_the_papers_format_byte_for_byte():
    columns = _rendered("mmlu_5shot_abstract_algebra", "test")
    assert columns["inputs"][0] == ABSTRACT_ALGEBRA_5SHOT
    assert columns["targets"][0] == "B"
    assert json.loads(columns["choices"][0]) == ["A", "B", "C", "D"]
    assert columns["shots"][0] == "5"
    zero = _rendered("mmlu_0shot_abstract_algebra", "test")["inputs"][0]
    header = "The following are multiple choice questions (with answers) about  abstract algebra."
    assert zero == header + "\n\n" + ABSTRACT_ALGEBRA_5SHOT.rsplit("\n\n", 1)[1]


def _original_prompt(subject, index, shots):
    """hendrycks/test evaluate.py, re-written on the CSV rows (answers 0-3 -> A-D)."""
    root = os.path.join(sources.data_dir(), "mmlu")

    def rows(split):
        with open(os.path.join(root, split, f"{subject}_{split}.csv"), newline="") as f:
            return list(csv.reader(f))[1:]

    def format_example(row, include_answer=True):
        prompt = row[0] + "".join(f"\n{c}. {row[j + 1]}" for j, c in enumerate("ABCD"))
        prompt += "\nAnswer:"
        return prompt + (f" {'ABCD'[int(row[5])]}\n\n" if include_answer else "")

    words = "".join(" " + entry for entry in subject.split("_"))
    prompt = f"The following are multiple choice questions (with answers) about {words}.\n\n"
    prompt += "".join(format_example(row) for row in rows("dev")[:shots])
    return prompt + format_example(rows("test")[index], include_answer=False)


@pytest.mark.parametrize("shots", suites.MMLU_SHOTS)
def test_mmlu_prompts_of_every_subject_equal_the_original_code(shots):
    for subject in suites.MMLU_SUBJECTS:
        columns = _rendered(suites.mmlu_task(subject, shots), "test")
        for index in (0, 1, len(columns["inputs"]) - 1):
            assert columns["inputs"][index] == _original_prompt(subject, index, shots)


def test_mmlu_has_57_subjects_14042_questions_and_letter_targets():
    counts = collections.Counter()
    for shots in suites.MMLU_SHOTS:
        assert len(mmlu.NAMES[shots]) == 57
        for name in mmlu.NAMES[shots]:
            columns = _rendered(name, "test")
            counts[shots] += len(columns["inputs"])
            assert set(columns["targets"]) <= set(mmlu.LETTERS)
    assert counts == {0: 14042, 5: 14042}
    mixture = seqio.get_mixture_or_task("mmlu_5shot")
    assert sorted(t.name for t in mixture.tasks) == sorted(mmlu.NAMES[5])


def test_mmlu_questions_keep_their_whitespace_as_the_original_does():
    # Some test questions start with whitespace; the original code keeps it.
    for subject in suites.MMLU_SUBJECTS:
        columns = _rendered(suites.mmlu_task(subject, 0), "test")
        header = mmlu.header(subject)
        spaced = [i for i, x in enumerate(columns["inputs"]) if x[len(header)] in " \t"]
        if spaced:
            assert columns["inputs"][spaced[0]] == _original_prompt(subject, spaced[0], 0)
            return
    pytest.fail("no MMLU test question starts with whitespace any more")


def test_mmlu_categories_are_the_papers():
    counts = collections.Counter(suites.mmlu_category(s) for s in suites.MMLU_SUBJECTS)
    assert counts == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert suites.mmlu_category("professional_law") == "humanities"
    assert suites.mmlu_category("high_school_psychology") == "social_sciences"
    assert suites.mmlu_category("clinical_knowledge") == "other"


def test_mmlu_incontext_fit_drops_exemplars_from_the_end_like_the_original():
    full = _rendered("mmlu_5shot_anatomy", "test")["inputs"][0]
    budget = len(TASK_VOCABULARY.encode(full))  # Byte vocabulary in tests: one per byte.
    task = instructions.with_shots("mmlu_5shot_anatomy", 5, budget - 50)
    fitted = task.source.rendered("test")
    assert fitted["shots"][0] == "4"
    assert fitted["inputs"][0] == _original_prompt("anatomy", 0, 4)


def test_first_k_exemplar_order_is_checked_and_needs_enough_exemplars():
    with pytest.raises(ValueError, match="exemplar_order 'last'; orders: random, first"):
        instructions.Rendering(exemplar_order="last")
    source = mmlu.make_source("anatomy")
    task = instructions.register_task(
        "test_mmlu_6shot_anatomy", source, [mmlu.TEMPLATE],
        rendering=instructions.Rendering(num_shots=6, exemplar_split="dev",
                                         exemplar_order="first"))
    try:
        with pytest.raises(ValueError, match="cannot take 6 exemplars from 5 in split 'dev'"):
            task.source.rendered("test")
    finally:
        seqio.TaskRegistry.remove("test_mmlu_6shot_anatomy")


# --- BIG-Bench Hard ----------------------------------------------------------------------


def test_bbh_registers_27_tasks_with_6511_examples_per_mode():
    for mode in suites.BBH_MODES:
        assert len(bbh.NAMES[mode]) == 27
        total = sum(len(_rendered(name, "test")["inputs"]) for name in bbh.NAMES[mode])
        assert total == suites.BBH_NUM_EXAMPLES == 6511
        mixture = seqio.get_mixture_or_task(f"bbh_{mode}")
        assert len(mixture.tasks) == 27


def test_bbh_cot_prompt_is_the_prompt_file_verbatim_then_the_question():
    root = os.path.join(sources.data_dir(), "bbh")
    for task in suites.BBH_TASKS:
        with open(os.path.join(root, "cot-prompts", f"{task}.txt")) as f:
            lines = f.read().split("\n")
        with open(os.path.join(root, "tasks", f"{task}.json")) as f:
            first = json.load(f)["examples"][0]
        assert lines[0].startswith("BENCHMARK DATA SHOULD NEVER APPEAR") and lines[1] == "-----"
        columns = _rendered(suites.bbh_task(task, "cot"), "test")
        assert columns["inputs"][0] == ("\n".join(lines[2:]) + "\n\nQ: " + first["input"]
                                        + "\nA: Let's think step by step.")
        assert columns["targets"][0] == first["target"]


def test_bbh_direct_prompt_gives_the_exemplars_final_answers_only():
    inputs = _rendered("bbh_direct_boolean_expressions", "test")["inputs"][0]
    assert inputs == ("Evaluate the result of a random Boolean expression.\n\n"
                      "Q: not ( ( not not True ) ) is\nA: False\n\n"
                      "Q: True and False and not True and True is\nA: False\n\n"
                      "Q: not not ( not ( False ) ) is\nA: True\n\n"
                      "Q: not ( True ) and ( True ) is\nA:")
    snarks = _rendered("bbh_direct_snarks", "test")["inputs"][0]
    assert snarks.startswith("Determine which of two sentences is sarcastic.\n\nQ: ")
    assert "Let's think step by step" not in snarks and snarks.count("\nA: (") == 3


# Hand-written chains of thought and the answer the protocol reads from each.
COT_OUTPUTS = [
    ("not True is False; False and True is False. So the answer is False.", "False"),
    ("Option (B) is sarcastic. So the answer is (B).", "(B)"),
    ("The order is: apple banana cherry. So the answer is apple banana cherry.",
     "apple banana cherry"),
    ("We close the brackets in order. So the answer is ] ) }.", "] ) }"),
    ("42 - 7 = 35 and 35 * -2 = -70. So the answer is -70", "-70"),
    ("So the answer is Yes.\n\nQ: Is it raining?\nA: So the answer is No.", "Yes"),
    ("The man is a football player, which is plausible. So the answer is  yes .", "yes"),
    ("I think it is (A).", ""),  # Never states the answer: wrong, whatever it says.
]


@pytest.mark.parametrize("output,answer", COT_OUTPUTS)
def test_cot_answer_is_read_after_so_the_answer_is(output, answer):
    assert bbh.extract_cot_answer(output) == answer


def test_direct_answer_is_the_first_line():
    assert bbh.extract_direct_answer("  (C)\nQ: next question") == "(C)"
    assert bbh.extract_direct_answer("\n\nTrue") == "True"
    assert bbh.extract_direct_answer("") == ""


def test_bbh_cot_rows_keep_the_generation_and_score_the_extracted_answer():
    task = seqio.get_mixture_or_task("bbh_cot_sports_understanding")
    spec = evaluation.EvalSpec(tasks=(task.name,), split="test", inputs_length=4096,
                               batch_size=4, max_examples=4, targets_length=8)
    targets = _rendered(task.name, "test")["targets"][:4]
    said = [f"Reasoning about it. So the answer is {t}." if i % 2 else
            f"So the answer is {'no' if t == 'yes' else 'yes'}." for i, t in enumerate(targets)]
    answers = iter(said)

    def predict(batch):
        rows = [TASK_VOCABULARY.encode(next(answers)) + [1] for _ in range(min(4, len(batch)))]
        out = np.zeros((batch.shape[0], 64), np.int32)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    scores, rows = evaluation.evaluate_task(task, predict, spec)
    assert [r["generation"] for r in rows] == said
    assert [r["prediction"] for r in rows] == [bbh.extract_cot_answer(s) for s in said]
    assert scores == {"accuracy": 50.0}
    assert evaluation.score(task, rows) == scores  # Recomputable from the rows.


# --- GLUE / SuperGLUE from the local files ----------------------------------------------

OFFICIAL_COUNTS = {
    "glue_cola": 1043, "glue_sst2": 872, "glue_mrpc": 408, "glue_stsb": 1500,
    "glue_qnli": 5463, "glue_rte": 277, "glue_wnli": 71, "super_glue_boolq": 3270,
    "super_glue_cb": 56, "super_glue_copa": 100, "super_glue_multirc": 4848,
    "super_glue_rte": 277, "super_glue_wic": 638, "super_glue_wsc": 104,
}


def test_local_glue_and_superglue_have_the_official_counts_and_labels():
    for name, count in OFFICIAL_COUNTS.items():
        records = glue.SOURCES[name].load("validation")
        assert len(records) == count, name
    labels = {n: collections.Counter(r["answer"] for r in glue.SOURCES[n].load("validation"))
              for n in ("glue_cola", "glue_rte", "super_glue_cb", "super_glue_wsc")}
    assert labels["glue_cola"] == {"acceptable": 721, "unacceptable": 322}
    assert labels["glue_rte"] == {"yes": 146, "no": 131}  # entailment / not_entailment
    assert labels["super_glue_cb"] == {"no": 28, "yes": 23, "it is not possible to tell": 5}
    assert labels["super_glue_wsc"] == {"no": 66, "yes": 38}
    multirc = glue.SOURCES["super_glue_multirc"].load("validation")
    assert len({r["group"] for r in multirc}) == 953  # Questions.


def test_stsb_targets_round_to_a_fifth_and_references_are_the_gold_scores():
    columns = _rendered("glue_stsb", "validation")
    records = glue.SOURCES["glue_stsb"].load("validation")
    assert json.loads(columns["choices"][0]) == []
    for record, target, refs in zip(records[:200], columns["targets"], columns["references"]):
        assert abs(float(target) - record["label"]) <= 0.1 + 1e-9
        assert round(float(target) * 5, 6) == int(round(float(target) * 5))
        assert json.loads(refs) == [str(record["label"])]
    assert glue.stsb_target(3.75) == "3.8" and glue.stsb_target(0.5) == "0.4"  # Half to even.


def test_multirc_rows_carry_their_question_and_exact_match_needs_all_options():
    task = seqio.get_mixture_or_task("super_glue_multirc")
    spec = evaluation.EvalSpec(tasks=(task.name,), split="validation", inputs_length=4096,
                               batch_size=8, max_examples=40, targets_length=4)

    def always_no(batch):
        row = TASK_VOCABULARY.encode("no") + [1]
        return np.tile(np.asarray(row, np.int32), (batch.shape[0], 1))

    scores, rows = evaluation.evaluate_task(task, always_no, spec)
    groups = [r["group"] for r in rows]
    assert len(set(groups)) > 3 and all(g.count("-") == 1 for g in groups)
    expected = metrics.multirc_f1a_em([r["references"][0] for r in rows], ["no"] * 40,
                                      groups=groups)
    assert scores == expected and scores["f1a"] == 0.0
    all_no = {g for g in groups if all(r["references"] == ["no"] for r in rows
                                       if r["group"] == g)}
    assert scores["exact_match"] == pytest.approx(100 * len(all_no) / len(set(groups)))
