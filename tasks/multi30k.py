"""Multi30k en->de translation with FLAN's translation templates, BLEU (test_2016_flickr)."""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate

SOURCE = sources.FileSource(
    "multi30k", "multi30k",
    {"train": "train.jsonl", "validation": "val.jsonl", "test": "test_2016_flickr.jsonl"},
    ("en", "de"))

# FLAN's WMT patterns with sent1=English, sent2=German.
TEMPLATES = PatternTemplate.from_tuples("multi30k_en_de", [
    ("{en}\n\nTranslate to German", "{de}"),
    ("{en}\n\nCould you please translate this to German?", "{de}"),
    ("Translate to German:\n\n{en}", "{de}"),
    ("Translate the following sentence to German:\n{en}", "{de}"),
    ("How is \"{en}\" said in German?", "{de}"),
    ("Translate \"{en}\" to German?", "{de}"),
])

NAMES = instructions.register_variants("multi30k_en_de", SOURCE, TEMPLATES,
                                       metric_fns=[metrics.bleu])
