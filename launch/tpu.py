"""Cloud TPU VMs and pod slices: create, install, train or sweep on every worker, resume.

    python launch/tpu.py create --name=t5-pod --zone=us-central2-b \
        --accelerator_type=v4-32 --version=tpu-ubuntu2204-base --spot
    python launch/tpu.py setup --name=t5-pod --zone=us-central2-b
    python launch/tpu.py train --name=t5-pod --zone=us-central2-b \
        --config=configs/flan_t5.py:size=base --workdir=gs://my-bucket/runs/base \
        --set train.steps=20000

Every worker of the slice runs the same `ift-jax` command (`gcloud ... ssh
--worker=all`); JAX's multi-controller runtime joins them. The workdir is a
`gs://` path: workers share it, and it outlives a preempted or deleted TPU,
so a new run in it resumes from the latest checkpoint.

On each worker, `setup` puts the source tree in ~/ift_jax_src (configs are
found relative to it, as in a checkout) and installs it with the `tpu` extra
into ~/ift_jax_venv (Python from uv, since TPU images may ship an older one).
Where the source comes from is a setting: by default the git checkout this
script is in (`--checkout=DIR` for another), packed with `git archive` (its
committed HEAD) and copied to every worker; or `--sdist=FILE.tar.gz` (one you
built), or `--git=URL [--ref=REF]` for the workers to clone.
`train`/`sweep` run there, logging to ~/ift_jax_logs/<job>.log (copied to
WORKDIR/logs/ at the end); a clean finish writes WORKDIR/<job>_done, which is
what `resume-loop` waits for. ift-jax saves and exits 0 on SIGTERM, so exit 0
alone does not mean done: the remote wrapper writes the marker only when no
signal reached it and the workdir says the run finished (`summary.json` with
`"finished": true`; for a sweep, every point `finished` in `sweep_summary.csv`).

`--dry_run` prints the commands (one per line, copy-pasteable) and runs nothing.
User values are never pasted into shell text unquoted: remote commands are
built with `shlex.join` and passed to gcloud as one argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import commands  # noqa: E402  (launch/ is a folder of scripts, not a package)

SRC = "~/ift_jax_src"
VENV = "~/ift_jax_venv"
LOGS = "~/ift_jax_logs"
REMOTE_SDIST = "/tmp/ift_jax_sdist.tar.gz"
# The default source: the checkout this script is in, packed here before it is copied.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKOUT_ARCHIVE = os.path.join(tempfile.gettempdir(), "ift_jax_checkout.tar.gz")
# Long quiet trainings: keep the ssh session from being dropped as idle.
KEEPALIVE = "--ssh-flag=-oServerAliveInterval=60"

_NAME = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
_ZONE = r"[a-z]+-[a-z]+[0-9]+-[a-z]"
_PROJECT = r"([a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]"
_ACCELERATOR = r"v[0-9]+[a-z]*-[0-9]+"
_VERSION = r"[a-z0-9][-a-z0-9._]*"
_WORKDIR = r"gs://[a-z0-9][-a-z0-9._]{1,220}[a-z0-9](/[^\n]*)?"
_GIT_URL = r"(https?|ssh|git|file)://\S+|[\w.-]+@[\w.-]+:\S+"
_GIT_REF = r"[\w][\w./-]*"


@dataclasses.dataclass(frozen=True)
class Tpu:
    """Which TPU VM (or pod slice) the commands address."""
    name: str
    zone: str
    project: Optional[str] = None

    def __post_init__(self):
        commands.check(self.name, _NAME, "TPU name (lowercase letters, digits, '-')", "t5-pod")
        commands.check(self.zone, _ZONE, "zone", "us-central2-b")
        if self.project is not None:
            commands.check(self.project, _PROJECT, "project", "my-project")

    def gcloud(self, verb: str, *args: str) -> list[str]:
        project = [f"--project={self.project}"] if self.project else []
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, f"--zone={self.zone}",
                *project, *args]

    def ssh(self, script: str, worker: str = "all", *args: str) -> list[str]:
        return self.gcloud("ssh", f"--worker={worker}", *args, f"--command={script}")

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        command = self.gcloud("scp", "--worker=all")
        command[5:6] = [local, f"{self.name}:{remote}"]  # scp takes SRC DEST, not a name.
        return command


@dataclasses.dataclass(frozen=True)
class Machine:
    """What `create` asks for; capacity is on-demand, spot or preemptible."""
    accelerator_type: str
    version: str
    capacity: str = "on-demand"

    def __post_init__(self):
        commands.check(self.accelerator_type, _ACCELERATOR, "accelerator type", "v4-32")
        commands.check(self.version, _VERSION, "runtime version", "tpu-ubuntu2204-base")
        commands.check(self.capacity, "on-demand|spot|preemptible", "capacity", "spot")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where workers get ift_jax: a local git checkout (by default this one) packed and
    copied to them, a local sdist copied to them, or a git URL (and ref) they clone."""
    git: Optional[str] = None
    ref: Optional[str] = None
    sdist: Optional[str] = None
    python_version: str = "3.12"
    checkout: Optional[str] = None

    def __post_init__(self):
        if sum(x is not None for x in (self.git, self.sdist, self.checkout)) > 1:
            raise ValueError("give one of --checkout=DIR (a local git checkout, packed and "
                             "copied; the default is this one), --sdist=FILE.tar.gz (copied "
                             "to every worker) or --git=URL (workers clone it)")
        if self.git is not None:
            commands.check(self.git, _GIT_URL, "git URL",
                           "https://github.com/your-account/ift_jax.git")
        if self.ref is not None:
            commands.check(self.ref, _GIT_REF, "git ref", "main")
        if self.sdist is not None and (not self.sdist.endswith(".tar.gz") or ":" in self.sdist):
            raise ValueError(f"--sdist {self.sdist!r}: expected a local .tar.gz (no ':', "
                             "which scp reads as HOST:PATH) from `python setup.py sdist`")
        commands.check(self.python_version, r"3\.[0-9]+", "Python version", "3.12")

    @property
    def local_checkout(self) -> Optional[str]:
        """The checkout to pack: `checkout`, or this script's when nothing else is given."""
        if self.git is None and self.sdist is None:
            return self.checkout or CHECKOUT
        return None

    @property
    def archive(self) -> Optional[str]:
        """The local .tar.gz copied to the workers (an sdist, or the packed checkout)."""
        return self.sdist or (CHECKOUT_ARCHIVE if self.local_checkout else None)


@dataclasses.dataclass(frozen=True)
class Job:
    """An `ift-jax train` or `ift-jax sweep` run in a gs:// workdir."""
    kind: str
    config: str
    workdir: str
    overrides: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        commands.check(self.kind, "train|sweep", "job", "train")
        if not self.config:
            raise ValueError("--config is required, e.g. --config=configs/flan_t5.py:size=base")
        commands.check(self.workdir, _WORKDIR, "workdir (TPU disks are lost on preemption and "
                       "not shared between workers: use a gs:// path)", "gs://my-bucket/runs/x")
        commands.env_assignments(self.env)
        commands.override_args(self.overrides)

    @property
    def root(self) -> str:
        return self.workdir.rstrip("/")

    @property
    def marker(self) -> str:
        return f"{self.root}/{self.kind}_done"

    def argv(self) -> list[str]:
        """The `ift-jax` arguments, each one a literal value."""
        return [self.kind, f"--config={self.config}", f"--workdir={self.workdir}",
                *commands.override_args(self.overrides), *self.extra]


def setup_script(source: Source) -> str:
    """Shell run on each worker: source tree in SRC, venv with ift_jax[tpu] in VENV."""
    q = shlex.quote
    if source.git:
        fetch = [f"git clone --quiet -- {q(source.git)} {SRC}"]
        if source.ref:
            fetch.append(f"git -C {SRC} checkout --quiet {q(source.ref)} --")
    else:
        fetch = [f"mkdir -p {SRC}",
                 f"tar -xzf {REMOTE_SDIST} -C {SRC} --strip-components=1"]
    return " && ".join([
        # Ubuntu 24.04 images refuse --user installs without the last flag.
        "{ python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install "
        "--user --quiet --upgrade --break-system-packages uv; }",
        f"rm -rf {SRC}",
        *fetch,
        f"python3 -m uv venv --quiet --clear --python {q(source.python_version)} {VENV}",
        f"cd {SRC}",
        f"python3 -m uv pip install --quiet --python {VENV}/bin/python '.[tpu]'",
        "echo \"$(hostname): ift_jax installed\"",
    ])


def job_script(job: Job, run_id: str = "") -> str:
    """Shell run on each worker: the ift-jax command under a wrapper that knows "done".

    The wrapper stops a job an earlier launch left running (its ssh dropped):
    SIGTERM makes it checkpoint, and this run resumes from there. A signal to
    the wrapper (preemption, hang-up) is passed on to ift-jax and means "not
    done", whatever the exit status; so does an exit 0 whose workdir does not
    say finished (ift-jax was stopped by a signal sent to it alone): the
    wrapper then exits 75 (EX_TEMPFAIL).

    Args:
      run_id: `IFT_JAX_RUN_ID` for the workdir's run lock (ift_jax.run_lock): a
        relaunch with the same id takes over the lock of an earlier incarnation
        on another host (a recreated TPU) at once instead of waiting for its
        heartbeat to go stale.
    """
    q = shlex.quote
    log, pidfile = f"{LOGS}/{job.kind}.log", f"{LOGS}/{job.kind}.pid"
    summary = f"{job.root}/{commands.FINISHED_FILES[job.kind]}"
    # Every worker joins the pod's jax.distributed runtime (ift_jax.distributed).
    run = (f"IFT_JAX_RUN_ID={run_id}",) if run_id else ()
    env = f"env {shlex.join(('IFT_JAX_DISTRIBUTED=auto', *run, *job.env))} "
    alive = f'grep -qsF {q(pidfile.removeprefix("~/"))} "/proc/$old/cmdline"'
    return "; ".join([
        f"mkdir -p {LOGS}",
        f"cd {SRC} || exit 1",
        f"marker={q(job.marker)}; logs={q(job.root + '/logs')}; summary={q(summary)}; "
        "host=$(hostname)",
        f"old=$(cat {pidfile} 2>/dev/null)",
        # Only a live wrapper has the pidfile's name in its command line; a
        # reused pid or an unreaped one (empty cmdline) does not.
        f'if [ -n "$old" ] && {alive} && kill -TERM "$old" 2>/dev/null; then '
        f'while {alive}; do sleep 0.5; done; fi',
        f"echo $$ > {pidfile}",
        'gsutil -q rm "$marker" 2>/dev/null',
        "stopped=; child=",
        # The job runs in its own process group (set -m), so a signal reaches
        # `ift-jax sweep` and the training it started.
        "trap 'stopped=1; [ -n \"$child\" ] && kill -TERM -- \"-$child\" 2>/dev/null' "
        "TERM HUP INT",
        "group_alive() { ps -e -o pgid=,stat= | awk -v g=\"$1\" "
        "'$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; }",
        f'echo "$host: ift-jax {job.kind} running, log in {log}"',
        f"set -m; {env}{VENV}/bin/ift-jax {shlex.join(job.argv())} >> {log} 2>&1 < /dev/null & "
        "child=$!; set +m",
        'status=0; wait "$child" || status=$?',
        # A trapped signal cuts `wait` short: wait again while the job runs.
        'while kill -0 "$child" 2>/dev/null; do status=0; wait "$child" || status=$?; done',
        'while group_alive "$child"; do sleep 0.5; done',
        # Signalled means not done, whatever ift-jax returned (it exits 0 after saving).
        '[ -z "$stopped" ] || status=143',
        # Exit 0 is done only if the workdir says so (a SIGTERM to ift-jax alone exits 0).
        f'if [ "$status" -eq 0 ] && ! {{ gsutil -q cat "$summary" 2>/dev/null | '
        f'{commands.finished_check(job.kind)}; }}; then '
        f'echo "$host: ift-jax {job.kind} exited 0 but $summary does not say it finished '
        f'(stopped early); not done" >&2; status=75; fi',
        f"rm -f {pidfile}",
        f'gsutil -q cp {log} "$logs/{job.kind}-$host.log"',
        'if [ "$status" -eq 0 ]; then echo done | gsutil -q cp - "$marker"; fi',
        f'echo "$host: ift-jax {job.kind} exited with status $status"',
        'exit "$status"',
    ])


def create_commands(tpu: Tpu, machine: Machine) -> list[list[str]]:
    capacity = {"spot": ["--spot"], "preemptible": ["--preemptible"]}.get(machine.capacity, [])
    return [tpu.gcloud("create", f"--accelerator-type={machine.accelerator_type}",
                       f"--version={machine.version}", *capacity)]


def pack_command(checkout: str) -> list[str]:
    """The checkout's committed HEAD as a .tar.gz (uncommitted changes are not in it)."""
    return ["git", "-C", checkout, "archive", "--format=tar.gz", "--prefix=ift_jax/",
            f"--output={CHECKOUT_ARCHIVE}", "HEAD"]


def setup_commands(tpu: Tpu, source: Source) -> list[list[str]]:
    pack = [pack_command(source.local_checkout)] if source.local_checkout else []
    copy = [tpu.scp_to_all(source.archive, REMOTE_SDIST)] if source.archive else []
    return pack + copy + [tpu.ssh(setup_script(source))]


def job_commands(tpu: Tpu, job: Job) -> list[list[str]]:
    return [tpu.ssh(job_script(job, run_id=f"tpu-{tpu.name}"), "all", KEEPALIVE)]


def describe_command(tpu: Tpu) -> list[str]:
    return tpu.gcloud("describe", "--format=value(state)")


def delete_commands(tpu: Tpu) -> list[list[str]]:
    return [tpu.gcloud("delete", "--quiet")]


def done_command(job: Job) -> list[str]:
    return ["gsutil", "-q", "stat", job.marker]


def logs_commands(tpu: Tpu, kind: str, worker: str, lines: int, follow: bool) -> list[list[str]]:
    commands.check(worker, r"all|[0-9]+", "worker", "0")
    tail = ["tail", f"--lines={int(lines)}"] + (["--follow=name", "--retry"] if follow else [])
    return [tpu.ssh(f"{shlex.join(tail)} {LOGS}/{kind}.log", worker)]


def resume_loop(tpu: Tpu, machine: Machine, source: Source, job: Job, *,
                run: commands.Runner = commands.run_command,
                sleep: Callable[[float], None] = time.sleep,
                max_attempts: int = 10, retry_wait: float = 60.0,
                setup_first: bool = True) -> int:
    """Runs `job` until its done marker exists, recreating the TPU when it is not READY.

    Each attempt: READY keeps the TPU; missing creates it; any other state
    (PREEMPTED, TERMINATED, STOPPED, REPAIRING, ...) deletes and recreates it.
    Setup runs after every (re)create and, if `setup_first`, before the first
    run; then the job runs on every worker and resumes from the workdir's
    latest checkpoint. Returns 0 once done, 1 after `max_attempts` without.
    """
    def ok(argv: Sequence[str]) -> bool:
        return run(argv, False)[0] == 0

    if max_attempts < 1:
        raise ValueError(f"--max_attempts must be at least 1, got {max_attempts}")
    if ok(done_command(job)):
        print(f"{job.marker} exists: {job.kind} is done (delete it to run again)")
        return 0
    needs_setup = setup_first
    for attempt in range(1, max_attempts + 1):
        status, out = run(describe_command(tpu), True)
        state = out.strip() if status == 0 and out.strip() else "MISSING"
        print(f"attempt {attempt}/{max_attempts}: TPU {tpu.name} is {state}", flush=True)
        ready = state == "READY"
        if not ready:
            if state != "MISSING":
                ok(delete_commands(tpu)[0])
            ready = commands.run_all(create_commands(tpu, machine), run) == 0
            needs_setup = True
        if ready and needs_setup:
            needs_setup = commands.run_all(setup_commands(tpu, source), run) != 0
            ready = not needs_setup
        if ready:
            commands.run_all(job_commands(tpu, job), run)
        if ok(done_command(job)):
            print(f"{job.kind} done after {attempt} attempt(s): {job.marker}")
            return 0
        if attempt < max_attempts:
            sleep(retry_wait)
    print(f"{job.kind} not done after {max_attempts} attempts; rerun resume-loop to go on "
          f"(it resumes from the latest checkpoint in {job.workdir})", file=sys.stderr)
    return 1


def resume_loop_plan(tpu: Tpu, machine: Machine, source: Source, job: Job,
                     max_attempts: int, retry_wait: float) -> list[str]:
    """What `resume-loop --dry_run` prints: its commands, the decisions as comments."""
    join = shlex.join
    return [
        f"# resume loop: up to {max_attempts} attempts, {retry_wait:g} s apart; "
        "it stops once this succeeds:",
        join(done_command(job)),
        "# each attempt: READY keeps the TPU, missing creates it, any other state "
        "(e.g. PREEMPTED) deletes and recreates it",
        join(describe_command(tpu)),
        *map(join, delete_commands(tpu)),
        *map(join, create_commands(tpu, machine)),
        "# after a (re)create, and before the first run unless --skip_setup:",
        *map(join, setup_commands(tpu, source)),
        *map(join, job_commands(tpu, job)),
    ]


def _parsers() -> argparse.ArgumentParser:
    tpu = argparse.ArgumentParser(add_help=False)
    tpu.add_argument("--name", required=True, help="TPU VM name, e.g. t5-pod")
    tpu.add_argument("--zone", required=True, help="e.g. us-central2-b")
    tpu.add_argument("--project", help="default: gcloud's core/project")
    tpu.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")

    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--accelerator_type", required=True,
                         help="e.g. v4-8, v4-32, v5litepod-16, v5p-32, v6e-8")
    machine.add_argument("--version", required=True, help="TPU runtime, e.g. "
                         "tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e), "
                         "v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)")
    capacity = machine.add_mutually_exclusive_group()
    capacity.add_argument("--spot", dest="capacity", action="store_const", const="spot",
                          default="on-demand", help="spot capacity (can be preempted)")
    capacity.add_argument("--preemptible", dest="capacity", action="store_const",
                          const="preemptible", help="preemptible capacity (older TPU types)")

    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--checkout", help="local git checkout whose committed HEAD is packed "
                        "and copied to every worker (default: the one this script is in)")
    source.add_argument("--sdist", help="or a local .tar.gz (python setup.py sdist) copied to "
                        "workers")
    source.add_argument("--git", help="or a repository URL every worker clones")
    source.add_argument("--ref", help="with --git: branch, tag or commit to check out")
    source.add_argument("--python_version", default="3.12", help="Python for the worker venv")

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--config", required=True, help="path relative to the repository root, "
                     "e.g. configs/flan_t5.py:size=base")
    job.add_argument("--workdir", required=True, help="gs://my-bucket/path")
    job.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="config override, repeatable: --config.KEY=VALUE")
    job.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment for ift-jax on the workers, repeatable")

    parser = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to ift-jax unchanged.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("create", parents=[tpu, machine], help="create the TPU VM or pod slice")
    sub.add_parser("setup", parents=[tpu, source], help="install ift_jax on every worker")
    for kind in ("train", "sweep"):
        sub.add_parser(kind, parents=[tpu, job], help=f"ift-jax {kind} on every worker")
    loop = sub.add_parser("resume-loop", parents=[tpu, machine, source, job],
                          help="create/setup/train until done, recreating preempted TPUs")
    loop.add_argument("--job", choices=("train", "sweep"), default="train")
    loop.add_argument("--max_attempts", type=int, default=10)
    loop.add_argument("--retry_wait", type=float, default=60.0, help="seconds between attempts")
    loop.add_argument("--skip_setup", action="store_true",
                      help="the TPU exists and is set up: no setup before the first run")
    logs = sub.add_parser("logs", parents=[tpu], help="tail a job's log on a worker")
    logs.add_argument("--job", choices=("train", "sweep"), default="train")
    logs.add_argument("--worker", default="0", help="worker index or 'all'")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    sub.add_parser("delete", parents=[tpu], help="delete the TPU VM")
    return parser


def _plan(args: argparse.Namespace, extra: Sequence[str]) -> list[list[str]]:
    """The commands of every action but resume-loop, from parsed flags."""
    tpu = Tpu(args.name, args.zone, args.project)
    if args.action == "create":
        return create_commands(tpu, Machine(args.accelerator_type, args.version, args.capacity))
    if args.action == "setup":
        return setup_commands(tpu, _source(args))
    if args.action in ("train", "sweep"):
        return job_commands(tpu, _job(args, args.action, extra))
    if args.action == "logs":
        return logs_commands(tpu, args.job, args.worker, args.lines, args.follow)
    return delete_commands(tpu)


def _source(args: argparse.Namespace) -> Source:
    source = Source(args.git, args.ref, args.sdist, args.python_version, args.checkout)
    if source.sdist and not os.path.isfile(source.sdist):
        raise ValueError(f"--sdist {source.sdist!r}: no such file (build it with "
                         "`python setup.py sdist`)")
    checkout = source.local_checkout
    if checkout and not os.path.exists(os.path.join(checkout, ".git")):
        raise ValueError(f"--checkout {checkout!r} is not a git checkout; give one, or "
                         f"--sdist=FILE.tar.gz or --git=URL")
    return source


def _job(args: argparse.Namespace, kind: str, extra: Sequence[str]) -> Job:
    return Job(kind, args.config, args.workdir, tuple(args.overrides), tuple(args.env),
               tuple(extra))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = _parsers().parse_args(argv)
    try:
        if args.action != "resume-loop":
            plan = _plan(args, extra)
            if args.dry_run:
                commands.print_commands(plan)
                return 0
            return commands.run_all(plan)
        if args.max_attempts < 1:
            raise ValueError(f"--max_attempts must be at least 1, got {args.max_attempts}")
        parts = (Tpu(args.name, args.zone, args.project),
                 Machine(args.accelerator_type, args.version, args.capacity),
                 _source(args), _job(args, args.job, extra))
        if args.dry_run:
            print("\n".join(resume_loop_plan(*parts, args.max_attempts, args.retry_wait)))
            return 0
        return resume_loop(*parts, max_attempts=args.max_attempts,
                           retry_wait=args.retry_wait, setup_first=not args.skip_setup)
    except ValueError as e:
        print(f"launch/tpu.py {args.action}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
