"""requirements.lock (written by `make lock`, installed by `make venv`) still fits pyproject.toml and
constraints.txt: every direct dependency (dev tools included) is pinned at a version its specifier allows,
every pin carries a hash, and torch is the constrained CPU build. Fails when pyproject.toml or constraints.txt
changed without `make lock`."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from rlhn_assets import settings

ROOT = settings.PROJECT_ROOT
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its hashes), from the pip-compile format (pin, then indented --hash lines)."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = _PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in pins, f"{current} pinned twice"
            pins[current] = (Version(m.group(2)), [])
        elif current and line.strip().startswith("--hash=sha256:"):
            pins[current][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
    return pins


def _requirements(path_key: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r)
        for r in (project["dependencies"] if path_key == "main" else project["optional-dependencies"][path_key])
    ]


def test_every_direct_dependency_is_locked_at_an_allowed_version():
    pins = _lock()
    assert len(pins) > 50  # it read the lock
    reqs = _requirements("main") + _requirements("dev")
    constraints = [
        Requirement(line)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for req in reqs + constraints:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {req.name}=={version}, outside {req} (pyproject.toml / constraints.txt): "
            "run `make lock`"
        )


def test_every_pin_has_a_hash_and_torch_is_the_cpu_build():
    pins = _lock()
    assert not [n for n, (_, hashes) in pins.items() if not hashes]  # `pip install --require-hashes` needs them
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for _, hashes in pins.values() for h in hashes)
    # the CPU wheel (a public "2.13.0" from the index would be the multi-GB CUDA build)
    assert str(pins["torch"][0]) == "2.13.0+cpu"
    assert not [n for n in pins if n.startswith("nvidia-")]
