"""Studies (`ift-jax study`): every study's smoke preset end to end through the
runner, sharing one root (the base is trained once), the resume, refusals and
the generated pages.

The smoke runs happen once, in a module fixture: the base study as `ift-jax
train` processes (the runner's default), the others in this process
(`--in_process`) to keep start-up out of the suite's time.
"""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from ift_jax import cli, errors, hf, run_flags, studies, studies_runner, study_pages
from ift_jax.data import vocabularies
from ift_jax.models import t5
from ift_jax.studies import forgetting, lora_rank, prompt_vs_scale, recipe
from ift_jax.tasks import synthetic

ORDER = ("base", "forgetting", "multitask_remedy", "lora_rank", "prompt_vs_scale",
         "icl_vs_finetuned")


def _flan_like_checkpoint(out: str) -> str:
    """A random tiny HF T5 directory with its own spiece.model, as FLAN-T5's has."""
    texts = [synthetic._support("train", i)["dialogue"] for i in range(300)]
    vocabularies.train_sentencepiece(texts, os.path.join(out, "spiece"), 200)
    config = t5.get_config("tiny", vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                           num_decoder_layers=1, num_heads=2)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                          nn.unbox(t5.abstract_variables(config)["params"]))
    hf.save_t5(out, config, params)
    return out


def _study(root, name, *extra):
    return cli.main(["study", name, "--preset=smoke", f"--workdir={root}", *extra])


# Every study's smoke preset runs end to end here: the base (steps as processes, the
# runner's default), then the others in this process; steps shared between studies
# (the base, the forgetting runs) run once. Each step costs 10-60 s of CPU even at
# smoke size. The claims' rules are checked on fixed numbers below.
RUN = ORDER


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("studies"))
    assert _study(root, "base") == 0  # Steps as processes: the runner's default.
    for name in RUN[1:]:
        assert _study(root, name, "--in_process") == 0, name
    hf_dir = _flan_like_checkpoint(str(tmp_path_factory.mktemp("flan")))
    assert _study(root, "dialogsum_flan_t5", f"--init_from={hf_dir}", "--in_process") == 0
    return root


@pytest.mark.parametrize("name", ORDER)
def test_each_studys_plan_commands_the_cli_accepts(root, name, capsys):
    assert _study(root, name, "--dry_run") == 0
    lines = capsys.readouterr().out.splitlines()
    plan = studies_runner.make_plan(name, "smoke", root)
    assert lines == [s.shell() + ("  # done, skipped" if s.done() else "") for s in plan.steps]
    for step in plan.steps:
        if step.command == ("train",):  # Config file, keys and values checked.
            run_flags.parse_train(step.argv[1:])
        else:
            cli.build_parser().parse_args(step.argv)


def _page(root, name):
    with open(os.path.join(root, name, f"{name}.md")) as f:
        return f.read()


@pytest.mark.parametrize("name", [*RUN, "dialogsum_flan_t5"])
def test_each_study_writes_its_page_with_table_commands_commit_and_times(root, name):
    page = _page(root, name)
    study = studies.get(name)
    assert page.startswith(f"# {study.TITLE}\n") and "Preset `smoke`" in page
    assert re.search(r"^\| .* \|\n\|(---\|)+$", page, re.M)  # A results table.
    plan = studies_runner.make_plan(name, "smoke", root, init_from=study.NEEDS_INIT_FROM
                                    if hasattr(study, "NEEDS_INIT_FROM") else "")
    for step in plan.steps if name != "dialogsum_flan_t5" else ():
        assert step.shell() in page  # Every step's exact command.
    assert f"ift-jax study {name} --preset=smoke --workdir={root}" in page
    # No path of this machine: the data beside the checkout, the checkout's own files.
    assert "export IFT_JAX_DATA_DIR=../shared/data\n" in page
    assert os.environ["IFT_JAX_DATA_DIR"] not in page and study_pages.CHECKOUT not in page
    commit = re.search(r"Commits?: `([0-9a-f]{40}(\+dirty)?|unknown)`", page)
    assert commit, "the page names the commit"
    assert "AMD" in page or "Intel" in page or "cores" in page
    with open(os.path.join(root, name, f"{name}.json")) as f:
        payload = json.load(f)
    assert payload["study"] == name and payload["findings"]
    assert all(row["done"] and row["wall_s"] and row["cpu_s"] is not None
               for row in payload["steps"])
    if name != "dialogsum_flan_t5":
        assert os.path.exists(os.path.join(root, name, f"{name}.png"))


def test_every_step_ran_once_and_records_wall_and_cpu_time(root):
    timings = studies_runner.read_timings(root)
    assert all(len(attempts) == 1 for attempts in timings.values()), timings
    assert timings["base/train"][0]["in_process"] is False  # A process of its own.
    assert all(a["exit_code"] == 0 and a["cpu_s"] > 0 for rows in timings.values()
               for a in rows)
    assert "forgetting/full" in timings and "base/train" in timings


def test_a_rerun_skips_finished_steps_and_a_stopped_one_runs_again(root, capsys):
    before = sum(len(a) for a in studies_runner.read_timings(root).values())
    assert _study(root, "forgetting", "--in_process") == 0
    assert "forgetting/full:" not in capsys.readouterr().out
    assert sum(len(a) for a in studies_runner.read_timings(root).values()) == before
    # A step stopped before its end (no finished summary) is the only one run again.
    os.remove(os.path.join(root, "forgetting", "lora", "summary.json"))
    assert _study(root, "forgetting", "--in_process") == 0
    ran = re.findall(r"step (\S+): ift-jax", capsys.readouterr().out)
    assert ran == ["forgetting/lora"]


def test_dry_run_marks_done_steps(root, capsys):
    assert _study(root, "forgetting", "--dry_run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("ift-jax ") and line.endswith("# done, skipped")
                         for line in lines)


def test_a_changed_config_is_refused_naming_the_fields(root, monkeypatch, capsys):
    monkeypatch.setitem(recipe.FINE_TUNING, "smoke", {**recipe.FINE_TUNING["smoke"], "steps": 3})
    assert _study(root, "forgetting", "--in_process") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "steps.forgetting/full.flags.config.train.steps 2 -> 3" in err
    assert "steps.forgetting/lora.flags.config.train.steps 2 -> 3" in err


def test_an_unknown_study_lists_the_studies(capsys):
    assert cli.main(["study", "forgeting", "--workdir=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown study 'forgeting'" in err
    assert ", ".join(studies.STUDIES) in err


def test_the_flan_study_needs_weights_and_its_page_says_so(tmp_path, capsys):
    assert _study(str(tmp_path), "dialogsum_flan_t5") == 2
    assert "needs --init_from" in capsys.readouterr().err
    assert _study(str(tmp_path), "dialogsum_flan_t5", "--page_only") == 0
    page = _page(str(tmp_path), "dialogsum_flan_t5")
    assert "**Needs FLAN-T5 weights**" in page
    assert "| zero-shot | 0.2334 | 0.0760 | 0.2015 | – | – | – |" in page
    assert "| full | 0.4216 | 0.1804 | 0.3384 | – | – | – |" in page
    assert "| lora | 0.4081 | 0.1633 | 0.3251 | – | – | – |" in page


def test_init_from_is_refused_for_studies_that_train_their_own_base():
    with pytest.raises(errors.ConfigError, match="goes with dialogsum_flan_t5"):
        studies_runner.make_plan("forgetting", "smoke", "/tmp/x", init_from="/some/dir")


def test_prompt_vs_scale_plans_a_base_and_two_runs_per_extra_size():
    """The smoke preset has one size (CI time); the cpu plan is checked without running."""
    steps = {s.name: s for s in studies_runner.make_plan("prompt_vs_scale", "cpu", "/r").steps}
    for size in set(recipe.SIZES["cpu"]) - {recipe.BASE_SIZE}:
        d_model = recipe.SIZES["cpu"][size][0]
        assert dict(steps[f"base/train_{size}"].flags)["config.model.d_model"] == d_model
        for method in prompt_vs_scale.METHODS:
            flags = dict(steps[f"prompt_vs_scale/{size}_{method}"].flags)
            assert flags["config.init_from"] == f"/r/base/train_{size}"
            assert flags["config.peft.method"] == method
    assert "forgetting/full" in steps and "forgetting/prompt" in steps  # The m size's runs.


def _sizes(*gaps):
    return {"sizes": {f"x{i}": {"params": 10 ** i, "gap": g} for i, g in enumerate(gaps)}}


def test_prompt_vs_scale_rule_needs_the_gap_to_fall_at_every_size():
    assert "**reproduced**" in prompt_vs_scale.findings(_sizes(5.0, 3.0, 1.0))[0]
    assert "**not reproduced**" in prompt_vs_scale.findings(_sizes(5.0, 6.0, 1.0))[0]
    assert prompt_vs_scale.findings(_sizes(5.0))[0].startswith("Not measured")


def _run(gain, forgot):
    """A fine-tuning run's results with a final ROUGE-L of 10 + gain and a trained-guard
    mean primary change of -forgot."""
    return {"params": {}, "points": [{"step": 1, "target": {"rougeL": 10.0 + gain},
                                      "trained": {"mean_primary": -forgot}}]}


def test_forgetting_rules_check_the_claims_as_stated():
    ref = {recipe.TARGET: {"rougeL": 10.0}}
    holds = {"reference": ref, "runs": {"full": _run(8, 6), "lora": _run(5, 1),
                                        "prompt": _run(2, 0.5)}}
    assert [line.count("**reproduced**") for line in forgetting.findings(holds)] == [1, 1, 1]
    fails = {"reference": ref, "runs": {"full": _run(8, 2), "lora": _run(9, 1.5),
                                        "prompt": _run(2, 0.5)}}
    lines = forgetting.findings(fails)
    assert [("**not reproduced**" in line) for line in lines[:3]] == [True, False, True]
    assert lines[3].startswith("What we would try next")


def test_a_step_stopped_in_process_stops_the_study(tmp_path, capsys):
    """`--in_process`: a SIGTERM makes the step's run save and return 0 unfinished; the
    runner must stop there (130), not go on to the next step."""
    calls = []

    def stopped_run(argv):  # Returns as `ift-jax train` does after a SIGTERM, unfinished.
        calls.append(argv)
        return 0

    code = studies_runner.run("forgetting", "smoke", str(tmp_path), in_process=stopped_run)
    assert code == 130 and len(calls) == 1
    assert "stopped during step base/train" in capsys.readouterr().err
    assert studies_runner.read_timings(str(tmp_path))["base/train"][0]["stopped"] is True


def _ranks(base, *scores):
    point = lambda rouge, loss: {"rougeL": rouge, "loss": loss, "trainable_params": 1}  # noqa: E731
    return {"base": {"rougeL": base}, "full": point(12.0, 3.5),
            "ranks": {2 ** i: point(score, 5.0 - i / 10) for i, score in enumerate(scores)}}


def test_lora_rank_plateau_counts_only_when_a_rank_beats_the_base():
    assert "**reproduced**" in lora_rank.findings(_ranks(6.0, 9.0, 9.5, 9.2))[0]
    assert "**not reproduced**" in lora_rank.findings(_ranks(6.0, 7.0, 7.0, 7.0, 7.0, 9.0))[0]
    lines = lora_rank.findings(_ranks(6.0, 3.7, 0.4, 4.9))  # All below the base.
    assert "**inconclusive**" in lines[0] and "no rank's ROUGE-L beats the base's" in lines[1]
    assert any(line.startswith("Validation loss by rank: r = 1: 5.000") for line in lines)


def test_a_page_claims_nothing_about_a_load_it_did_not_measure():
    assert "otherwise idle" not in study_pages._timing_section(
        [{"step": "s", "done": True, "wall_s": None, "cpu_s": None, "load": [None, None],
          "attempts": [], "commits": []}], 2)
    measured = study_pages._timing_section(
        [{"step": "s", "done": True, "wall_s": 60.0, "cpu_s": 55.0, "load": [0.4, 0.8],
          "attempts": [{}], "commits": ["abc"]}], 2)
    assert "stayed at or below 0.8 on 2 cores while the steps ran: the machine was " \
           "otherwise idle" in measured
    assert study_pages.portable_data_dir("/elsewhere/datasets") == "/path/to/data"
    assert study_pages.portable(f"--config={study_pages.CHECKOUT}/configs/flan_t5.py:x") == (
        "--config=configs/flan_t5.py:x")
