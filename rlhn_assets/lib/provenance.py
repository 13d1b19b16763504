"""Where a result came from: the code version (git HEAD) and the machine it ran on, for report headers."""

from __future__ import annotations

import os
import platform
import subprocess

from rlhn_assets import settings


def code_version() -> str:
    """HEAD of the project's git checkout (12 hex digits), '+dirty' with uncommitted tracked changes; 'unknown'
    outside git (e.g. an installed wheel)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=settings.PROJECT_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    """CPU, core count, load averages (1 and 5 min) and Python version of this machine, now."""
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(load1, 2),
        "load_avg_5m": round(load5, 2),
        "python": platform.python_version(),
    }
