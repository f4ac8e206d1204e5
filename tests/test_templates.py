"""Instruction templates: FLAN patterns, sandboxed promptsource jinja, choice, few-shot."""

import collections
import os
import pickle
import subprocess
import sys

import pytest

from ift_jax.data.templates import (FewShotFormat, JinjaTemplate, PatternTemplate,
                                    TemplateError, choose_exemplars, choose_template,
                                    format_few_shot, format_options, validate_templates)

SAMSUM = {"id": "13818513", "dialogue": "Amanda: I baked cookies.\nJerry: Sure!",
          "summary": "Amanda baked cookies."}

AMAZON = JinjaTemplate(
    "amazon_rating",
    "{{review_body}}\nHow would you rate this product?\n"
    "- {{ answer_choices | join('\\n- ') }} ||| {{answer_choices[star_rating-1]}}",
    answer_choices="1 ||| 2 ||| 3 ||| 4 ||| 5")


def test_pattern_renders_fields():
    template = PatternTemplate("samsum_0", "{dialogue}\n\nBriefly summarize that dialogue.",
                               "{summary}")
    assert template.render(SAMSUM) == (
        "Amanda: I baked cookies.\nJerry: Sure!\n\nBriefly summarize that dialogue.",
        "Amanda baked cookies.")


def test_pattern_renders_options_like_flan():
    template = PatternTemplate("rte_0", "{premise}\nDoes it follow?\n{options_}", "{answer}")
    example = {"premise": "It rains.", "options": ["yes", "no"], "answer": "yes"}
    assert template.render(example) == ("It rains.\nDoes it follow?\nOPTIONS:\n- yes\n- no",
                                        "yes")
    assert template.answer_choices_for(example) == ["yes", "no"]


def test_format_options():
    assert format_options(["a", "b"]) == "OPTIONS:\n- a\n- b"


def test_pattern_fields_cover_index_attribute_and_escaped_braces():
    template = PatternTemplate("t", "{{literal}} {a[0]} {b.real} {options_}", "{c}")
    assert template.fields() == frozenset({"a", "b", "c", "options"})
    assert template.render({"a": ["x"], "b": 2, "c": "y", "options": ["o"]}) == (
        "{literal} x 2 OPTIONS:\n- o", "y")


def test_pattern_from_tuples_names_by_index():
    templates = PatternTemplate.from_tuples("samsum", [("{dialogue}", "{summary}"),
                                                       ("Sum up: {dialogue}", "{summary}")])
    assert [t.name for t in templates] == ["samsum_0", "samsum_1"]
    assert templates[1].inputs == "Sum up: {dialogue}"


def test_pattern_missing_field_names_template_and_field():
    template = PatternTemplate("samsum_3", "{dialog}", "{summary}")
    with pytest.raises(TemplateError, match=r"'samsum_3'.*dialog.*has fields: dialogue"):
        template.render(SAMSUM)


def test_pattern_refuses_positional_and_dunder_fields():
    with pytest.raises(TemplateError, match="'p'.*positional"):
        PatternTemplate("p", "{}", "{x}")
    with pytest.raises(TemplateError, match="'d'.*unsafe access refused"):
        PatternTemplate("d", "{x.__class__.__init__.__globals__}", "{x}")


def test_jinja_amazon_renders_choices_and_target():
    inputs, targets = AMAZON.render({"review_body": "Works well.", "star_rating": 4})
    assert inputs == ("Works well.\nHow would you rate this product?\n"
                      "- 1\n- 2\n- 3\n- 4\n- 5")
    assert targets == "4"
    assert AMAZON.answer_choices_for({"review_body": "", "star_rating": 1}) == [
        "1", "2", "3", "4", "5"]


def test_jinja_strips_inputs_and_targets():
    template = JinjaTemplate("t", "\n  {{ a }}  \n|||\n   {{ b }}\n\n")
    assert template.render({"a": "x", "b": "y"}) == ("x", "y")


def test_jinja_pipes_inside_example_values_do_not_split():
    template = JinjaTemplate("t", "{{ a }} ||| {{ b }}")
    assert template.render({"a": "x ||| z", "b": "y"}) == ("x ||| z", "y")


def test_jinja_answer_choices_render_from_example():
    template = JinjaTemplate("t", "{{ q }} ||| {{ answer_choices[label] }}",
                             answer_choices="{{ neg }} ||| {{ pos }}")
    example = {"q": "Good?", "label": 1, "neg": "no", "pos": "yes"}
    assert template.answer_choices_for(example) == ["no", "yes"]
    assert template.render(example) == ("Good?", "yes")


def test_jinja_without_separator_is_an_error():
    with pytest.raises(TemplateError, match="'no_sep'.*'\\|\\|\\|'"):
        JinjaTemplate("no_sep", "{{ a }} {{ b }}")


def test_jinja_rendering_without_separator_is_an_error():
    template = JinjaTemplate("cond", "{% if a %}{{ a }} ||| {{ b }}{% endif %}")
    with pytest.raises(TemplateError, match="'cond' rendered without"):
        template.render({"a": "", "b": "y"})


def test_jinja_syntax_error_names_template():
    with pytest.raises(TemplateError, match=r"'broken'.*syntax error.*line 1"):
        JinjaTemplate("broken", "{{ a ||| {{ b }}")


def test_jinja_answer_choices_without_definition_is_an_error():
    with pytest.raises(TemplateError, match="'t' uses answer_choices but defines none"):
        JinjaTemplate("t", "{{ a }} ||| {{ answer_choices[0] }}")


@pytest.mark.parametrize("expression", [
    "''.__class__.__mro__",
    "cycler.__init__",
    "''.__class__.__base__.__subclasses__()",
])
def test_jinja_sandbox_refuses_escapes(expression):
    template = JinjaTemplate("evil", "{{ " + expression + " }} ||| x")
    with pytest.raises(TemplateError, match="'evil'.*unsafe access refused"):
        template.render({})


def test_jinja_sandbox_never_runs_os_system(tmp_path):
    marker = tmp_path / "pwned"
    template = JinjaTemplate(
        "evil", "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }} ||| x")
    with pytest.raises(TemplateError, match="'evil'.*unsafe access refused"):
        template.render({})
    assert not marker.exists()


def test_jinja_missing_field_names_template_and_field():
    template = JinjaTemplate("amazon_0", "{{ review }} ||| {{ star_rating }}")
    with pytest.raises(TemplateError, match=r"'amazon_0'.*'review' is undefined.*"
                                            r"has fields: review_body, star_rating"):
        template.render({"review_body": "ok", "star_rating": 3})


def test_jinja_fields_exclude_globals_loops_and_answer_choices():
    template = JinjaTemplate(
        "t", "{% for i in range(n) %}{{ loop.index }}{{ items[i] }}{% endfor %}"
             "{{ lipsum is defined }} ||| {{ answer_choices[label] }}",
        answer_choices="{{ neg }} ||| {{ pos }}")
    assert template.fields() == frozenset({"n", "items", "label", "neg", "pos"})
    assert AMAZON.fields() == frozenset({"review_body", "star_rating"})


def test_jinja_template_pickles_and_renders_in_a_fresh_process():
    # Task pipelines ship templates to worker processes; the compiled jinja is not data.
    code = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); "
            "print(t.render({'review_body': 'x', 'star_rating': 2})[1])")
    result = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(AMAZON),
                            capture_output=True, check=True)
    assert result.stdout.decode().strip() == "2"


def test_validate_templates_names_unknown_field_and_sorted_fields():
    templates = [PatternTemplate("samsum_0", "{dialogue}", "{summary}"),
                 PatternTemplate("samsum_3", "{dialog}", "{summary}")]
    with pytest.raises(TemplateError) as info:
        validate_templates("samsum", templates, ["summary", "id", "dialogue"])
    assert str(info.value) == ("template 'samsum_3' uses field {dialog}; "
                               "task 'samsum' has fields: dialogue, id, summary")


def test_validate_templates_accepts_known_fields_of_both_kinds():
    validate_templates("amazon", [AMAZON, JinjaTemplate("a1", "{{ review_body }} ||| ok")],
                       ["review_body", "star_rating", "extra"])


def test_validate_templates_rejects_duplicate_names():
    templates = [PatternTemplate("t_0", "{a}", "{b}"), PatternTemplate("t_0", "{b}", "{a}")]
    with pytest.raises(TemplateError, match="task 'task' has duplicate template names: t_0"):
        validate_templates("task", templates, ["a", "b"])


def test_validate_templates_options_needs_options_field():
    templates = [PatternTemplate("nli_0", "{premise}\n{options_}", "{label}")]
    validate_templates("nli", templates, ["premise", "label", "options"])
    with pytest.raises(TemplateError, match=r"'nli_0' uses field \{options\}"):
        validate_templates("nli", templates, ["premise", "label"])


def test_choose_template_is_deterministic_across_processes():
    templates = [PatternTemplate(f"t_{i}", "{a}", "{b}") for i in range(7)]
    here = [choose_template(templates, 3, f"id-{i}") for i in range(20)]
    code = ("from ift_jax.data.templates import choose_template; "
            "print([choose_template(range(7), 3, f'id-{i}') for i in range(20)])")
    # A different PYTHONHASHSEED would change anything built on Python's hash().
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert result.stdout.decode().strip() == str(here)
    assert here != [choose_template(templates, 4, f"id-{i}") for i in range(20)]


def test_choose_template_uses_every_template_roughly_uniformly():
    counts = collections.Counter(choose_template(range(10), 0, str(i)) for i in range(1000))
    assert sorted(counts) == list(range(10))
    assert max(counts.values()) < 150 and min(counts.values()) > 50


def test_format_few_shot_exact_string():
    fmt = FewShotFormat(input_target_sep=" => ", example_sep="\n---\n", prefix="Answer.\n")
    assert format_few_shot([("1+1", "2"), ("2+2", "4")], "3+3", fmt) == (
        "Answer.\n1+1 => 2\n---\n2+2 => 4\n---\n3+3")
    assert format_few_shot([("q1", "a1")], "q2") == "q1\na1\n\nq2"


def test_format_few_shot_without_exemplars_is_prefix_and_inputs():
    assert format_few_shot([], "q", FewShotFormat(prefix="P: ")) == "P: q"


def test_choose_exemplars_deterministic_distinct_and_excluding():
    picks = choose_exemplars(10, 4, seed=0, example_id="ex-1", exclude=3)
    assert picks == choose_exemplars(10, 4, seed=0, example_id="ex-1", exclude=3)
    assert len(set(picks)) == 4 and 3 not in picks
    assert all(0 <= i < 10 for i in picks)
    # All nine non-excluded candidates, for many ids: the excluded one never appears.
    for i in range(200):
        assert 3 not in choose_exemplars(10, 9, seed=0, example_id=str(i), exclude=3)
    others = {tuple(choose_exemplars(10, 4, seed=0, example_id=str(i))) for i in range(50)}
    assert len(others) > 40


def test_choose_exemplars_not_enough_candidates():
    with pytest.raises(TemplateError, match="cannot choose 5 exemplars from 4 candidates"):
        choose_exemplars(5, 5, seed=0, example_id="x", exclude=2)


# --- bounds on what a template may do ---------------------------------------------------

BOMBS = {
    "nested loops printing": "{% for a in range(100000) %}{% for b in range(100000) %}"
                             "{{ text }}{% endfor %}{% endfor %}",
    "text times 1000 in a loop": "{% for a in range(100000) %}{{ text * 1000 }}{% endfor %}",
    "a huge repeat": "{{ text * 1000000000 }}",
    "a list repeated": "{{ (range(100000)|list) * 100000 }}",
    "doubling by ~": "{% set ns = namespace(s=text) %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling by +": "{% set ns = namespace(s=text) %}{% for i in range(64) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "a padded method": "{{ text.ljust(1000000000) }}",
    "a format width": "{{ '{:>1000000000}'.format(text) }}",
    "a width from an argument": "{{ '{:>{}}'.format(text, 1000000000) }}",
    "a printf width": "{{ '%1000000000s' % text }}",
    "the format filter": "{{ '%1000000000s'|format(text) }}",
    "a centered filter": "{{ text|center(1000000000) }}",
    "replace between every character": "{{ (text * 1000)|replace('', text * 1000) }}",
    "a huge power": "{{ 7 ** 100000000 }}",
    "a macro calling itself": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "lorem ipsum": "{{ lipsum(100000000) }}",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_template_bomb_stops_within_its_bounds_in_one_line(name):
    from ift_jax.data import bounded_jinja
    template = JinjaTemplate("bomb", BOMBS[name] + " ||| x")
    with pytest.raises(TemplateError) as raised:
        template.render({"text": "hello world"})
    message = str(raised.value)
    assert message.startswith("template 'bomb': rendering stopped: ") and "\n" not in message
    assert str(f"{bounded_jinja.MAX_CHARS:,}") in message or "bits" in message or (
        f"deeper than {bounded_jinja.MAX_DEPTH}" in message)


@pytest.mark.parametrize("source", [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% for a in text %}{% for b in text %}{% for c in text %}{% for d in text %}"
    "{% for e in text %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
])
def test_a_template_that_runs_without_end_stops_at_the_time_bound(source, monkeypatch):
    from ift_jax.data import bounded_jinja
    import time
    monkeypatch.setattr(bounded_jinja, "MAX_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(TemplateError, match="rendering stopped: rendering took longer than "
                                            "0.3 s"):
        JinjaTemplate("slow", source + " ||| x").render({"text": "hello world" * 10})
    assert time.monotonic() - started < 5


def test_bounded_rendering_keeps_what_real_templates_do():
    template = JinjaTemplate(
        "fine", "{% for w in text.split() %}{{ w|upper ~ '!' }} {% endfor %}"
                "{{ '%d' % 12345678 }} {{ '{:>6}'.format(n) }} {{ 'x' * 3 }} "
                "{{ items|join(', ') }} ||| {{ answer_choices[label] }}",
        answer_choices="no ||| yes")
    assert template.render({"text": "a b", "n": 42, "items": ["p", "q"], "label": 1}) == (
        "A! B! 12345678     42 xxx p, q", "yes")


def test_pattern_widths_are_bounded_too():
    with pytest.raises(TemplateError, match="format spec '>1000000000' would make"):
        PatternTemplate("wide", "{text:>1000000000}", "{label}")
    from_data = PatternTemplate("wide", "{text:>{width}}", "{label}")
    with pytest.raises(TemplateError, match=r"format spec '>\{width\}' would make 1,000,000,000"):
        from_data.render({"text": "a", "width": 1000000000, "label": "x"})
    assert from_data.render({"text": "a", "width": 3, "label": "x"}) == ("  a", "x")
