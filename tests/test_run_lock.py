"""One writer per workdir: two real processes, a killed holder, holders on other hosts."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ift_jax import errors, run_lock

# Holds the lock of argv[1] until killed (or until argv[2] appears), printing "held".
HOLDER = """
import os, sys, time
from ift_jax import run_lock
with run_lock.hold(sys.argv[1], process_index=0, heartbeat_s=0.05):
    print("held", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
"""


def _start_holder(workdir, stop_file):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(stop_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n", proc.stderr.read()
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    workdir, stop = tmp_path / "run", tmp_path / "stop"
    first = _start_holder(workdir, stop)
    try:
        second = subprocess.run(
            [sys.executable, "-c", HOLDER, str(workdir), str(stop)], capture_output=True,
            text=True, timeout=60)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("ift_jax.errors.WorkdirInUseError: workdir ")
        assert (f"is in use by another ift-jax run: host {socket.gethostname()}, pid "
                f"{first.pid}, since ") in last and "use another --workdir" in last
        assert (f"lock file {workdir / run_lock.LOCK_FILE} (workdir "
                f"{os.path.realpath(workdir)})") in last
    finally:
        stop.touch()
        assert first.wait(timeout=60) == 0
    assert not (workdir / run_lock.LOCK_FILE).exists()  # Released on the way out.
    with run_lock.hold(str(workdir), process_index=0):  # Free again.
        pass


def test_a_copy_of_a_live_run_is_not_locked_by_the_original(tmp_path, caplog):
    workdir, stop = tmp_path / "run", tmp_path / "stop"
    first = _start_holder(workdir, stop)
    try:
        copy = tmp_path / "branch"
        subprocess.run(["cp", "-a", str(workdir), str(copy)], check=True)  # The lock comes too.
        assert json.loads((copy / run_lock.LOCK_FILE).read_text())["pid"] == first.pid
        assert run_lock.live_holder(str(copy)) is None
        with run_lock.hold(str(copy), process_index=0) as lock:
            assert lock.read().pid == os.getpid()
            assert lock.read().workdir == os.path.realpath(copy)
        assert (f"lock file {copy / run_lock.LOCK_FILE} was taken for "
                f"{os.path.realpath(workdir)} by host {socket.gethostname()}, pid "
                f"{first.pid}") in caplog.text
        with pytest.raises(errors.WorkdirInUseError, match=f"pid {first.pid}"):
            run_lock.RunLock(str(workdir)).acquire()  # The original is still locked.
    finally:
        stop.touch()
        assert first.wait(timeout=60) == 0


def test_another_host_sees_the_same_folder_through_another_mount(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    inode = os.stat(workdir).st_ino
    _plant(workdir, workdir="/mnt/elsewhere/run", workdir_inode=inode)
    with pytest.raises(errors.WorkdirInUseError, match="workdir /mnt/elsewhere/run"):
        run_lock.RunLock(str(workdir)).acquire()
    _plant(workdir, workdir="/mnt/elsewhere/run", workdir_inode=inode + 1)  # A copy there.
    with run_lock.hold(str(workdir), process_index=0):
        pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    workdir = tmp_path / "run"
    holder = _start_holder(workdir, tmp_path / "never")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    left = json.loads((workdir / run_lock.LOCK_FILE).read_text())
    assert left["pid"] == holder.pid  # The killed process could not clean up.
    with run_lock.hold(str(workdir), process_index=0) as lock:
        assert lock.read().pid == os.getpid()
    assert "taking over the run lock of a process that is gone" in caplog.text
    assert f"pid {holder.pid}" in caplog.text


def _plant(folder, **fields):
    """A lock file as another process would have left it."""
    now = time.time()
    holder = run_lock.Holder(**{**dict(host="other-host", pid=4242, since=now - 600,
                                       heartbeat=now, token="t0", run_id=""), **fields})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run_lock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))


def test_a_holder_on_another_host_is_alive_while_its_heartbeat_is_fresh(tmp_path):
    workdir = tmp_path / "run"
    _plant(workdir, heartbeat=time.time() - 5)
    with pytest.raises(errors.WorkdirInUseError, match=r"host other-host, pid 4242, since .* "
                                                       r"\(heartbeat [56] s ago\)"):
        run_lock.RunLock(str(workdir), stale_after_s=120).acquire()
    _plant(workdir, heartbeat=time.time() - 300)
    lock = run_lock.RunLock(str(workdir), stale_after_s=120)
    lock.acquire()
    assert lock.read().host == socket.gethostname()
    lock.release()


def test_the_same_run_id_takes_over_its_earlier_incarnation_on_another_host(tmp_path):
    workdir = tmp_path / "run"
    _plant(workdir, run_id="slurm-4242")
    with pytest.raises(errors.WorkdirInUseError):
        run_lock.RunLock(str(workdir), run_id="slurm-9999").acquire()
    lock = run_lock.RunLock(str(workdir), run_id="slurm-4242")
    lock.acquire()
    assert lock.read().run_id == "slurm-4242"
    lock.release()


def test_a_reused_pid_on_this_host_is_not_the_holder(tmp_path):
    workdir = tmp_path / "run"
    # Our own pid, but another start time: the process that took the lock is gone.
    _plant(workdir, host=socket.gethostname(), pid=os.getpid(),
           pid_start=run_lock._pid_start(os.getpid()) - 1)
    with run_lock.hold(str(workdir), process_index=0):
        pass
    _plant(workdir, host=socket.gethostname(), pid=os.getpid(),
           pid_start=run_lock._pid_start(os.getpid()))
    with pytest.raises(errors.WorkdirInUseError, match=f"pid {os.getpid()}"):
        run_lock.RunLock(str(workdir)).acquire()


def test_the_heartbeat_moves_and_a_lost_lock_is_noticed(tmp_path):
    lock = run_lock.RunLock(str(tmp_path / "run"), heartbeat_s=0.02)
    lock.acquire()
    first = lock.read().heartbeat
    deadline = time.time() + 10
    while lock.read().heartbeat == first:
        assert time.time() < deadline, "the heartbeat never moved"
        time.sleep(0.01)
    while not lock.lost:  # Taken over behind our back (again, should a beat overwrite it).
        _plant(tmp_path / "run", token="someone-else")
        assert time.time() < deadline, "losing the lock went unnoticed"
        time.sleep(0.01)
    lock.release()
    assert lock.read().token == "someone-else"  # Not ours to remove.


def test_only_process_0_of_a_multi_host_run_takes_the_lock(tmp_path):
    with run_lock.hold(str(tmp_path / "run"), process_index=1) as lock:
        assert lock is None and not (tmp_path / "run" / run_lock.LOCK_FILE).exists()


def test_without_an_atomic_create_the_lock_is_written_then_read_back(tmp_path):
    # What a gs:// workdir gets (no O_EXCL there), exercised on a local path.
    lock = run_lock.RunLock(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    mine = run_lock.Holder("h", 1, 0.0, 0.0, "mine")
    assert lock._create_by_write(mine)
    assert not lock._create_by_write(dataclasses.replace(mine, token="theirs"))
    assert lock.read().token == "mine"


def test_an_unreadable_lock_is_taken_over_only_once_it_stays_unreadable(tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / run_lock.LOCK_FILE).write_text('{"host": "half-writ')  # A crash mid-write.
    lock = run_lock.RunLock(str(workdir))
    assert lock.read() is None and (workdir / run_lock.LOCK_FILE).exists()  # Reading keeps it.
    lock.acquire()
    assert lock.read().pid == os.getpid()
    assert "unreadable run lock" in caplog.text
    lock.release()
