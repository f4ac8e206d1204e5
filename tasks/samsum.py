"""SAMSum (Gliwa et al. 2019) with FLAN's seven dialogue-summary templates, ROUGE."""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate

SOURCE = sources.FileSource(
    "samsum", "samsum",
    {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"},
    ("dialogue", "summary"), id_field="id")

# FLAN's samsum patterns (FLAN/flan/templates.py).
TEMPLATES = PatternTemplate.from_tuples("samsum", [
    ("{dialogue}\n\nBriefly summarize that dialogue.", "{summary}"),
    ("Here is a dialogue:\n{dialogue}\n\nWrite a short summary!", "{summary}"),
    ("Dialogue:\n{dialogue}\n\nWhat is a summary of this dialogue?", "{summary}"),
    ("{dialogue}\n\nWhat was that dialogue about, in two sentences or less?", "{summary}"),
    ("Here is a dialogue:\n{dialogue}\n\nWhat were they talking about?", "{summary}"),
    ("Dialogue:\n{dialogue}\nWhat were the main points in that conversation?", "{summary}"),
    ("Dialogue:\n{dialogue}\nWhat was going on in that conversation?", "{summary}"),
])

NAMES = instructions.register_variants("samsum", SOURCE, TEMPLATES, metric_fns=[metrics.rouge])
