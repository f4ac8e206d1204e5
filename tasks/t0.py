"""The T0/P3 training subset: each file is one already-prompted task.

Files hold `{"prompt", "completion"}` rows; the completion's trailing
`<|endoftext|>` is stripped. Each file has a train split only, so 90/10
train/validation are made by a hash of the row index.

The files keep no answer choices; for prompts with a fixed label set
(promptsource's `answer_choices`, e.g. "negative ||| positive") they are
listed in `ANSWER_CHOICES`, so evaluation can rank them (rank classification).
"""

from ift_jax import metrics
from ift_jax.data import instructions, sources
from ift_jax.data.templates import PatternTemplate

END_OF_TEXT = "<|endoftext|>"

# File stems of ../shared/data/t0_train_subset (66 files, 33 datasets x 2 prompts).
FILES = (
    "adversarial_qa_dbert_answer_the_following_q", "adversarial_qa_dbert_based_on",
    "ag_news_classify", "ag_news_classify_question_first",
    "amazon_polarity_Is_this_product_review_positive", "amazon_polarity_Is_this_review",
    "app_reviews_categorize_rating_using_review", "app_reviews_convert_to_rating",
    "cnn_dailymail_3_0_0_2_or_3_sentences", "cnn_dailymail_3_0_0_generate_story",
    "common_gen_Example_prompt", "common_gen_Given_concepts_type_1",
    "commonsense_qa_answer_given_question_without_options",
    "commonsense_qa_answer_to_question", "cosmos_qa_context_answer_to_question",
    "cosmos_qa_context_description_question_answer_id",
    "dbpedia_14_given_a_choice_of_categories_",
    "dbpedia_14_given_a_list_of_category_what_does_the_title_belong_to",
    "dream_answer_to_dialogue", "dream_baseline", "duorc_SelfRC_answer_question",
    "duorc_SelfRC_build_story_around_qa", "gigaword_TLDR", "gigaword_first_sentence_title",
    "glue_mrpc_equivalent", "glue_mrpc_generate_paraphrase", "glue_qqp_answer",
    "glue_qqp_duplicate", "imdb_Movie_Expressed_Sentiment", "imdb_Movie_Expressed_Sentiment_2",
    "kilt_tasks_hotpotqa_combining_facts", "kilt_tasks_hotpotqa_complex_question",
    "multi_news_distill", "multi_news_expand_reverse_task_",
    "paws_labeled_final_Concatenation", "paws_labeled_final_Concatenation_no_label",
    "qasc_is_correct_1", "qasc_is_correct_2", "quarel_choose_between", "quarel_do_not_use",
    "quartz_answer_question_based_on", "quartz_answer_question_below",
    "quoref_Answer_Friend_Question",
    "quoref_Answer_Question_Given_Context", "ropes_background_new_situation_answer",
    "ropes_background_situation_middle", "rotten_tomatoes_Movie_Expressed_Sentiment",
    "rotten_tomatoes_Movie_Expressed_Sentiment_2",
    "samsum_Generate_a_summary_for_this_dialogue",
    "samsum_Given_the_above_dialogue_write_a_summary", "sciq_Direct_Question",
    "sciq_Direct_Question_Closed_Book_",
    "social_i_qa_Check_if_a_random_answer_is_valid_or_not",
    "social_i_qa_Generate_answer", "trec_fine_grained_open",
    "trec_fine_grained_open_context_first",
    "wiki_bio_comprehension", "wiki_bio_guess_person", "wiki_qa_Decide_good_answer",
    "wiki_qa_Is_This_True_", "wiqa_does_the_supposed_perturbation_have_an_effect",
    "wiqa_effect_with_label_answer", "xsum_DOC_boils_down_to_simple_idea_that",
    "xsum_DOC_given_above_write_one_sentence", "yelp_review_full_based_on_that",
    "yelp_review_full_format_rating",
)

# promptsource answer_choices of the prompts with a fixed label set.
_SENTIMENT = ("negative", "positive")
ANSWER_CHOICES = {
    "imdb_Movie_Expressed_Sentiment": _SENTIMENT,
    "imdb_Movie_Expressed_Sentiment_2": _SENTIMENT,
    "rotten_tomatoes_Movie_Expressed_Sentiment": _SENTIMENT,
    "rotten_tomatoes_Movie_Expressed_Sentiment_2": _SENTIMENT,
    "wiki_qa_Decide_good_answer": ("No", "Yes"),
    "wiki_qa_Is_This_True_": ("No", "Yes"),
}

PROMPTED = PatternTemplate("prompted", "{prompt}", "{completion}")


def _preparer(stem: str):
    choices = ANSWER_CHOICES.get(stem)

    def prepare(record: dict) -> dict:
        completion = record["completion"]
        if completion.endswith(END_OF_TEXT):
            completion = completion[: -len(END_OF_TEXT)]
        prepared = {"prompt": record["prompt"].strip(), "completion": completion.strip()}
        if choices:
            prepared["options"] = list(choices)
        return prepared
    return prepare


def task_name(stem: str) -> str:
    return f"t0_{stem.rstrip('_').lower()}"


def _register(stem: str) -> str:
    source = sources.FileSource(
        task_name(stem), "t0_train_subset", {"all": f"{stem}.jsonl"},
        ("prompt", "completion"), prepare=_preparer(stem),
        hash_split={"train": 0.9, "validation": 0.1})
    name = task_name(stem)
    instructions.register_task(name, source, [PROMPTED],
                               metric_fns=[metrics.accuracy, metrics.rouge])
    return name


NAMES = [_register(stem) for stem in FILES]
