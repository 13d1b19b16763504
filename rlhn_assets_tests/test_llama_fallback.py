"""The portable llama-server stack (lib/llama_build.py) and LlamaServer's crash fallback, with a test double.

``fake_llama_server.py`` dies with SIGILL/SIGSEGV unless it gets ``--no-repack``, as the natively built server
did on AVX-512/AMX VMs. These tests fail if the retry with the fallback settings, the recording of what worked,
the error message or the CPU-compatibility key of cached builds is removed."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from rlhn_assets.lib import llama_build, llama_install, local_llm
from rlhn_assets.lib.local_llm import LlamaServer, LocalLLMError

FAKE = Path(__file__).parent / "fake_llama_server.py"

# /proc/cpuinfo of a VM like the one where the native build crashed (AVX-512 + AMX), and of an old CPU
AMX_CPUINFO = (
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu sse2 ssse3 sse4_1 "
    "sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512bw avx512dq avx512vl avx512vbmi avx512_vnni "
    "avx512_bf16 amx_tile amx_int8 "
    "amx_bf16\n"
)
OLD_CPUINFO = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) E5520\nflags\t\t: fpu sse2 ssse3 sse4_1 sse4_2 popcnt\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RLHN_LLAMA_PROFILE", raising=False)
    monkeypatch.delenv("RLHN_LLAMA_SERVER", raising=False)
    for k in ("FAKE_LLAMA_CRASH", "FAKE_LLAMA_CRASH_ALWAYS", "FAKE_LLAMA_HANG", "LLAMA_ARG_REPACK"):
        monkeypatch.delenv(k, raising=False)


def make_fake_build(profile: llama_build.BuildProfile, env: dict[str, str] | None = None) -> llama_build.InstalledBuild:
    """A cached 'build' of ``profile`` in the private cache whose llama-server is the test double."""
    d = llama_build.build_dir(profile)
    (d / "bin").mkdir(parents=True, exist_ok=True)
    exports = "".join(f"export {k}={v}\n" for k, v in (env or {}).items())
    server = d / "bin" / "llama-server"
    server.write_text(f'#!/bin/sh\n{exports}exec {sys.executable} {FAKE} "$@"\n')
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    import platform

    (d / "build.json").write_text(
        json.dumps({"profile": profile.name, "requires": sorted(profile.requires), "machine": platform.machine()})
    )
    b = llama_build.InstalledBuild.load(d)
    assert b is not None
    return b


@pytest.fixture
def gguf(tmp_path) -> Path:
    p = tmp_path / "models" / "fake.Q4_K_M.gguf"
    p.parent.mkdir()
    p.write_bytes(b"GGUF" + os.urandom(64))
    return p


V4 = llama_build.profile_by_name("x86-64-v4-vnni")
V3 = llama_build.profile_by_name("x86-64-v3")
V2 = llama_build.profile_by_name("x86-64-v2")


def _argv_log(tmp_path) -> Path:
    return tmp_path / "argv.jsonl"


def _invocations(tmp_path) -> list[list[str]]:
    p = _argv_log(tmp_path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# LlamaServer.start(): crash at start -> one retry with --no-repack
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["SIGILL", "SIGSEGV"])
def test_start_retries_with_no_repack_after_a_crash_and_records_it(tmp_path, gguf, monkeypatch, sig):
    b = make_fake_build(V3, {"FAKE_LLAMA_CRASH": sig, "FAKE_LLAMA_ARGV_LOG": _argv_log(tmp_path)})
    srv = LlamaServer(gguf, server_binary=b.server)
    with srv:
        assert srv.running and srv.health() == {"status": "ok"}
        assert "--no-repack" in srv.command()
    assert [a["ok"] for a in srv.attempts] == [False, True]
    assert sig in srv.attempts[0]["ended"]
    runs = _invocations(tmp_path)
    assert len(runs) == 2 and "--no-repack" not in runs[0] and "--no-repack" in runs[1]

    # recorded for this binary, model and CPU: the next start goes straight to the setting that works
    assert llama_build.recorded_args(b.server, local_llm.model_sha256(gguf)) == ("--no-repack",)
    srv2 = LlamaServer(gguf, server_binary=b.server)
    with srv2:
        pass
    assert len(_invocations(tmp_path)) == 3 and "--no-repack" in _invocations(tmp_path)[2]
    assert len(srv2.attempts) == 1


def test_error_names_binary_flags_signal_and_log_tail(tmp_path, gguf):
    b = make_fake_build(V3, {"FAKE_LLAMA_CRASH": "SIGSEGV", "FAKE_LLAMA_CRASH_ALWAYS": "1"})
    with pytest.raises(LocalLLMError) as ei:
        LlamaServer(gguf, server_binary=b.server).start()
    msg = str(ei.value)
    assert str(b.server) in msg
    assert "(default settings): killed by SIGSEGV" in msg
    assert "--no-repack: killed by SIGSEGV" in msg
    assert "llama threadpool init, n_threads = 2" in msg  # the log tail
    assert "OpenAI-compatible endpoint" in msg  # what to do instead


def test_no_healthy_server_is_retried_then_reported(tmp_path, gguf):
    b = make_fake_build(V3, {"FAKE_LLAMA_HANG": "1", "FAKE_LLAMA_ARGV_LOG": _argv_log(tmp_path)})
    srv = LlamaServer(gguf, server_binary=b.server)
    with pytest.raises(LocalLLMError, match="not healthy after 2 s"):
        srv.start(timeout=2)
    assert len(_invocations(tmp_path)) == 2
    assert not srv.running


def test_plain_exit_is_not_retried(tmp_path, gguf):
    srv = LlamaServer(gguf, server_binary="/bin/false")
    with pytest.raises(LocalLLMError, match="exited with code 1"):
        srv.start()
    assert len(srv.attempts) == 1


def test_working_server_starts_once_with_default_settings(tmp_path, gguf):
    b = make_fake_build(V3, {"FAKE_LLAMA_ARGV_LOG": _argv_log(tmp_path)})
    with LlamaServer(gguf, server_binary=b.server) as srv:
        assert "--no-repack" not in srv.command()
    assert len(_invocations(tmp_path)) == 1


# ---------------------------------------------------------------------------------------------------------------
# smoke test and installer
# ---------------------------------------------------------------------------------------------------------------


def test_smoke_test_falls_back_and_records(tmp_path, gguf):
    b = make_fake_build(V3, {"FAKE_LLAMA_CRASH": "SIGILL"})
    sha = local_llm.model_sha256(gguf)
    r = llama_install.smoke_test(b.server, gguf, sha, log=lambda m: None)
    assert r["ok"] and r["args"] == ["--no-repack"]
    assert r["tried"][0]["ok"] is False and "SIGILL" in r["tried"][0]["error"]
    assert r["tried"][1]["ok"] is True
    assert llama_build.recorded_args(b.server, sha) == ("--no-repack",)


def test_install_rebuilds_portable_when_no_setting_works(tmp_path, gguf, monkeypatch):
    """v3 crashes with every setting -> the installer builds v2, whose smoke test passes; v3 is then skipped."""
    flags = llama_build.cpu_flags(AMX_CPUINFO)
    monkeypatch.setattr(llama_build, "cpu_flags", lambda cpuinfo=None: flags)
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    built = []

    def fake_build(profile, root=None, jobs=None, log=print):
        built.append(profile.name)
        env = {"FAKE_LLAMA_CRASH": "SIGILL", "FAKE_LLAMA_CRASH_ALWAYS": "1"} if profile is V4 else {}
        return make_fake_build(profile, env)

    monkeypatch.setattr(llama_build, "build", fake_build)
    monkeypatch.setattr(local_llm, "assemble_gguf", lambda name, cache_dir=None: gguf)
    b = llama_install.install(["fake"], log=lambda m: None)
    assert built == ["x86-64-v4-vnni", "x86-64-v4"]
    assert b.info["profile"] == "x86-64-v4"
    # later runs use the build that works, and the installer does not rebuild or re-test it
    assert llama_build.find_build().path == b.path
    assert llama_install.install(["fake"], log=lambda m: None).path == b.path and len(built) == 2


def test_install_fails_clearly_when_nothing_works(tmp_path, gguf, monkeypatch):
    monkeypatch.setattr(llama_build, "profiles_for", lambda flags=None, machine=None: [V3])
    monkeypatch.setattr(
        llama_build,
        "build",
        lambda profile, root=None, jobs=None, log=print: make_fake_build(
            profile, {"FAKE_LLAMA_CRASH": "SIGILL", "FAKE_LLAMA_CRASH_ALWAYS": "1"}
        ),
    )
    monkeypatch.setattr(local_llm, "assemble_gguf", lambda name, cache_dir=None: gguf)
    with pytest.raises(llama_build.BuildError, match="no llama-server build works") as ei:
        llama_install.install(["fake"], log=lambda m: None)
    assert "SIGILL" in str(ei.value) and "OpenAI-compatible endpoint" in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# build profiles and the cache key
# ---------------------------------------------------------------------------------------------------------------


def test_amx_cpu_gets_an_avx512_profile_without_amx():
    p = llama_build.choose_profile(llama_build.cpu_flags(AMX_CPUINFO), machine="x86_64")
    assert p.name == "x86-64-v4-vnni"
    args = set(p.cmake_args)
    assert {
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX512=ON",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
    } <= args
    # every profile after it is a fallback this CPU can also run, AVX2 without AVX-512 among them
    names = [q.name for q in llama_build.profiles_for(llama_build.cpu_flags(AMX_CPUINFO), machine="x86_64")]
    assert names == ["x86-64-v4-vnni", "x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64"]
    assert "-DGGML_AVX512=OFF" in llama_build.profile_by_name("x86-64-v3").cmake_args


def test_old_cpu_gets_sse42_profile():
    assert llama_build.choose_profile(llama_build.cpu_flags(OLD_CPUINFO), machine="x86_64").name == "x86-64-v2"


def test_cached_build_is_never_used_on_a_cpu_lacking_its_flags(monkeypatch):
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    b = make_fake_build(V4)
    amx, old = llama_build.cpu_flags(AMX_CPUINFO), llama_build.cpu_flags(OLD_CPUINFO)
    assert llama_build.find_build(flags=amx, machine="x86_64").path == b.path
    assert not llama_build.compatible(b, old, machine="x86_64")
    assert llama_build.find_build(flags=old, machine="x86_64") is None  # AVX-512 build, SSE4.2-only CPU
    assert llama_build.build_key(V3) != llama_build.build_key(V2)


def test_find_llama_server_prefers_the_compatible_cached_build(monkeypatch):
    b = make_fake_build(llama_build.choose_profile())
    assert local_llm.find_llama_server() == b.server


def test_profile_can_be_forced(monkeypatch):
    monkeypatch.setenv("RLHN_LLAMA_PROFILE", "x86-64-v2")
    assert llama_build.choose_profile(llama_build.cpu_flags(AMX_CPUINFO), machine="x86_64").name == "x86-64-v2"
    monkeypatch.setenv("RLHN_LLAMA_PROFILE", "nope")
    with pytest.raises(llama_build.BuildError, match="unknown llama-server build profile"):
        llama_build.choose_profile()


def test_user_supplied_binary_gets_the_fallback_but_nothing_is_written_beside_it(tmp_path, gguf, monkeypatch):
    own = tmp_path / "opt" / "bin" / "llama-server"
    own.parent.mkdir(parents=True)
    own.write_text(f'#!/bin/sh\nexport FAKE_LLAMA_CRASH=SIGILL\nexec {sys.executable} {FAKE} "$@"\n')
    own.chmod(0o755)
    monkeypatch.setenv("RLHN_LLAMA_SERVER", str(own))
    assert local_llm.find_llama_server() == own
    with LlamaServer(gguf) as srv:
        assert "--no-repack" in srv.command()
    assert not (tmp_path / "opt" / "smoke.json").exists()
