"""What a benchmark ran on and under which conditions: machine, versions, load, peak RSS.

Every result JSON carries `describe()` so a figure can be read without the
machine at hand. Peak host memory is per process: `reset_peak_rss()` moves the
high-water mark (Linux `VmHWM`) down to the current resident set, so a worker
can report the peak of its training steps alone, not of its set-up.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Optional


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in fields.items()}


def _ram_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_smi() -> list[dict]:
    """Name, memory, driver and SM clocks of each NVIDIA GPU (empty without nvidia-smi)."""
    fields = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [dict(zip(fields.split(","), (v.strip() for v in line.split(","))))
            for line in out.strip().splitlines()]


def competing_processes(pattern: str = "pytest") -> list[str]:
    """Command lines of other processes matching `pattern` (`pgrep -af`), e.g. a test run."""
    try:
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    except OSError:
        return []
    me = {str(os.getpid()), str(os.getppid())}
    return [line for line in out.splitlines() if line.split(" ", 1)[0] not in me]


def load() -> dict:
    """Load average and competing test runs now: a loaded machine gives slower figures."""
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"loadavg_1m": loadavg[0], "cpus": os.cpu_count(),
            "competing_processes": competing_processes()}


def describe(accelerator: str = "") -> dict:
    """Machine, library versions and current load (imports only what is installed)."""
    cpu = _lscpu()
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "cpu_model": cpu.get("Model name", platform.processor()),
            "cpus": os.cpu_count(), "ram_bytes": _ram_bytes(), "accelerator": accelerator,
            "load_at_start": load()}
    if accelerator == "gpu":
        info["gpus"] = _nvidia_smi()
    for name in ("jax", "jaxlib", "flax", "optax", "qwix", "torch", "transformers", "peft"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    return info


def reset_peak_rss() -> bool:
    """Sets this process's peak RSS (VmHWM) to its current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> Optional[int]:
    """A `kB` field of /proc/self/status (e.g. VmHWM, VmRSS) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:
        return None


def rss_bytes() -> Optional[int]:
    return _proc_status_bytes("VmRSS")
    return None


def main_in_workdir(run, args, argv, prefix: str) -> int:
    """Calls `run(args, machine, workdir, argv)` with a temporary workdir, removed after."""
    import shutil
    import tempfile
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        run(args, describe(args.platform), workdir, argv)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
