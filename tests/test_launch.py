"""Launchers (launch/): exact commands, quoting, worker fan-out, resume loop, sbatch script.

No network and no gcloud: command builders are pure, the resume loop takes a
fake runner, and the remote and batch scripts run under bash with fake
`ift-jax`, `gsutil`, `srun` and `scontrol` on PATH.
"""

import contextlib
import importlib.util
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there.
    spec.loader.exec_module(module)
    return module


tpu = _load("tpu")
slurm = _load("slurm")

NASTY = ["x; rm -rf ~", "$(touch PWNED)", "it's \"quoted\" `touch PWNED`", "a\nb", "*"]
TPU = tpu.Tpu("t5-pod", "us-central2-b")
ZONE = "--zone=us-central2-b"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _job(**kw):
    fields = dict(kind="train", config="configs/flan_t5.py:size=base", workdir="gs://bkt/runs/a",
                  overrides=tuple(f"data.note{i}={v}" for i, v in enumerate(NASTY)))
    return tpu.Job(**{**fields, **kw})


def _launch(script, *args, **kw):
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True,
                          text=True, **kw)


def _contains(tokens, part):
    return any(tokens[i:i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


# Records its argv and distributed env; with $FAKE_OUT/wait present, runs until SIGTERM
# (then exits 0, as ift-jax does after saving a checkpoint). Like ift-jax it writes the
# workdir's summary.json (gs:// paths land in $FAKE_GCS): finished unless stopped by a
# signal or $FAKE_FINISHED=false; a sweep writes sweep_summary.csv.
FAKE_IFT_JAX = """#!/bin/bash
out="$FAKE_OUT/proc-${IFT_JAX_PROCESS_ID:-x}"
printf '%s\\0' "$@" > "$out.argv"
printf '%s\\n' "$IFT_JAX_COORDINATOR" "$IFT_JAX_NUM_PROCESSES" "$IFT_JAX_PROCESS_ID" \\
  "$IFT_JAX_RUN_ID" > "$out.env"
workdir=; for a in "$@"; do case "$a" in --workdir=*) workdir="${a#--workdir=}" ;; esac; done
case "$workdir" in gs://*) workdir="$FAKE_GCS/${workdir#gs://}" ;; esac
summary() {  # summary FINISHED
  [ -n "$workdir" ] || return 0
  mkdir -p "$workdir"
  if [ "$1" = sweep ]; then  # One point; stopped if $FAKE_FINISHED=false.
    state=finished; [ "$FAKE_FINISHED" = false ] && state=stopped
    printf 'point,status\\nlr=1,%s\\n' "$state" > "$workdir/sweep_summary.csv"
  else printf '{"finished": %s, "step": 1}\\n' "$1" > "$workdir/summary.json"; fi
}
if [ "$1" = sweep ]; then  # Like `ift-jax sweep`: one training subprocess per point.
  IFT_JAX_PROCESS_ID=point "$0" train & wait; status=$?; summary sweep; exit $status
fi
if [ -e "$FAKE_OUT/wait" ]; then
  trap 'echo term >> "$out.term"; summary false; exit 0' TERM
  touch "$out.started"
  while :; do sleep 0.02; done
fi
summary "${FAKE_FINISHED:-true}"
exit "${FAKE_STATUS:-0}"
"""

FAKE_GSUTIL = """#!/bin/bash
[ "$1" = -q ] && shift
path() { echo "$FAKE_GCS/${1#gs://}"; }
case "$1" in
  cp) dst=$(path "$3"); mkdir -p "$(dirname "$dst")"
      if [ "$2" = - ]; then cat > "$dst"; else cp "$2" "$dst"; fi ;;
  rm) rm "$(path "$2")" ;;
  stat) [ -e "$(path "$2")" ] ;;
  cat) cat "$(path "$2")" ;;
esac
"""


def _argv_of(out, name="proc-x"):
    return (out / f"{name}.argv").read_text().split("\0")[:-1]


# --- TPU: exact commands -------------------------------------------------------------

@pytest.mark.parametrize("capacity,flag", [("spot", ["--spot"]),
                                           ("preemptible", ["--preemptible"]),
                                           ("on-demand", [])])
def test_create_command_asks_for_the_capacity(capacity, flag):
    machine = tpu.Machine("v4-32", "tpu-ubuntu2204-base", capacity)
    assert tpu.create_commands(TPU, machine) == [
        GCLOUD_TPU + ["create", "t5-pod", ZONE, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", *flag]]


def test_create_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    _write(tmp_path / "bin" / "gcloud", f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = _launch("tpu.py", "create", "--name=t5-pod", "--zone=us-central2-b",
                     "--accelerator_type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                     "--spot", "--project=my-project", "--dry_run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create t5-pod --zone=us-central2-b --project=my-project "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot"]
    assert not (tmp_path / "ran").exists()


def test_setup_from_git_installs_on_all_workers():
    (command,) = tpu.setup_commands(TPU, tpu.Source(git="https://github.com/o/ift_jax.git",
                                                    ref="v0.1"))
    assert command[:8] == GCLOUD_TPU + ["ssh", "t5-pod", ZONE, "--worker=all"]
    script = command[-1].removeprefix("--command=")
    steps = [shlex.split(step) for step in script.split(" && ")]
    assert ["git", "clone", "--quiet", "--", "https://github.com/o/ift_jax.git",
            "~/ift_jax_src"] in steps
    assert ["git", "-C", "~/ift_jax_src", "checkout", "--quiet", "v0.1", "--"] in steps
    assert ["python3", "-m", "uv", "pip", "install", "--quiet", "--python",
            "~/ift_jax_venv/bin/python", ".[tpu]"] in steps
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_setup_from_sdist_copies_it_to_every_worker(tmp_path):
    sdist = tmp_path / "ift_jax-0.1.0.tar.gz"
    sdist.write_bytes(b"")
    result = _launch("tpu.py", "setup", "--name=t5-pod", "--zone=us-central2-b",
                     f"--sdist={sdist}", "--dry_run")
    assert result.returncode == 0, result.stderr
    scp, ssh = map(shlex.split, result.stdout.splitlines())
    assert scp == GCLOUD_TPU + ["scp", str(sdist), "t5-pod:/tmp/ift_jax_sdist.tar.gz", ZONE,
                                "--worker=all"]
    assert ssh[:8] == GCLOUD_TPU + ["ssh", "t5-pod", ZONE, "--worker=all"]
    assert "tar -xzf /tmp/ift_jax_sdist.tar.gz" in ssh[-1]
    subprocess.run(["bash", "-n", "-c", ssh[-1].removeprefix("--command=")], check=True)


def test_setup_by_default_packs_this_checkout_and_the_archive_installs(tmp_path):
    result = _launch("tpu.py", "setup", "--name=t5-pod", "--zone=us-central2-b", "--dry_run")
    assert result.returncode == 0, result.stderr
    pack, scp, ssh = map(shlex.split, result.stdout.splitlines())
    repo = os.path.dirname(os.path.dirname(os.path.abspath(tpu.__file__)))
    assert pack == ["git", "-C", repo, "archive", "--format=tar.gz", "--prefix=ift_jax/",
                    f"--output={tpu.CHECKOUT_ARCHIVE}", "HEAD"]
    assert scp == GCLOUD_TPU + ["scp", tpu.CHECKOUT_ARCHIVE, "t5-pod:/tmp/ift_jax_sdist.tar.gz",
                                ZONE, "--worker=all"]
    assert "tar -xzf /tmp/ift_jax_sdist.tar.gz" in ssh[-1]
    # What the workers unpack: the committed tree, configs/ and setup.py at its top.
    archive = tmp_path / "checkout.tar.gz"
    subprocess.run([*pack[:-2], f"--output={archive}", "HEAD"], check=True)
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert {"ift_jax/setup.py", "ift_jax/configs/flan_t5.py", "ift_jax/launch/tpu.py"} <= set(
        listing)
    not_git = _launch("tpu.py", "setup", "--name=t5-pod", "--zone=us-central2-b",
                      f"--checkout={tmp_path}", "--dry_run")
    assert not_git.returncode == 2 and "is not a git checkout" in not_git.stderr
    both = _launch("tpu.py", "setup", "--name=t5-pod", "--zone=us-central2-b",
                   f"--checkout={repo}", "--git=https://example.com/ift_jax.git", "--dry_run")
    assert both.returncode == 2 and "give one of --checkout=DIR" in both.stderr


def test_train_dry_run_quotes_every_override_as_one_literal_argument():
    sets = [arg for i, v in enumerate(NASTY) for arg in ("--set", f"data.note{i}={v}")]
    result = _launch("tpu.py", "train", "--name=t5-pod", "--zone=us-central2-b",
                     "--config=configs/flan_t5.py:size=base", "--workdir=gs://bkt/runs/a", *sets,
                     "--env", "IFT_JAX_DATA_DIR=gs://bkt/my data", "--dry_run",
                     "--", "--extra=$(touch PWNED)")
    assert result.returncode == 0, result.stderr
    outer = shlex.split(result.stdout)  # The printed command, as the user's shell reads it ...
    assert outer[:9] == GCLOUD_TPU + ["ssh", "t5-pod", ZONE, "--worker=all",
                                      "--ssh-flag=-oServerAliveInterval=60"]
    assert outer[9].startswith("--command=") and len(outer) == 10
    inner = shlex.split(outer[9].removeprefix("--command="))  # ... and the worker's shell.
    expected = ["env", "IFT_JAX_DISTRIBUTED=auto", "IFT_JAX_RUN_ID=tpu-t5-pod",
                "IFT_JAX_DATA_DIR=gs://bkt/my data",
                "~/ift_jax_venv/bin/ift-jax",
                "train", "--config=configs/flan_t5.py:size=base", "--workdir=gs://bkt/runs/a",
                *[f"--config.data.note{i}={v}" for i, v in enumerate(NASTY)],
                "--extra=$(touch PWNED)", ">>"]
    assert _contains(inner, expected)


def test_sweep_runs_ift_jax_sweep_on_all_workers():
    (command,) = tpu.job_commands(TPU, _job(kind="sweep", config="configs/sweeps/lora.py",
                                            workdir="gs://bkt/sweeps/lora", overrides=()))
    assert "--worker=all" in command
    inner = shlex.split(command[-1].removeprefix("--command="))
    assert _contains(inner, ["~/ift_jax_venv/bin/ift-jax", "sweep",
                             "--config=configs/sweeps/lora.py", "--workdir=gs://bkt/sweeps/lora",
                             ">>"])
    assert "marker=gs://bkt/sweeps/lora/sweep_done;" in inner


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="T5-pod"), "TPU name"), (dict(name="a;b"), "TPU name"),
    (dict(zone="us-central2-b; id"), "zone"), (dict(workdir="/tmp/run"), "gs://"),
    (dict(overrides=("train steps=1",)), "KEY=VALUE"), (dict(env=("A B=1",)), "NAME=VALUE"),
])
def test_invalid_values_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpu.Tpu(kwargs.pop("name", "t5-pod"), kwargs.pop("zone", "us-central2-b"))
        _job(**kwargs)


def test_cli_reports_an_invalid_name_with_exit_status_2():
    result = _launch("tpu.py", "delete", "--name=bad name", "--zone=us-central2-b", "--dry_run")
    assert result.returncode == 2 and "invalid TPU name" in result.stderr
    assert result.stdout == ""


# --- TPU: the remote wrapper, run under bash ------------------------------------------

@pytest.fixture
def worker(tmp_path):
    """A fake worker: HOME with the venv's ift-jax, gsutil over a local folder."""
    home, out, gcs = tmp_path / "home", tmp_path / "out", tmp_path / "gcs"
    for folder in (home / "ift_jax_src", out, gcs):
        folder.mkdir(parents=True)
    _write(home / "ift_jax_venv" / "bin" / "ift-jax", FAKE_IFT_JAX)
    _write(tmp_path / "bin" / "gsutil", FAKE_GSUTIL)
    _write(tmp_path / "bin" / "hostname", "#!/bin/sh\necho worker-0\n")
    env = {"HOME": str(home), "FAKE_OUT": str(out), "FAKE_GCS": str(gcs),
           "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    return env, out, gcs


@contextlib.contextmanager
def _running(argv, env, cwd):
    """Popen in a new session; on exit, kills whatever is left of that session."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
            try:  # Fields after "(comm)": state, ppid, pgrp, session, ...
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
                if session == proc.pid:
                    os.kill(int(stat.parent.name), signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                pass
        proc.wait()


def _wrapper(script, env):
    return _running(["bash", "-c", script], env, env["HOME"])


def _wait_for(path, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("status", [0, 3])
def test_worker_runs_the_argv_literally_and_marks_done_only_on_success(worker, status):
    env, out, gcs = worker
    job = _job()
    with _wrapper(tpu.job_script(job), {**env, "FAKE_STATUS": str(status)}) as proc:
        assert proc.wait(timeout=10) == status
    assert _argv_of(out) == job.argv()
    assert not list(pathlib.Path(env["HOME"]).rglob("PWNED"))
    assert (gcs / "bkt/runs/a/logs/train-worker-0.log").exists()
    assert (gcs / "bkt/runs/a/train_done").exists() == (status == 0)


def test_worker_exit_0_without_a_finished_summary_is_not_done(worker):
    env, out, gcs = worker
    # ift-jax stopped by a SIGTERM sent to it alone: exit 0, summary.json finished false.
    with _wrapper(tpu.job_script(_job()), {**env, "FAKE_FINISHED": "false"}) as proc:
        assert proc.wait(timeout=10) == 75
    assert (gcs / "bkt/runs/a/summary.json").exists()
    assert not (gcs / "bkt/runs/a/train_done").exists()
    # The run is resumed and finishes: now it is done.
    with _wrapper(tpu.job_script(_job()), env) as proc:
        assert proc.wait(timeout=10) == 0
    assert (gcs / "bkt/runs/a/train_done").exists()


@pytest.mark.parametrize("finished, status", [("true", 0), ("false", 75)])
def test_worker_marks_a_sweep_done_only_when_every_point_finished(worker, finished, status):
    env, out, gcs = worker
    with _wrapper(tpu.job_script(_job(kind="sweep", overrides=())),
                  {**env, "FAKE_FINISHED": finished}) as proc:
        assert proc.wait(timeout=10) == status
    assert (gcs / "bkt/runs/a/sweep_summary.csv").exists()
    assert (gcs / "bkt/runs/a/sweep_done").exists() == (status == 0)


def test_worker_signalled_mid_run_is_not_done_though_ift_jax_exits_0(worker):
    env, out, gcs = worker
    (gcs / "bkt/runs/a").mkdir(parents=True)
    (gcs / "bkt/runs/a/train_done").write_text("stale")  # A started run is not done.
    (out / "wait").touch()
    with _wrapper(tpu.job_script(_job()), env) as proc:
        _wait_for(out / "proc-x.started")
        assert not (gcs / "bkt/runs/a/train_done").exists()
        proc.send_signal(signal.SIGTERM)  # As at preemption.
        assert proc.wait(timeout=10) == 143
    assert (out / "proc-x.term").read_text() == "term\n"
    assert not (gcs / "bkt/runs/a/train_done").exists()


def test_worker_signal_reaches_the_training_a_sweep_started_and_is_waited_for(worker):
    env, out, gcs = worker
    (out / "wait").touch()
    with _wrapper(tpu.job_script(_job(kind="sweep", overrides=())), env) as proc:
        _wait_for(out / "proc-point.started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    assert (out / "proc-point.term").read_text() == "term\n"  # Saved before the wrapper left.
    assert not (gcs / "bkt/runs/a/sweep_done").exists()


def test_worker_stops_a_run_left_by_an_earlier_launch_before_starting(worker):
    env, out, gcs = worker
    (out / "wait").touch()
    with _wrapper(tpu.job_script(_job()), env) as first:
        _wait_for(out / "proc-x.started")
        (out / "wait").unlink()
        with _wrapper(tpu.job_script(_job()), env) as second:
            assert second.wait(timeout=10) == 0
        assert first.wait(timeout=10) == 143
    assert (out / "proc-x.term").read_text() == "term\n"  # The first one checkpointed.
    assert (gcs / "bkt/runs/a/train_done").exists()  # Written by the second only.


# --- TPU: resume loop with canned gcloud answers ---------------------------------------

class FakeCloud:
    """Answers the loop's commands: describe states in turn, done after N train runs."""

    def __init__(self, states, done_after=1, create_ok=()):
        self.states, self.done_after, self.create_ok = list(states), done_after, list(create_ok)
        self.calls, self.labels, self.trains = [], [], 0

    def __call__(self, argv, capture):
        self.calls.append(list(argv))
        label = self._label(argv)
        self.labels.append(label)
        if label == "stat":
            return (0 if self.trains >= self.done_after else 1), ""
        if label == "describe":
            state = self.states.pop(0)
            return (1, "") if state is None else (0, state + "\n")
        if label == "create":
            return (0 if not self.create_ok or self.create_ok.pop(0) else 1), ""
        if label == "train":
            self.trains += 1
        return 0, ""

    @staticmethod
    def _label(argv):
        if argv[0] == "gsutil":
            return "stat"
        if argv[4] == "ssh":
            return "train" if "ift-jax train" in argv[-1] else "setup"
        return argv[4]


def _loop(cloud, **kw):
    sleeps = []
    status = tpu.resume_loop(TPU, tpu.Machine("v4-32", "tpu-ubuntu2204-base", "spot"),
                             tpu.Source(git="https://github.com/o/ift_jax.git"), _job(),
                             run=cloud, sleep=sleeps.append, **kw)
    return status, sleeps


def test_resume_loop_recreates_a_preempted_tpu_then_sets_up_and_trains():
    cloud = FakeCloud(["PREEMPTED"])
    status, sleeps = _loop(cloud)
    assert status == 0 and sleeps == []
    assert cloud.labels == ["stat", "describe", "delete", "create", "setup", "train", "stat"]
    assert cloud.calls[2] == GCLOUD_TPU + ["delete", "t5-pod", ZONE, "--quiet"]
    assert cloud.calls[3][-1] == "--spot"
    assert cloud.calls[6] == ["gsutil", "-q", "stat", "gs://bkt/runs/a/train_done"]


def test_resume_loop_goes_on_after_a_preemption_mid_training():
    cloud = FakeCloud(["READY", "PREEMPTED", None], done_after=3)
    status, sleeps = _loop(cloud, retry_wait=5)
    assert status == 0 and sleeps == [5, 5]
    assert cloud.labels == ["stat",
                            "describe", "setup", "train", "stat",
                            "describe", "delete", "create", "setup", "train", "stat",
                            "describe", "create", "setup", "train", "stat"]


def test_resume_loop_stops_after_max_attempts():
    cloud = FakeCloud(["READY"] * 3, done_after=99)
    status, sleeps = _loop(cloud, max_attempts=3, retry_wait=1, setup_first=False)
    assert status == 1 and sleeps == [1, 1]
    assert cloud.labels.count("train") == 3 and "setup" not in cloud.labels


def test_resume_loop_retries_when_no_capacity_and_skips_setup_and_train():
    cloud = FakeCloud([None, None], create_ok=[False, True])
    status, _ = _loop(cloud)
    assert status == 0
    assert cloud.labels == ["stat", "describe", "create", "stat",
                            "describe", "create", "setup", "train", "stat"]


def test_resume_loop_does_nothing_when_already_done():
    cloud = FakeCloud([], done_after=0)
    assert _loop(cloud) == (0, [])
    assert cloud.labels == ["stat"]


def test_resume_loop_dry_run_lists_its_commands():
    result = _launch("tpu.py", "resume-loop", "--name=t5-pod", "--zone=us-central2-b",
                     "--accelerator_type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
                     "--git=https://github.com/o/ift_jax.git", "--config=configs/flan_t5.py",
                     "--workdir=gs://bkt/runs/a", "--max_attempts=4", "--dry_run")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()
                if not line.startswith("#")]
    assert [c[:5] for c in commands] == [
        ["gsutil", "-q", "stat", "gs://bkt/runs/a/train_done"],
        GCLOUD_TPU + ["describe"], GCLOUD_TPU + ["delete"], GCLOUD_TPU + ["create"],
        GCLOUD_TPU + ["ssh"], GCLOUD_TPU + ["ssh"]]
    assert "up to 4 attempts" in result.stdout


# --- SLURM ---------------------------------------------------------------------------

def _slurm_job(**kw):
    fields = dict(config="configs/flan_t5.py:size=base", workdir="/shared/runs/my run", nodes=2,
                  gpus_per_node=4, time="1-00:00:00", partition="gpu", port=23456,
                  overrides=tuple(f"data.note{i}={v}" for i, v in enumerate(NASTY)),
                  extra=("--extra=$(touch PWNED)",))
    return slurm.SlurmJob(**{**fields, **kw})


def test_sbatch_script_asks_one_task_per_node_and_a_signal_before_the_limit(tmp_path):
    script = slurm.sbatch_script(_slurm_job(account="proj", cpus_per_task=16))
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=ift-jax", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --time=1-00:00:00", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj", "#SBATCH --cpus-per-task=16", "#SBATCH --output=%x-%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120"]
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


@pytest.fixture
def cluster(tmp_path):
    """Fake SLURM: srun starts one task per node with its SLURM_PROCID."""
    out = tmp_path / "out"
    out.mkdir()
    _write(tmp_path / "bin" / "ift-jax", FAKE_IFT_JAX)
    _write(tmp_path / "bin" / "scontrol", """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo node07; echo node08;
else echo "$*" >> "$FAKE_OUT/scontrol"; fi
""")
    _write(tmp_path / "bin" / "srun", """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
trap 'kill -TERM "${pids[@]}"' TERM
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do wait "$p"; done; done
""")
    env = {"FAKE_OUT": str(out), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[07-08]"}
    return tmp_path, env, out


def test_sbatch_script_gives_each_node_its_process_id_and_the_literal_argv(cluster):
    tmp_path, env, out = cluster
    job = _slurm_job(port=None, workdir=str(tmp_path / "runs" / "my run"))
    (tmp_path / "job.sbatch").write_text(slurm.sbatch_script(job))
    subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path, check=True,
                   capture_output=True)
    for process in (0, 1):
        coordinator, count, process_id, run_id = (
            out / f"proc-{process}.env").read_text().split("\n")[:4]
        assert (coordinator, count, process_id) == ("node07:24242", "2", str(process))
        assert run_id == "slurm-4242"  # The same across requeues: the run lock's owner.
        assert _argv_of(out, f"proc-{process}") == job.train_argv()[1:]
    assert not list(tmp_path.rglob("PWNED")) and not (out / "scontrol").exists()


@pytest.mark.parametrize("finished, status, requeued", [("true", 0, False), ("false", 75, True)])
def test_sbatch_script_completes_only_a_finished_run(cluster, finished, status, requeued):
    tmp_path, env, out = cluster
    job = _slurm_job(workdir=str(tmp_path / "run"))
    (tmp_path / "job.sbatch").write_text(slurm.sbatch_script(job))
    # Tasks that exit 0 unfinished: a SIGTERM reached them but not the batch shell.
    result = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path,
                            env={**env, "FAKE_FINISHED": finished}, capture_output=True,
                            text=True)
    assert result.returncode == status, result.stderr
    assert (out / "scontrol").exists() == requeued
    if requeued:
        assert "does not say it finished" in result.stderr


@pytest.mark.parametrize("restarts,requeued", [("0", True), ("20", False)])
def test_sbatch_script_on_sigterm_checkpoints_and_requeues(cluster, restarts, requeued):
    tmp_path, env, out = cluster
    (tmp_path / "job.sbatch").write_text(slurm.sbatch_script(_slurm_job()))
    (out / "wait").touch()
    with _running(["bash", str(tmp_path / "job.sbatch")],
                  {**env, "SLURM_RESTART_COUNT": restarts}, tmp_path) as proc:
        _wait_for(out / "proc-0.started")
        _wait_for(out / "proc-1.started")
        proc.send_signal(signal.SIGTERM)  # What --signal=B:TERM@120 sends the batch shell.
        assert proc.wait(timeout=10) == 0
    assert (out / "proc-0.term").exists() and (out / "proc-1.term").exists()
    assert (out / "scontrol").exists() == requeued
    if requeued:
        assert (out / "scontrol").read_text() == "requeue 4242\n"


def test_slurm_dry_run_writes_nothing_and_its_output_reproduces_the_submission(tmp_path):
    args = ["--config=configs/flan_t5.py:size=base", "--workdir=/shared/runs/a", "--nodes=2",
            "--gpus_per_node=8", "--time=24:00:00", "--partition=gpu", "--port=23456",
            "--set", f"data.note={NASTY[2]}", "--script=run.sbatch", "--dry_run"]
    result = _launch("slurm.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    _write(tmp_path / "bin" / "sbatch", '#!/bin/sh\necho "$@" > sbatch_args\n')
    subprocess.run(["bash", "-c", result.stdout], cwd=tmp_path, check=True,
                   env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
    expected = slurm.sbatch_script(slurm.SlurmJob(
        config="configs/flan_t5.py:size=base", workdir="/shared/runs/a", nodes=2, gpus_per_node=8,
        time="24:00:00", partition="gpu", port=23456, overrides=(f"data.note={NASTY[2]}",)))
    assert (tmp_path / "run.sbatch").read_text() == expected
    assert (tmp_path / "sbatch_args").read_text() == "run.sbatch\n"


@pytest.mark.parametrize("kwargs,message", [
    (dict(time="1h; id"), "time limit"), (dict(partition="gpu\n#SBATCH --x"), "partition"),
    (dict(job_name="a b"), "job name"), (dict(nodes=0), "--nodes"),
    (dict(overrides=("a-b=1",)), "KEY=VALUE"),
])
def test_slurm_rejects_values_that_would_break_the_script(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _slurm_job(**kwargs)
