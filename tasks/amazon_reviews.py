"""amazon_us_reviews (Gift Card sample) with its three promptsource templates.

The sample ships as one file, so train/validation/test (80/10/10) are made
by a hash of `review_id`. Three tasks, one per promptsource template, since
their targets differ: rating (accuracy), review generation and headline
summarization (ROUGE).
"""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import JinjaTemplate

SOURCE = sources.FileSource(
    "amazon_us_reviews", "amazon_us_reviews",
    {"all": "amazon_reviews_us_Gift_Card_v1_00.head1452.jsonl"},
    ("product_title", "star_rating", "review_headline", "review_body"),
    id_field="review_id", hash_split={"train": 0.8, "validation": 0.1, "test": 0.1})

RATING = JinjaTemplate(
    "given_the_review_body_return_a_categorical_rating",
    "Given the following review:\n{{review_body}}\npredict the associated rating from the "
    "following choices (1 being lowest and 5 being highest)\n- "
    "{{ answer_choices | join('\\n- ') }} \n|||\n{{answer_choices[star_rating-1]}}",
    answer_choices="1 ||| 2 ||| 3 ||| 4 ||| 5")

GENERATE = JinjaTemplate(
    "generate_review_based_on_rating_and_category",
    "Generate a {{star_rating}}-star review (1 being lowest and 5 being highest) about this "
    "product {{product_title}}.        |||        {{review_body}}")

HEADLINE = JinjaTemplate(
    "generate_review_headline_based_on_review_body",
    "Give a short sentence describing the following product review:\n{{review_body}} "
    "\n|||\n{{review_headline}}")

NAMES = [
    *instructions.register_variants("amazon_reviews_rating", SOURCE, [RATING],
                                    metric_fns=[metrics.accuracy]),
    *instructions.register_variants("amazon_reviews_generate", SOURCE, [GENERATE],
                                    num_shots=0, metric_fns=[metrics.rouge]),
    *instructions.register_variants("amazon_reviews_headline", SOURCE, [HEADLINE],
                                    metric_fns=[metrics.rouge]),
]
