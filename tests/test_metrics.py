"""Metrics agree with direct rouge-score / sacrebleu calls; span helpers give exact numbers."""

import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from ift_jax import metrics

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

SUMMARIES = [
    "#Person1# asks #Person2# to book a table for two at seven . #Person2# agrees .",
    "Amanda baked cookies and will bring Jerry some tomorrow.",
    "The customer complains that the gift card was never delivered .",
    "Tom and Lisa are going to the cinema on Friday night.",
]
PREDICTIONS = [
    "#Person2# agrees to book a table . #Person1# wants it at seven .",
    "Amanda will bring Jerry cookies tomorrow.",
    "The gift card the customer bought did not arrive.",
    "Lisa and Tom plan to see a film on Friday.",
]
MORE_SUMMARIES = [
    "#Person1# and #Person2# reserve a table for seven o'clock .",
    "Jerry will get some of the cookies Amanda baked.",
    "A customer says her gift card never arrived .",
    "On Friday Tom and Lisa will go to the movies.",
]


def _by_hand(scores):
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ROUGE_TYPES}


def _f_measures(scores):
    return {k: scores[k] for k in ROUGE_TYPES}


def test_rouge_t5_split_is_mean_of_rouge_scorer_f_measures():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    expected = _by_hand([scorer.score(t.replace(" . ", " .\n"), p.replace(" . ", " .\n"))
                         for t, p in zip(SUMMARIES, PREDICTIONS)])
    got = metrics.rouge(SUMMARIES, PREDICTIONS, sentence_split="t5")
    assert _f_measures(got) == pytest.approx(expected, abs=1e-9)


def test_rouge_multi_reference_takes_best_reference_per_example():
    targets = [list(refs) for refs in zip(SUMMARIES, MORE_SUMMARIES)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    expected = _by_hand([scorer.score_multi([r.replace(" . ", " .\n") for r in refs],
                                            p.replace(" . ", " .\n"))
                         for refs, p in zip(targets, PREDICTIONS)])
    got = metrics.rouge(targets, PREDICTIONS, sentence_split="t5")
    assert _f_measures(got) == pytest.approx(expected, abs=1e-9)
    assert expected != _by_hand([scorer.score(t, p) for t, p in zip(SUMMARIES, PREDICTIONS)])


def test_rouge_t5_split_splits_sentences_only_at_spaced_full_stops():
    scores = metrics.rouge(["a b c . d e f"], ["d e f . a b c"], sentence_split="t5")
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 100.0
    natural = metrics.rouge(["Tom left. Anna stayed."], ["Anna stayed. Tom left."],
                            sentence_split="t5")
    assert natural["rougeLsum"] == natural["rougeL"] < 100.0


def test_rouge_without_stemmer_matches_library():
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    expected = scorer.score("cats are running", "a cat is running")["rouge1"]
    got = metrics.rouge(["cats are running"], ["a cat is running"], rouge_types=("rouge1",),
                        use_stemmer=False)
    assert got == {"rouge1": pytest.approx(100 * expected.fmeasure),
                   "rouge1_precision": pytest.approx(100 * expected.precision),
                   "rouge1_recall": pytest.approx(100 * expected.recall)}
    stemmed = metrics.rouge(["cats are running"], ["a cat is running"], rouge_types=("rouge1",))
    assert 0 < got["rouge1"] < stemmed["rouge1"]


def test_rouge_perfect_predictions_score_100():
    scores = metrics.rouge(SUMMARIES, SUMMARIES)
    assert len(scores) == 3 * len(ROUGE_TYPES)
    assert scores == pytest.approx(dict.fromkeys(scores, 100.0))


def test_rouge_empty_prediction_scores_0():
    scores = metrics.rouge(SUMMARIES[:1], [""])
    assert len(scores) == 3 * len(ROUGE_TYPES) and set(scores.values()) == {0.0}


# The seeds' worked examples (reference "It is cold outside.").
COLD = "It is cold outside."


def test_rouge_precision_recall_f_on_the_worked_example():
    scores = metrics.rouge([COLD], ["It is very cold outside."])
    assert scores["rouge1_precision"] == pytest.approx(80.0)
    assert scores["rouge1_recall"] == pytest.approx(100.0)
    assert round(scores["rouge1"], 2) == 88.89
    assert scores["rouge2_precision"] == pytest.approx(50.0)
    assert round(scores["rouge2_recall"], 2) == 66.67
    assert round(scores["rouge2"], 2) == 57.14


def test_rouge_clips_repeated_words_and_rouge2_sees_word_order():
    assert metrics.rouge([COLD], ["cold cold cold cold"])["rouge1_precision"] == 25.0
    shuffled = metrics.rouge([COLD], ["outside cold it is"])
    assert shuffled["rouge1"] == pytest.approx(100.0)
    assert shuffled["rouge2"] == pytest.approx(100 / 3)


# A DialogSum-style summary pair, three sentences each, in natural (untokenized) text.
DIALOG_REFERENCE = ("#Person1# is looking for a new apartment near the university. #Person2# "
                    "shows #Person1# a two-bedroom flat with a balcony. #Person1# thinks the "
                    "rent is too high and will think it over.")
DIALOG_PREDICTION = ("#Person2# shows #Person1# a flat with two bedrooms. #Person1# says the "
                     "rent is too high. #Person1# wants an apartment near the university.")
DIALOG_SENTENCES = (
    ["#Person1# is looking for a new apartment near the university.",
     "#Person2# shows #Person1# a two-bedroom flat with a balcony.",
     "#Person1# thinks the rent is too high and will think it over."],
    ["#Person2# shows #Person1# a flat with two bedrooms.",
     "#Person1# says the rent is too high.",
     "#Person1# wants an apartment near the university."])


def test_rouge_lsum_on_natural_text_equals_rouge_score_with_one_sentence_per_line():
    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    reference, prediction = ("\n".join(s) for s in DIALOG_SENTENCES)
    expected = scorer.score(reference, prediction)
    got = metrics.rouge([DIALOG_REFERENCE], [DIALOG_PREDICTION])
    assert metrics.rouge_sentence_split() == "pysbd"
    assert got["rougeLsum"] == pytest.approx(100 * expected["rougeLsum"].fmeasure)
    assert got["rougeLsum_precision"] == pytest.approx(100 * expected["rougeLsum"].precision)
    assert got["rougeL"] == pytest.approx(100 * expected["rougeL"].fmeasure)
    assert got["rougeLsum"] > got["rougeL"] + 10  # 63.0 vs 44.4
    t5 = metrics.rouge([DIALOG_REFERENCE], [DIALOG_PREDICTION], sentence_split="t5")
    assert t5["rougeLsum"] == pytest.approx(t5["rougeL"]) == pytest.approx(got["rougeL"])


def test_sentence_splitter_keeps_abbreviations_and_decimals_inside_sentences():
    text = ("Mr. Smith books a table for 7 p.m. at the U.S. embassy. It costs 3.50 dollars!\n"
            "#Person2# agrees")
    assert metrics.split_sentences(text).split("\n") == [
        "Mr. Smith books a table for 7 p.m. at the U.S. embassy.", "It costs 3.50 dollars!",
        "#Person2# agrees"]
    assert metrics.split_sentences(text, "none") == text


def test_rouge_sentence_split_setting_is_the_default_and_is_checked():
    try:
        metrics.set_rouge_sentence_split("t5")
        assert metrics.rouge([DIALOG_REFERENCE], [DIALOG_PREDICTION]) == metrics.rouge(
            [DIALOG_REFERENCE], [DIALOG_PREDICTION], sentence_split="t5")
    finally:
        metrics.set_rouge_sentence_split("pysbd")
    with pytest.raises(ValueError, match="'nltk' is not one of: pysbd, t5, none"):
        metrics.set_rouge_sentence_split("nltk")
    with pytest.raises(ValueError, match="is not one of"):
        metrics.rouge(["a"], ["a"], sentence_split="punkt")


def test_bleu_matches_sacrebleu_single_reference():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [SUMMARIES], smooth_method="exp").score
    assert metrics.bleu(SUMMARIES, PREDICTIONS) == {"bleu": pytest.approx(expected)}
    assert 0.0 < expected < 100.0


def test_bleu_multi_reference_transposes_into_streams():
    targets = [list(refs) for refs in zip(SUMMARIES, MORE_SUMMARIES)]
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [SUMMARIES, MORE_SUMMARIES],
                                     smooth_method="exp").score
    assert metrics.bleu(targets, PREDICTIONS) == {"bleu": pytest.approx(expected)}
    single = sacrebleu.corpus_bleu(PREDICTIONS, [SUMMARIES], smooth_method="exp").score
    assert expected != pytest.approx(single)


def test_bleu_uneven_references_score_each_example_on_its_own_references():
    targets = [[SUMMARIES[0], MORE_SUMMARIES[0]], SUMMARIES[1], (SUMMARIES[2],),
               [SUMMARIES[3], MORE_SUMMARIES[3]]]
    # A short prediction: an empty padding reference would be the closest length
    # and remove the brevity penalty.
    predictions = PREDICTIONS[:1] + ["Amanda baked"] + PREDICTIONS[2:]
    # Repeating a reference changes nothing in BLEU, so this is the no-missing-reference answer.
    streams = [SUMMARIES, [MORE_SUMMARIES[0], SUMMARIES[1], SUMMARIES[2], MORE_SUMMARIES[3]]]
    expected = sacrebleu.corpus_bleu(predictions, streams, smooth_method="exp").score
    assert metrics.bleu(targets, predictions) == {"bleu": pytest.approx(expected)}
    padded_with_empty = [SUMMARIES, [MORE_SUMMARIES[0], "", "", MORE_SUMMARIES[3]]]
    assert expected != pytest.approx(
        sacrebleu.corpus_bleu(predictions, padded_with_empty, smooth_method="exp").score)


def test_bleu_tokenizer_is_passed_through():
    expected = sacrebleu.corpus_bleu(["好的 我们走吧"], [["好的我们走吧"]], tokenize="zh").score
    assert metrics.bleu(["好的我们走吧"], ["好的 我们走吧"], tokenize="zh") == {
        "bleu": pytest.approx(expected)}
    assert expected != pytest.approx(metrics.bleu(["好的我们走吧"], ["好的 我们走吧"])["bleu"])


def test_bleu_perfect_predictions_score_100():
    assert metrics.bleu(SUMMARIES, SUMMARIES) == {"bleu": pytest.approx(100.0)}


def test_accuracy_strips_and_accepts_any_reference():
    targets = [["yes", "Yes."], "no", ("positive", "negative"), "maybe"]
    predictions = [" Yes. ", "yes", "negative\n", "Maybe"]
    assert metrics.accuracy(targets, predictions) == {"accuracy": pytest.approx(50.0)}


@pytest.mark.parametrize("metric", [metrics.rouge, metrics.bleu, metrics.accuracy,
                                    metrics.span_f1])
def test_length_mismatch_names_both_lengths(metric):
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        metric(["a", "b", "c"], ["a", "b"])


def test_empty_reference_list_is_an_error():
    with pytest.raises(ValueError, match="empty list of references"):
        metrics.rouge([[]], ["a"])


def test_span_f1_micro_averages_over_examples():
    targets = ["Empire State Building (location); ESB (location); Tom (person)", "None"]
    predictions = ["ESB (location); Tom (person); Lisa (person)", "None"]
    scores = metrics.span_f1(targets, predictions)
    assert scores == pytest.approx({"span_f1": 200 / 3, "span_precision": 200 / 3,
                                    "span_recall": 200 / 3})


def test_span_f1_wrong_type_and_malformed_pieces_are_false_positives():
    targets = ["ESB (location); Tom (person)"]
    predictions = ["ESB (corporation); Tom (person); Lisa"]
    scores = metrics.span_f1(targets, predictions)
    assert scores == pytest.approx({"span_f1": 40.0, "span_precision": 100 / 3,
                                    "span_recall": 50.0})


def test_span_f1_counts_repeated_spans_as_multisets():
    scores = metrics.span_f1(["Tom (person); Tom (person)"],
                             ["Tom (person); Tom (person); Tom (person)"])
    assert scores == pytest.approx({"span_f1": 80.0, "span_precision": 200 / 3,
                                    "span_recall": 100.0})


def test_span_f1_all_none_is_perfect_and_missing_everything_is_zero():
    assert metrics.span_f1(["None", "None"], ["None", " "])["span_f1"] == 100.0
    assert metrics.span_f1(["Tom (person)"], ["None"]) == {
        "span_f1": 0.0, "span_precision": 100.0, "span_recall": 0.0}


def test_span_f1_rejects_several_references():
    with pytest.raises(ValueError, match="one reference per example"):
        metrics.span_f1([["Tom (person)", "Tom (group)"]], ["Tom (person)"])


@pytest.mark.parametrize("spans", [
    [],
    [("Empire State Building", "location"), ("ESB", "location")],
    [("AT&amp;T", "corporation"), ("M&amp;M", "product")],
    [("Star Wars ( Episode IV )", "creative-work"), ("Patchogue)", "location")],
    [("None", "person")],
])
def test_parse_spans_inverts_format_spans(spans):
    assert metrics.parse_spans(metrics.format_spans(spans)) == spans


def test_format_spans_writes_none_for_no_spans():
    assert metrics.format_spans([]) == "None"
    assert metrics.format_spans([("ESB", "location"), ("Tom", "person")]) == (
        "ESB (location); Tom (person)")


def test_format_spans_rejects_types_that_cannot_be_read_back():
    with pytest.raises(ValueError, match="cannot be written"):
        metrics.format_spans([("ESB", "loc (city)")])


def test_parse_spans_tolerates_extra_whitespace():
    text = "  Empire   State Building ( location ) ;ESB (location)  "
    assert metrics.parse_spans(text) == [("Empire State Building", "location"),
                                         ("ESB", "location")]


def test_parse_spans_keeps_malformed_pieces_with_empty_type():
    assert metrics.parse_spans("ESB (location); Tom; ()") == [
        ("ESB", "location"), ("Tom; ()", "")]
    assert metrics.parse_spans("(location)") == [("(location)", "")]


def test_bio_to_spans_on_wnut_like_sentence():
    tokens = ["Empire", "State", "Building", "=", "ESB"]
    tags = ["B-location", "I-location", "I-location", "O", "B-location"]
    assert metrics.bio_to_spans(tokens, tags) == [("Empire State Building", "location"),
                                                  ("ESB", "location")]


def test_bio_to_spans_stray_i_tag_starts_a_new_span():
    tokens = ["at", "Google", "Maps", "Tom", "Hanks", "film"]
    tags = ["O", "I-corporation", "I-product", "B-person", "I-person", "I-creative-work"]
    assert metrics.bio_to_spans(tokens, tags) == [
        ("Google", "corporation"), ("Maps", "product"), ("Tom Hanks", "person"),
        ("film", "creative-work")]


def test_bio_to_spans_rejects_non_bio_tags_and_length_mismatch():
    with pytest.raises(ValueError, match="'U-person' is not BIO"):
        metrics.bio_to_spans(["Tom"], ["U-person"])
    with pytest.raises(ValueError, match="2 tokens but 1 tags"):
        metrics.bio_to_spans(["Tom", "Hanks"], ["B-person"])


def test_metrics_module_imports_without_tensorflow_seqio_or_jax():
    code = ("import sys, ift_jax.metrics; "
            "print(sorted(m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_exact_match_normalizes_case_punctuation_and_articles():
    result = metrics.exact_match(["Eiffel Tower", ["a cat", "the dog"], "42"],
                                 ["The Eiffel tower.", "Dog!", "forty-two"])
    assert result == {"exact_match": pytest.approx(200 / 3)}
    assert metrics.accuracy(["Eiffel Tower"], ["The Eiffel tower."])["accuracy"] == 0.0


def test_metrics_are_found_by_name_and_unknown_names_list_the_available():
    assert metrics.get("bleu") is metrics.bleu
    with pytest.raises(ValueError, match="no metric 'rouge2'; available: accuracy, bleu"):
        metrics.get("rouge2")
