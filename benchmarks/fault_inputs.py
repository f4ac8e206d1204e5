"""Fault injection beyond training: export kills, a copied live run, input bombs.

Each trial ends in one of the outcomes a user can live with, checked here:

- `export_kill`: `ift-jax export --overwrite` over an earlier export, SIGKILLed on
  purpose before it writes (at a random time while it starts, reads and gathers
  the run), or while its temporary folder is being written (frozen with SIGSTOP
  when the folder exists, then killed). Expected:
  the earlier export byte for byte and loadable ("an untouched earlier state"),
  and the next export finishing with no temporary folder left.
- `copied_live_run`: a `cp -a` of a live run (frozen for the copy), trained in
  the copy while the original goes on. Expected: the copy takes over the lock it
  carries with a warning, and both runs end bit-exact with the reference.
- `input_bomb`: files someone else wrote, each through the command a user would
  run: template bombs (nested loops, a recursive macro, loops that print
  nothing), a t5x index declaring a 200,000 x 200,000 array, a deeply nested
  msgpack index, an HF `config.json` with `num_layers: 10000000`, a damaged
  `spiece.model`, UTF-16 input, a mixture of zero rates, prompt tuning on packed
  rows, an export into a training run. Expected: exit 2 with one line naming the
  problem, within a minute and well inside the host's memory, nothing written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from fault_runs import (
    REPO,
    Context,
    Train,
    committed,
    freeze_when,
    one_error_line,
    saving,
)

GiB = 2 ** 30
BOMB_SECONDS, BOMB_RSS = 60.0, 3 * GiB


def _tree(folder: str) -> dict[str, bytes]:
    if not os.path.isdir(folder):
        return {}
    return {name: open(os.path.join(folder, name), "rb").read()
            for name in sorted(os.listdir(folder))}


def _loads(folder: str) -> bool:
    from ift_jax import errors, hf
    try:
        hf.load_t5(folder)
        return True
    except errors.UserError:
        return False


def _temporary(out: str) -> list[str]:
    parent, name = os.path.split(out)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.export-"))


def _export(ctx: Context, out: str, log: str, *extra: str) -> Train:
    return Train(ctx.reference["workdir"], ctx.env, log, command=("export",),
                 extra=["--format=hf", f"--output={out}", *extra])


def export_kill_trial(ctx: Context, when: str, rng: random.Random,
                      attempts: int = 4) -> dict:
    """SIGKILL of an export replacing an earlier one, `when` = reading (before its
    temporary folder exists: at a random time while it starts, reads and gathers the
    run) or writing (while its temporary folder exists)."""
    out = ctx.workdir(f"export_kill_{when}")
    first = _export(ctx, out, f"{out}.first", "--step=8")
    first_code = first.wait()
    first.close()
    before, frozen, state = _tree(out), None, ""
    for attempt in range(attempts):  # The writing window is milliseconds: try again.
        second = _export(ctx, out, f"{out}.kill{attempt}", "--overwrite")
        delay = rng.uniform(0.5, 3.0)
        if when == "writing":
            ready = lambda: bool(_temporary(out))
        else:
            ready = lambda run=second, after=delay: time.monotonic() - run.started > after
        old = before
        frozen = freeze_when(second, ready, lambda: _tree(out) == old and (  # noqa: B023
            bool(_temporary(out)) == (when == "writing")), every=0.0002)
        state = ("gathering" if "export: gathering" in second.text() else "starting"
                 ) if when == "reading" else "writing"
        second.signal(signal.SIGKILL)
        second.close()
        if frozen is not None:
            break
        shutil.rmtree(out, ignore_errors=True)  # It finished first: an old one again.
        again = _export(ctx, out, f"{out}.again{attempt}", "--step=8")
        again.wait()
        again.close()
        before = _tree(out)
    left = _temporary(out)
    untouched, loads = _tree(out) == before, _loads(out)
    rerun = _export(ctx, out, f"{out}.rerun", "--overwrite")
    rerun_code = rerun.wait()
    rerun.close()
    from ift_jax import export_folder
    marker = json.loads(_tree(out).get(export_folder.MARKER, b"{}"))
    checks = {"first_export_exit_0": first_code == 0,
              "killed_in_the_state_drawn": frozen is not None,
              "old_export_untouched": untouched, "old_export_loads": loads,
              "rerun_exit_0": rerun_code == 0,
              "rerun_leaves_no_temporary_folder": not _temporary(out),
              "rerun_finished_and_loads": marker.get("step") == 12 and _loads(out)}
    return {"kind": "export_kill", "when": when, "outcome": "untouched earlier state",
            "frozen_at_s": None if frozen is None else round(frozen, 3),
            "killed_while": state, "left_by_the_kill": left, "checks": checks}


def copied_live_run_trial(ctx: Context) -> dict:
    """A `cp -a` of a live run, trained in the copy while the original goes on."""
    original = ctx.workdir("copied_live_run")
    copy = f"{original}_copy"
    run = Train(original, ctx.env, original)
    frozen = freeze_when(run, lambda: 4 in committed(original), lambda: not saving(original))
    subprocess.run(["cp", "-a", original, copy], check=True)
    run.signal(signal.SIGCONT)
    branch = Train(copy, ctx.env, copy)
    codes = (run.wait(), branch.wait())
    texts = (run.text(), branch.text())
    run.close()
    branch.close()
    checks = {"copied_while_running": frozen is not None,
              "both_exit_0": codes == (0, 0),
              "copy_takes_over_the_copied_lock_with_a_warning":
                  f"was taken for {os.path.realpath(original)}" in texts[1],
              **{f"original_{k}": v for k, v in ctx.complete(original).items()},
              **{f"copy_{k}": v for k, v in ctx.complete(copy).items()}}
    return {"kind": "copied_live_run", "outcome": "bit-exact resume", "exit_codes": codes,
            "checks": checks}


# ----------------------------------------------------------------------------
# Input bombs.


TEMPLATE_CONFIG = '''
from ift_jax.configs import default
from ift_jax.data import instructions, sources
from ift_jax.data.templates import JinjaTemplate
from ift_jax.tasks import mixtures

SOURCE = sources.GeneratedSource(
    "bomb", lambda split: [{{"id": i, "text": "hello world"}} for i in range(8)], ("text",),
    ("train", "validation"))
instructions.register_task("bomb_task", SOURCE, [JinjaTemplate("bomb", {template!r})])
mixtures.register_mixture("zero_rates", ["synthetic_sentiment", "synthetic_extraction"],
                          default_rate=0.0)


def get_config(arg=None):
    config = default.get_config()
    config.data.mixture = {mixture!r}
    config.train.steps, config.optimizer.warmup_steps = 2, 0
    return config
'''
TEMPLATES = {
    "nested_loops": "{% for a in range(100000) %}{% for b in range(100000) %}{{ text * 1000 }}"
                    "{% endfor %}{% endfor %} ||| x",
    "recursive_macro": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }} ||| x",
    "silent_loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                    "{% endfor %} ||| x",
}


def _config_file(folder: str, name: str, template: str, mixture: str) -> str:
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(TEMPLATE_CONFIG.format(template=template, mixture=mixture))
    return path


def _tiny_hf(folder: str) -> str:
    import flax.linen as nn
    import jax
    import numpy as np

    from ift_jax import hf
    from ift_jax.models import t5
    config = t5.get_config("tiny", vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                           num_decoder_layers=1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                          nn.unbox(t5.abstract_variables(config)["params"]))
    hf.save_t5(folder, config, params)
    return folder


def _huge_t5x(folder: str) -> str:
    import msgpack
    import tensorstore as ts
    os.makedirs(folder)
    spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file",
                                                              "path": "target.huge"},
            "metadata": {"shape": [200000, 200000], "chunks": [1024, 1024],
                         "compressor": {"id": "gzip"}}}
    ts.open({**spec, "kvstore": {"driver": "file", "path": os.path.join(folder, "target.huge")}},
            create=True, open=True).result()  # Metadata only.
    index = {"version": 3, "optimizer": {"target": {"token_embedder": {"embedding": spec}}}}
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(msgpack.packb(index))
    return folder


def _nested_t5x(folder: str) -> str:
    import msgpack
    os.makedirs(folder)
    nested = b"\x81\xa1a" * 900 + b"\x80"  # Inside msgpack's own limit, past the readers'.
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(b"\x82" + msgpack.packb("version") + msgpack.packb(3) + msgpack.packb(
            "optimizer") + b"\x81" + msgpack.packb("target") + nested)
    return folder


def _edited_hf(source: str, folder: str, **changes) -> str:
    shutil.copytree(source, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def _bombs(root: str, reference: str) -> list[dict]:
    """Each bomb: its name, `ift-jax` argv, command, what its one line must say, and the
    folder it must not write (if it has one)."""
    hf_dir = _tiny_hf(os.path.join(root, "tiny_hf"))
    spiece = _edited_hf(hf_dir, os.path.join(root, "damaged_spiece"))
    with open(os.path.join(spiece, "spiece.model"), "wb") as f:
        f.write(b"\x0a\x05trunc")
    utf16, rows = os.path.join(root, "utf16.jsonl"), os.path.join(root, "rows.jsonl")
    with open(utf16, "wb") as f:
        f.write('{"inputs": "a", "targets": "b"}\n'.encode("utf-16"))
    with open(rows, "w") as f:
        f.write('{"inputs": "a", "targets": "b"}\n')
    huge_layers = _edited_hf(hf_dir, os.path.join(root, "huge_layers"), num_layers=10000000)

    def bomb(name, argv, says, writes=None):
        return {"name": name, "argv": argv, "command": argv[0], "says": says,
                "writes": writes}

    def train(name, config, *flags):
        workdir = os.path.join(root, f"{name}_run")
        return bomb(name, ["train", f"--config={config}", f"--workdir={workdir}", *flags],
                    "rendering stopped", workdir)

    bombs = [train(f"template_{name}", _config_file(root, name, source, "bomb_task"))
             for name, source in TEMPLATES.items()]
    zero = train("zero_rate_mixture", _config_file(root, "zero", "x ||| y", "zero_rates"))
    prompt = train("prompt_on_packed_rows", _config_file(root, "prompt", "x ||| y",
                                                         "synthetic_sentiment"),
                   "--config.peft.method=prompt")
    zero["says"], prompt["says"] = "gives every task a rate of 0", "data.pack=True"
    huge_out, nested_out = os.path.join(root, "huge_out"), os.path.join(root, "nested_out")
    huge = _huge_t5x(os.path.join(root, "huge_t5x"))
    nested = _nested_t5x(os.path.join(root, "nested_t5x"))
    return bombs + [zero, prompt,
        bomb("t5x_huge_declared_array", ["convert", f"--t5x_checkpoint={huge}",
                                         f"--output={huge_out}"], "GiB of host memory", huge_out),
        bomb("t5x_deeply_nested_index", ["convert", f"--t5x_checkpoint={nested}",
                                         f"--output={nested_out}"], "nests deeper than 64",
             nested_out),
        bomb("hf_config_num_layers_10000000", ["score", f"--init_from={huge_layers}",
                                               "--vocab=byte", f"--input={rows}"],
             "num_layers=10,000,000 is past the 512"),
        bomb("damaged_spiece_model", ["score", f"--init_from={spiece}", f"--input={rows}"],
             "is not a SentencePiece model"),
        bomb("utf16_input", ["score", f"--init_from={hf_dir}", "--vocab=byte",
                             f"--input={utf16}"], "it looks like UTF-16"),
        bomb("export_into_a_training_run", ["export", f"--workdir={reference}", "--format=hf",
                                            f"--output={reference}", "--overwrite"],
             "nothing there is replaced, even with --overwrite"),
    ]


def _files(folder: str) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


def bomb_trials(ctx: Context) -> list[dict]:
    """Every input bomb through the command a user would run it with."""
    from ift_jax import declared_sizes
    root = ctx.workdir("input_bombs")
    os.makedirs(root)
    reference = _files(ctx.reference["workdir"])
    trials = []
    for bomb in _bombs(root, ctx.reference["workdir"]):
        log = os.path.join(root, bomb["name"])
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            started = time.monotonic()
            process = subprocess.Popen([sys.executable, "-m", "ift_jax", *bomb["argv"]],
                                       cwd=REPO, env=ctx.env, stdout=out, stderr=err,
                                       start_new_session=True)
            code, wall, rss = _wait_measured(process, started)
        with open(f"{log}.err") as f:
            stderr = f.read()
        writes = bomb["writes"]
        checks = {"exit_2": code == 2, "one_error_line": one_error_line(stderr, bomb["command"]),
                  "names_the_problem": bomb["says"] in stderr,
                  f"within_{BOMB_SECONDS:.0f}_s": wall < BOMB_SECONDS,
                  f"peak_rss_below_{BOMB_RSS // GiB}_gib": rss < BOMB_RSS,
                  "nothing_written": not writes or not _files(writes)}
        trials.append({"kind": "input_bomb", "bomb": bomb["name"], "outcome": "one clear line",
                       "command": f"ift-jax {bomb['command']}", "wall_s": round(wall, 2),
                       "peak_rss_gib": round(rss / GiB, 3), "line": stderr.strip()[:400],
                       "checks": checks})
    trials[-1]["checks"]["training_run_untouched"] = _files(ctx.reference["workdir"]) == reference
    trials[0]["available_memory_gib"] = round((declared_sizes.available_memory() or 0) / GiB, 1)
    return trials


def _peak_rss(pid: int) -> int:
    """VmHWM of a live process: its peak resident memory since it started (exec), not
    the benchmark's own memory it was forked from (which `ru_maxrss` would include)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _wait_measured(process: subprocess.Popen, started: float) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes of the process), the peak read every
    20 ms while it runs; killed past twice the time bound."""
    peak = 0
    while process.poll() is None:
        peak = max(peak, _peak_rss(process.pid))
        if time.monotonic() - started > 2 * BOMB_SECONDS:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.02)
    return process.returncode, time.monotonic() - started, peak


def run_all(ctx: Context, rng: random.Random) -> list[dict]:
    """Every trial of this module, in order."""
    return [export_kill_trial(ctx, "reading", rng), export_kill_trial(ctx, "writing", rng),
            copied_live_run_trial(ctx), *bomb_trials(ctx)]
