"""The benchmark scripts run end to end on a tiny T5 and the README table is built
from their JSON (no timing asserts: speed is what the scripts measure, not test)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
TINY = ["--inputs_length=32", "--targets_length=8", "--warmup=1", "--steps=1"]

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def run_script(name, *args):
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def train_record(results_dir):
    run_script("train_throughput.py", "--presets=tiny", "--methods=lora",
               "--batch_sizes=tiny:2", "--lora_rank=4", "--prompt_length=4",
               "--matmul_size=64", f"--output_dir={results_dir}", *TINY)
    return read(os.path.join(results_dir, "train_throughput_tiny_cpu.json"))


def test_train_throughput_measures_both_sides_from_the_same_start(train_record):
    assert [e["method"] for e in train_record["entries"]] == ["lora"]
    for entry in train_record["entries"]:
        assert set(entry["sides"]) == {"ours", "hf_eager"}
        for side in entry["sides"].values():
            assert "error" not in side, side.get("error")
            assert side["tokens_per_s"] > 0 and side["peak_memory_bytes"] > 0
            assert 0 < side["mfu"]
        check = entry["loss_check"]["hf_eager"]
        assert check["ok"] and check["same_trainable_params"], check
        assert check["max_relative_difference_all_steps"] < 1e-3, check  # same adapters
    assert train_record["command"].startswith("python benchmarks/train_throughput.py")
    assert train_record["machine"]["cpus"] >= 1


def test_useful_tokens_counts_every_segment_of_a_packed_row():
    sys.path.insert(0, BENCHMARKS)
    import packing
    packed = {"encoder_input_tokens": np.array([[5, 6, 7, 8, 0, 0]]),
              "decoder_target_tokens": np.array([[3, 1, 4, 1]]),
              "decoder_segment_ids": np.array([[1, 1, 2, 2]])}
    padded = {"encoder_input_tokens": np.array([[5, 6, 0, 0], [7, 0, 0, 0]]),
              "decoder_target_tokens": np.array([[3, 1, 0], [4, 1, 0]])}
    assert packing.useful_tokens(packed) == (4, 4, 2)
    assert packing.useful_tokens(padded) == (3, 4, 2)


def test_packing_runs_on_dialogsum(results_dir):
    # Byte-level DialogSum rows overflow 64 tokens, so both streams are full here; the
    # test pins the plumbing (real data, both streams, three workers), not the gain.
    run_script("packing.py", "--preset=tiny", "--batch_size=2", "--vocab=byte",
               "--stat_batches=2", "--inputs_length=64", "--targets_length=16",
               "--warmup=1", "--steps=1", "--no-ours_padded", f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "packing_dialogsum_tiny_cpu.json"))
    counts = record["token_counts"]
    assert counts["packed"]["useful_share"] >= counts["padded"]["useful_share"] > 0
    assert set(record["sides"]) == {"ours_packed", "hf_eager_padded"}
    assert all("error" not in side for side in record["sides"].values()), record["sides"]
    assert record["ratios"]["ours_packed_over_peer_padded"] > 0


def test_decoding_runs_on_tiny(results_dir):
    run_script("decoding.py", "--preset=tiny", "--batch=2", "--input_length=8",
               "--new_tokens=3", "--repeats=1", f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "decoding_tiny_cpu.json"))
    assert record["results"]["ratio_beams4"] > 0


def test_make_table_renders_a_row_per_figure(results_dir, train_record, tmp_path):
    readme = tmp_path / "README.md"
    run_script("make_table.py", f"--results_dir={results_dir}", f"--output={readme}")
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tiny" in line]
    assert sum("train step" in r for r in rows) == 1
    assert any("lora (b=2)" in r and "%" in r for r in rows)  # MFU column filled
    assert "peak matmul 64³" in text


def test_before_after_pairs_the_same_preset_and_method_of_two_runs(results_dir, train_record,
                                                                   tmp_path):
    run_script("before_after.py", f"--before_dir={results_dir}", f"--after_dir={results_dir}",
               "--before_code=same run", "--change=none", "--name=same",
               f"--output_dir={tmp_path}")
    record = read(tmp_path / "before_after_same.json")
    entry = train_record["entries"][0]
    row = record["comparison"]["tiny_lora"]
    assert row["ours_step_s"]["before"] == entry["sides"]["ours"]["median_step_s"]
    assert row["speedup_after_over_before"] == 1.0
    assert row["ours_over_hf_tokens_per_s"]["after"] == pytest.approx(
        entry["ratios_ours_over_peer"]["hf_eager"]["tokens_per_s"])
    assert record["command"].startswith("python benchmarks/before_after.py")


def test_prompt_tuning_peer_trains_one_encoder_prompt_equal_to_ours(tmp_path):
    # PEFT's seq2seq default makes a second (decoder) prompt table its forward never
    # reads; the peer must have ours' trainable params and start from ours' prompt.
    sys.path.insert(0, BENCHMARKS)
    import hf_reference
    import workers
    hf_reference.make_hf_checkpoint("v1_1", str(tmp_path))
    prompt = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    np.save(tmp_path / workers.PROMPT_FILE, prompt)
    model, untied = workers._peer_model({"hf_dir": str(tmp_path), "method": "prompt",
                                         "prompt_length": 5, "lora_rank": 4})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert untied and len(trainable) == 1
    np.testing.assert_array_equal(trainable[0].detach().numpy(), prompt)


def test_run_all_dry_run_lists_the_five_benchmarks():
    out = run_script("run_all.py", "--dry_run", "--presets=small").stdout.splitlines()
    assert [os.path.basename(line.split()[1]) for line in out] == [
        "train_throughput.py", "packing.py", "decoding.py", "eval_throughput.py", "startup.py"]


def _throughput_jobs(argv):
    sys.path.insert(0, BENCHMARKS)
    import train_throughput
    args = train_throughput.parse_args(argv)
    paths = {p: f"{p}.npz" for p in args.presets.split(",")}
    return train_throughput, train_throughput.jobs_in_order(
        args, paths, "/unused", {p: f"{p}_base" for p in paths})


def test_jobs_put_ours_and_the_eager_peer_first_and_compiled_peers_last():
    _, jobs = _throughput_jobs(["--presets=tiny,small", "--methods=full,lora",
                                "--peers=eager,compile"])
    assert [j.name for j in jobs] == [
        "tiny_full_ours", "tiny_full_hf_eager", "tiny_lora_ours", "tiny_lora_hf_eager",
        "small_full_ours", "small_full_hf_eager", "small_lora_ours", "small_lora_hf_eager",
        "tiny_full_hf_compile", "tiny_lora_hf_compile", "small_full_hf_compile",
        "small_lora_hf_compile"]
    peer = jobs[1].spec
    assert peer["hf_dir"] == jobs[0].spec["export_dir"] and not peer["compile"]
    assert peer["init_from"] == jobs[0].spec["init_from"] == "tiny_base"
    assert jobs[-1].spec["compile"] and jobs[-1].spec["batches"] == "small.npz"


def test_run_jobs_starts_a_peer_only_after_its_ours_and_honours_the_deadline(monkeypatch):
    import threading
    import time
    train_throughput, jobs = _throughput_jobs(["--presets=tiny,small", "--methods=full,lora",
                                               "--peers=eager,compile"])
    import workers
    started, lock = [], threading.Lock()

    def fake_spawn(kind, spec, workdir, name, timeout_s):
        with lock:
            started.append(name)
        assert kind == ("ours" if name.endswith("_ours") else "peer") and timeout_s > 0
        time.sleep(0.01)
        return {"error": "out of memory"} if name == "small_lora_ours" else {"median_step_s": 1}

    monkeypatch.setattr(workers, "spawn", fake_spawn)
    done = {}
    train_throughput.run_jobs(jobs, "/unused", 2, time.time() + 600,
                              lambda job, result: done.__setitem__(job.name, result))
    assert set(done) == {j.name for j in jobs}
    for job in jobs:
        if job.side != "ours":
            ours = f"{job.preset}_{job.method}_ours"
            assert job.name not in started or started.index(job.name) > started.index(ours)
    assert done["small_lora_hf_eager"] == {"error": "ours failed, so no shared weights"}
    assert "small_lora_hf_compile" not in started and done["tiny_full_hf_compile"] == {
        "median_step_s": 1}

    started.clear()
    done.clear()
    train_throughput.run_jobs(jobs, "/unused", 2, time.time() + 5,  # Under MIN_JOB_S.
                              lambda job, result: done.__setitem__(job.name, result))
    assert not started and all(r["error"].startswith("not run") or "ours failed" in r["error"]
                               for r in done.values())


def test_device_lock_is_exclusive(tmp_path, monkeypatch):
    import threading
    import time
    sys.path.insert(0, BENCHMARKS)
    import workers
    monkeypatch.setenv(workers.LOCK_ENV, str(tmp_path / "device.lock"))
    inside, overlaps = [0], []

    def hold():
        with workers.device_lock("test"):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.05)
            inside[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]


def test_eval_throughput_prompts_are_the_registered_tasks_texts():
    sys.path.insert(0, BENCHMARKS)
    import eval_throughput
    import ift_jax.tasks  # noqa: F401  (registers the suites' tasks)
    from ift_jax.data import inspection
    from ift_jax.suites import BBH_TASKS, MMLU_SUBJECTS
    for shots in (0, 5):
        # Round-robin: the second prompt is the first question of the second subject.
        prompt, _ = eval_throughput.mmlu_examples(2, shots)[1]
        task = f"mmlu_{shots}shot_{MMLU_SUBJECTS[1]}"
        assert prompt == inspection.preview(task, "test", 1)[0]["inputs"], task
    prompt = eval_throughput.bbh_examples(len(BBH_TASKS) + 1)[-1]  # Second example of task 0.
    assert prompt == inspection.preview(f"bbh_direct_{BBH_TASKS[0]}", "test", 2)[1]["inputs"]


def test_eval_throughput_measures_both_sides_on_tiny_and_they_agree(results_dir, tmp_path):
    run_script("eval_throughput.py", "--preset=tiny", f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "eval_throughput_tiny_cpu.json"))
    mmlu, bbh = record["mmlu_rank_classification"], record["bbh_direct_generation"]
    assert mmlu["agreement"]["same_argmax_letter"] == mmlu["examples"] == 8
    assert mmlu["agreement"]["within_tolerance"], mmlu["agreement"]
    assert bbh["agreement"]["same_tokens"] == bbh["examples"] == 4
    assert bbh["generated_tokens"] > 0
    assert mmlu["ours"]["examples_per_s"] > 0 and mmlu["hf_loop"]["examples_per_s"] > 0
    assert bbh["ours"]["tokens_per_s"] > 0 and bbh["hf_generate"]["tokens_per_s"] > 0
    readme = tmp_path / "README.md"
    run_script("make_table.py", f"--results_dir={results_dir}", f"--output={readme}")
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| eval: ")]
    assert len(rows) == 2 and all("| tiny |" in r for r in rows)


def test_adapter_serving_measures_the_three_ways_on_tiny_and_they_agree(results_dir):
    run_script("adapter_serving.py", "--preset=tiny", "--requests=8", "--batch=4",
               "--input_length=12", "--new_tokens=4", "--repeats=1",
               f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "adapter_serving_tiny_cpu.json"))
    assert set(record["sides"]) == {"ours_mixed", "ours_separate", "hf_peft_set_adapter"}
    assert all(side["tokens_per_s"] > 0 for side in record["sides"].values())
    assert sum(record["adapters"].values()) == 8
    # The same tokens three ways: per-row gathers, each adapter's own model, HF PEFT.
    assert record["agreement_with_ours_mixed"] == {"ours_separate": 1.0,
                                                   "hf_peft_set_adapter": 1.0}
    assert record["machine"]["cpus"] >= 1


def test_peft_tradeoffs_writes_the_table_from_one_measured_method(tmp_path):
    run_script("peft_tradeoffs.py", "--preset=tiny", "--methods=lora",
               f"--docs_dir={tmp_path}", f"--output_dir={tmp_path}")
    record = read(os.path.join(tmp_path, "peft_tradeoffs_tiny.json"))
    (lora,) = record["methods"]
    assert lora["method"] == "lora" and 0 < lora["trainable_params"] < lora["total_params"]
    assert lora["checkpoint_bytes"] > 0 and lora["step_s"] > 0 and lora["peak_rss_bytes"] > 0
    assert lora["decode_unmerged_s"] > 0 and lora["decode_merged_s"] > 0
    with open(os.path.join(tmp_path, "peft_tradeoffs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["method"] == "lora" and rows[0]["eval_metric"] == lora["eval_metric"]
    with open(os.path.join(tmp_path, "peft_tradeoffs.md")) as f:
        assert "| lora | " in f.read()
    assert os.path.getsize(os.path.join(tmp_path, "peft_tradeoffs.png")) > 0


def test_task_cache_measures_both_sides_on_tiny_and_they_agree(results_dir):
    run_script("task_cache.py", "--preset=tiny", f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "task_cache_tiny_x2.json"))
    assert record["same_batches"], record["sides"]
    assert record["cache"]["tasks"] == 2 and record["cache"]["examples"] == 400
    for side in ("uncached", "cached", "indexed"):
        assert record["sides"][side]["startup_s"] > 0
        assert record["sides"][side]["examples_per_s"] > 0


def _plan_row(size, levers, topology, peak):
    return {"size": size, "method": "lora", "levers": levers, "topology": topology,
            "params_bytes": 1, "optimizer_bytes": 1, "activations_bytes": 1, "peak_bytes": peak,
            "memory_bytes": 2 ** 35, "fits": True, "flops": 1e12, "model_flops": 2e12,
            "scanned": levers == "on", "compile_s": 3.0}


def test_scaling_plan_add_keeps_earlier_cells_and_credits_each_run(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    import scaling_plan
    run = {"budget_s": 10.0, "wall_s": 9.0, "machine": "m", "date": "d1", "command": "c1"}
    first = {**run, "rows": [_plan_row("base", "on", "v4-8", 5), _plan_row("xl", "on", "v4-8", 7)],
             "not_planned": [{"size": "xl", "method": "lora", "levers": "off",
                              "topology": "v4-8"}]}
    second = {**run, "date": "d2", "command": "c2", "rows": [
        _plan_row("xl", "on", "v4-8", 8), _plan_row("xl", "off", "v4-8", 9),
        _plan_row("xl", "scan", "v4-8", 6)], "not_planned": []}
    added = scaling_plan._added(first, second)
    assert sorted((r["size"], r["levers"], r["peak_bytes"], r["run"]) for r in added["rows"]) == [
        ("base", "on", 5, 0), ("xl", "off", 9, 1), ("xl", "on", 8, 1), ("xl", "scan", 6, 1)]
    assert added["not_planned"] == [] and [r["command"] for r in added["runs"]] == ["c1", "c2"]
    doc = tmp_path / "scaling.md"
    doc.write_text("# Scaling\n")
    scaling_plan._write_doc(str(doc), added)
    text = doc.read_text()
    assert "`c1` on d1" in text and "`c2` on d2" in text and "(rows marked 2)" in text
    assert "| 2.00 | 1.00 (one layer: scanned) | 3 (2) |" in text
    # Rows in the levers' order: on, scan (remat and bf16 frozen weights off), off.
    levers = [line.split(" | ")[2] for line in text.splitlines() if line.startswith("| xl |")]
    assert levers == ["on", "scan", "off"]


def test_resume_startup_measures_both_streams_and_the_restored_batch_agrees(results_dir):
    run_script("resume_startup.py", "--mixture=synthetic_sentiment", "--step=3",
               "--batch_size=2", "--inputs_length=48", "--targets_length=12",
               f"--output_dir={results_dir}")
    record = read(os.path.join(results_dir, "resume_startup_synthetic_sentiment_3.json"))
    assert record["first_batches_equal"]
    phases = record["phases"]
    for name in ("seqio_replay", "indexed_restore", "indexed_replay"):
        assert phases[name]["start_s"] > 0, name
    assert phases["indexed_restore"]["restored"] and not phases["indexed_replay"]["restored"]
    assert 0 < phases["save"]["fill"]["targets"] <= 1 and phases["save"]["position_bytes"] < 4096
