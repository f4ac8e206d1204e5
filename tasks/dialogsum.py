"""DialogSum (Chen et al. 2021): dialogue summarization, ROUGE.

Test dialogues carry three reference summaries (`summary1..3`); all three are
kept as references for evaluation, and the first is the training target.
"""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate

FIELDS = ("dialogue", "summary", "topic")


def _prepare(record: dict) -> dict:
    if "summary1" not in record:
        return record
    refs = [record[f"summary{i}"] for i in (1, 2, 3)]
    return {"fname": record["fname"], "dialogue": record["dialogue"], "summary": refs[0],
            "topic": record["topic1"], "references": refs}


SOURCE = sources.FileSource(
    "dialogsum", "dialogsum",
    {"train": "dialogsum.train.jsonl", "validation": "dialogsum.dev.jsonl",
     "test": "dialogsum.test.jsonl"},
    FIELDS, id_field="fname", prepare=_prepare)

TEMPLATES = PatternTemplate.from_tuples("dialogsum", [
    ("Summarize the following conversation.\n\n{dialogue}\n\nSummary:", "{summary}"),
    ("{dialogue}\n\nSummarize the conversation above in one or two sentences.", "{summary}"),
    ("Read the dialogue and write a short summary of it.\n\n{dialogue}", "{summary}"),
    ("Conversation:\n{dialogue}\n\nWhat happened in this conversation?", "{summary}"),
    ("{dialogue}\n\nGive a brief summary of what the speakers discussed.", "{summary}"),
    ("Here is a conversation about {topic}:\n{dialogue}\n\nSum it up briefly.", "{summary}"),
    ("Write a summary of this dialogue:\n\n{dialogue}", "{summary}"),
    ("{dialogue}\n\nTL;DR of the conversation:", "{summary}"),
])

NAMES = instructions.register_variants("dialogsum", SOURCE, TEMPLATES,
                                       metric_fns=[metrics.rouge])
