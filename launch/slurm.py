"""GPU clusters under SLURM: an sbatch script running `ift-jax train` on every node.

    python launch/slurm.py --config=configs/flan_t5.py:size=base --workdir=/shared/runs/base \
        --nodes=2 --gpus_per_node=8 --time=24:00:00 --partition=gpu --set train.steps=20000

writes ift-jax.sbatch and submits it with `sbatch`; `--dry_run` prints both
(as a heredoc and the sbatch line) instead.

One task per node (`srun --ntasks-per-node=1`), each one JAX process using
all of its node's GPUs. The batch script points them at each other through
ift_jax's variables: IFT_JAX_COORDINATOR is the first node of
`scontrol show hostnames $SLURM_JOB_NODELIST`, IFT_JAX_NUM_PROCESSES is
$SLURM_NNODES and each task sets IFT_JAX_PROCESS_ID=$SLURM_PROCID.

Before the time limit (`--signal=B:TERM@...`) or on preemption the script
passes SIGTERM to the tasks; ift-jax saves a checkpoint and exits 0, and the
script requeues the job (`scontrol requeue`, up to --max_requeues times), which
resumes from that checkpoint. The job ends with exit 0 (COMPLETED) only when
WORKDIR/summary.json says `"finished": true`: tasks that exit 0 without
finishing (a SIGTERM sent to them alone) requeue it too, and it exits 75. The
workdir must be on storage every node sees. `IFT_JAX_RUN_ID=slurm-<job id>`
(constant across requeues) lets a requeued job take over the workdir's run
lock (ift_jax.run_lock) from its own earlier incarnation on another node.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import commands  # noqa: E402  (launch/ is a folder of scripts, not a package)

HEREDOC_END = "IFT_JAX_SBATCH_END"
# Written into `#SBATCH` lines, which sbatch reads without a shell: no spaces or newlines.
_SBATCH_WORD = r"[A-Za-z0-9][A-Za-z0-9._,-]*"
_TIME = r"([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}"
_OUTPUT = r"[A-Za-z0-9._/%-]+"


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script says; paths and values are quoted when written."""
    config: str
    workdir: str
    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    cpus_per_task: Optional[int] = None
    job_name: str = "ift-jax"
    output: str = "%x-%j.out"
    signal_seconds: int = 120
    max_requeues: int = 20
    port: Optional[int] = None
    chdir: Optional[str] = None
    venv: Optional[str] = None
    modules: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.config or not self.workdir:
            raise ValueError("--config and --workdir are required, e.g. "
                             "--config=configs/flan_t5.py:size=base --workdir=/shared/runs/base")
        commands.check(self.job_name, _SBATCH_WORD, "job name", "ift-jax")
        commands.check(self.time, _TIME, "time limit", "1-00:00:00")
        commands.check(self.output, _OUTPUT, "output pattern", "logs/%x-%j.out")
        for value, what in ((self.partition, "partition"), (self.account, "account")):
            if value is not None:
                commands.check(value, _SBATCH_WORD, what, "gpu")
        for value, what in ((self.nodes, "--nodes"), (self.gpus_per_node, "--gpus_per_node"),
                            (self.cpus_per_task or 1, "--cpus_per_task"),
                            (self.signal_seconds, "--signal_seconds")):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        if self.max_requeues < 0:
            raise ValueError(f"--max_requeues must be 0 or more, got {self.max_requeues}")
        if self.port is not None and not 1024 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: expected 1024..65535")
        commands.env_assignments(self.env)
        commands.override_args(self.overrides)

    def train_argv(self) -> list[str]:
        return ["ift-jax", "train", f"--config={self.config}", f"--workdir={self.workdir}",
                *commands.override_args(self.overrides), *self.extra]


def _directives(job: SlurmJob) -> list[str]:
    options = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={job.gpus_per_node}", f"--time={job.time}"]
    options += [f"--partition={job.partition}"] if job.partition else []
    options += [f"--account={job.account}"] if job.account else []
    options += [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []
    options += [f"--output={job.output}", "--open-mode=append", "--requeue",
                f"--signal=B:TERM@{job.signal_seconds}"]
    return [f"#SBATCH {option}" for option in options]


def _environment(job: SlurmJob) -> list[str]:
    q = shlex.quote
    lines = [f"cd {q(job.chdir)}"] if job.chdir else []
    lines += [f"module load {q(module)}" for module in job.modules]
    if job.venv:
        lines.append(f'export PATH={q(os.path.join(job.venv, "bin"))}:"$PATH"')
    lines += [f"export {q(setting)}" for setting in job.env]
    return lines


def sbatch_script(job: SlurmJob) -> str:
    """The whole batch script (bash)."""
    port = str(job.port) if job.port else "$((20000 + SLURM_JOB_ID % 20000))"
    cpus = [f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []
    # The task's shell reads its own $SLURM_PROCID; the command comes in as "$@",
    # so its arguments are quoted once, here, and never re-parsed.
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *cpus,
            "bash", "-c", 'IFT_JAX_PROCESS_ID="$SLURM_PROCID" exec "$@"', "ift-jax",
            *job.train_argv()]
    lines = [
        "#!/bin/bash",
        f"# Written by launch/slurm.py: ift-jax train on {job.nodes} node(s) x "
        f"{job.gpus_per_node} GPU(s), one JAX process per node.",
        *_directives(job),
        "set -e",
        *_environment(job),
        "",
        "# Node 0 hosts the jax.distributed coordinator.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export IFT_JAX_COORDINATOR="$head_node:{port}"',
        'export IFT_JAX_NUM_PROCESSES="$SLURM_NNODES"',
        "# A requeued job is the same run: it may take over its own run lock.",
        'export IFT_JAX_RUN_ID="slurm-$SLURM_JOB_ID"',
        "",
        "# SIGTERM (time limit near, preemption) goes on to the tasks: ift-jax saves a",
        "# checkpoint and exits 0; the job is then requeued and resumes from it.",
        "stopping=0",
        "srun_pid=",
        "trap 'stopping=1; kill -TERM \"$srun_pid\" 2>/dev/null || true' TERM",
        f"{shlex.join(srun)} &",
        "srun_pid=$!",
        'status=0; wait "$srun_pid" || status=$?',
        'while kill -0 "$srun_pid" 2>/dev/null; do status=0; wait "$srun_pid" || status=$?; done',
        "",
        "# ift-jax exits 0 after SIGTERM too: the run is done only if summary.json says so.",
        f"summary={shlex.quote(job.workdir.rstrip('/') + '/summary.json')}",
        'read_summary() { case "$summary" in gs://*) gsutil -q cat "$summary" ;; '
        '*) cat "$summary" ;; esac; }',
        f'if [ "$stopping" = 0 ] && [ "$status" -eq 0 ] && ! {{ read_summary 2>/dev/null | '
        f'{commands.finished_check("train")}; }}; then',
        '  echo "ift-jax exited 0 but $summary does not say it finished (stopped early)" >&2',
        "  stopping=1; status=75",
        "fi",
        'if [ "$stopping" = 1 ]; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {job.max_requeues} ]; then',
        '    echo "requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  else",
        f'    echo "not requeueing: {job.max_requeues} requeues done (--max_requeues)" >&2',
        "  fi",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def submit_commands(script_path: str) -> list[list[str]]:
    return [["sbatch", script_path]]


def dry_run_text(job: SlurmJob, script_path: str) -> str:
    """A shell snippet that writes the script and submits it: what a real run does."""
    script = sbatch_script(job)
    if HEREDOC_END in script.splitlines():
        raise ValueError(f"a value is the line {HEREDOC_END!r}; it would end the heredoc")
    submit = "\n".join(shlex.join(argv) for argv in submit_commands(script_path))
    return (f"cat > {shlex.quote(script_path)} <<'{HEREDOC_END}'\n{script}{HEREDOC_END}\n"
            f"{submit}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to ift-jax train unchanged.")
    parser.add_argument("--config", required=True, help="e.g. configs/flan_t5.py:size=base")
    parser.add_argument("--workdir", required=True, help="on storage every node sees")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="exported before srun, repeatable")
    parser.add_argument("--nodes", type=_positive, default=1)
    parser.add_argument("--gpus_per_node", type=_positive, default=8)
    parser.add_argument("--cpus_per_task", type=_positive)
    parser.add_argument("--time", default="24:00:00", help="[D-]HH:MM:SS")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job_name", default="ift-jax")
    parser.add_argument("--output", default="%x-%j.out", help="sbatch --output pattern")
    parser.add_argument("--signal_seconds", type=_positive, default=120,
                        help="SIGTERM this long before the time limit")
    parser.add_argument("--max_requeues", type=int, default=20)
    parser.add_argument("--port", type=int,
                        help="coordinator port (default: 20000 + job id mod 20000)")
    parser.add_argument("--chdir", help="cd here first (a checkout: configs/ paths are "
                        "relative to it); default: the directory sbatch ran in")
    parser.add_argument("--venv", help="virtual environment with ift_jax[gpu] installed")
    parser.add_argument("--module", dest="modules", action="append", default=[],
                        help="`module load` this first, repeatable")
    parser.add_argument("--script", help="where to write the script (default: JOB_NAME.sbatch)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the script and the sbatch command, write and run nothing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = _parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("script", "dry_run")}
    for key in ("modules", "env", "overrides"):
        options[key] = tuple(options[key])
    try:
        job = SlurmJob(**options, extra=tuple(extra))
        script_path = args.script or f"{job.job_name}.sbatch"
        if args.dry_run:
            sys.stdout.write(dry_run_text(job, script_path))
            return 0
    except ValueError as e:
        print(f"launch/slurm.py: error: {e}", file=sys.stderr)
        return 2
    with open(script_path, "w") as f:
        f.write(sbatch_script(job))
    print(f"wrote {script_path}")
    return commands.run_all(submit_commands(script_path))


if __name__ == "__main__":
    sys.exit(main())
