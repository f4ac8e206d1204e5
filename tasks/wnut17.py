"""WNUT-17 emerging entities as text-to-text NER, span F1.

Targets list entities as `"Empire State Building (location); ESB (location)"`
(`metrics.format_spans`), or `"None"`.
"""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate

TYPES = "person, location, group, corporation, product, creative-work"


def _prepare(record: dict) -> dict:
    spans = metrics.bio_to_spans(record["tokens"], record["ner_tags"])
    return {"id": record["id"], "sentence": " ".join(record["tokens"]),
            "entities": metrics.format_spans(spans)}


SOURCE = sources.FileSource(
    "wnut17", "wnut17",
    {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"},
    ("sentence", "entities"), id_field="id", prepare=_prepare)

TEMPLATES = PatternTemplate.from_tuples("wnut17", [
    (f"Identify the named entities ({TYPES}) in this text:\n{{sentence}}", "{entities}"),
    (f"{{sentence}}\n\nIdentify every {TYPES} mentioned above and give its type.",
     "{entities}"),
    (f"Identify the entities in the sentence below. Types: {TYPES}. Answer \"None\" if "
     f"there are none.\n\nSentence: {{sentence}}", "{entities}"),
    ("Text: {sentence}\n\nIdentify the people, locations, groups, corporations, products and "
     "creative works in the text.", "{entities}"),
])

NAMES = instructions.register_variants("wnut17", SOURCE, TEMPLATES, metric_fns=[metrics.span_f1])
