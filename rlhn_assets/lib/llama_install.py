"""The installer of the local llama.cpp stack: build (or reuse) a portable ``llama-server`` and smoke-test it on
every installed model, rebuilding more portably when no server setting works on this CPU.

It uses both ``lib.llama_build`` (profiles, builds, the ``smoke.json`` records) and ``lib.local_llm`` (the
assembled GGUFs and ``LlamaServer``); neither of those imports this module, so the three have no import cycle.
``lib/llama_build.py`` says why the server is built this way; ``docs/local_llm.md`` has the measurements.

CLI (what ``scripts/install_local_llm.sh`` runs): ``python -m rlhn_assets.lib.llama_install install|info``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhn_assets.lib import llama_build, local_llm
from rlhn_assets.lib.llama_build import FALLBACK_ARGS, BuildError, InstalledBuild

_SPEED_TEXT = (
    "A search engine ranks passages for a query; a relevance judge reads the query and one passage "
    "and answers whether the passage answers the query. "
) * 8


def _probe(server: Path, gguf: Path, args: tuple[str, ...], alias: str, timeout: float) -> dict:
    """Start the server with ``args``; one chat completion with logprobs (must come back with them), then two
    ~250-token prompts timed for the speed comparison. ``{"ok", "error"?, "seconds_per_prompt"?}``."""
    import openai

    srv = local_llm.LlamaServer(
        gguf, ctx_size=2048, alias=alias, server_binary=server, extra_args=args, retry_with_fallback=False
    )
    try:
        with srv.start(timeout=timeout):
            client = openai.OpenAI(base_url=srv.base_url, api_key="local", timeout=120, max_retries=0)
            resp = client.chat.completions.create(
                model=alias,
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=5,
                messages=[{"role": "user", "content": "Is Paris the capital of France? Answer Yes or No."}],
            )
            lp = resp.choices[0].logprobs
            if not (lp and lp.content and lp.content[0].top_logprobs):
                raise local_llm.LocalLLMError("the completion came back without logprobs")
            times = []
            for i in range(2):  # a new prompt each time: no prompt-cache reuse
                t = time.monotonic()
                client.chat.completions.create(
                    model=alias,
                    max_tokens=1,
                    temperature=0,
                    messages=[{"role": "user", "content": f"Text {i}: {_SPEED_TEXT}\nAnswer Yes or No."}],
                )
                times.append(time.monotonic() - t)
        return {
            "ok": True,
            "answer": resp.choices[0].message.content,
            "load_s": round(srv.load_seconds or 0, 1),
            "seconds_per_prompt": round(min(times), 3),
        }
    except (local_llm.LocalLLMError, openai.OpenAIError) as e:
        failed_start = srv.attempts and not srv.attempts[-1]["ok"]
        return {
            "ok": False,
            "error": srv.attempts[-1]["ended"] if failed_start else (str(e).splitlines() or [type(e).__name__])[0],
        }


def smoke_test(
    server: Path,
    gguf: Path,
    model_sha: str,
    alias: str = "smoke",
    log: Callable[[str], None] = print,
    timeout: float = 180,
) -> dict:
    """Start ``server`` on ``gguf`` with the default settings and with :data:`FALLBACK_ARGS`, each time one chat
    completion with logprobs and a timed prompt, then stop it. Records and returns ``{"ok", "args", "tried"}``:
    ``args`` is the setting to use, the default unless only the fallback works or it is >10% faster (weight
    repacking is meant to speed prompts up, but on some CPUs it is slower, on some it crashes)."""
    tried: list[dict] = []
    for args in ((), FALLBACK_ARGS):
        r = _probe(server, gguf, args, alias, timeout)
        tried.append({"args": list(args), **r})
        shown = " ".join(args) or "default settings"
        log(
            f"smoke test {gguf.name}: "
            + (
                f"ok with {shown} ({r['seconds_per_prompt']:.2f} s per 250-token prompt)"
                if r["ok"]
                else f"FAILED with {shown}: {r['error']}"
            )
        )
    ok = [t for t in tried if t["ok"]]
    if not ok:
        result = {"ok": False, "args": [], "tried": tried, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    else:
        best = ok[0]
        if len(ok) == 2 and ok[1]["seconds_per_prompt"] < 0.9 * ok[0]["seconds_per_prompt"]:
            best = ok[1]
        result = {"ok": True, "args": best["args"], "tried": tried, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        log(f"smoke test {gguf.name}: using {' '.join(best['args']) or 'default settings'}")
    llama_build.record_smoke(server, model_sha, result)
    return result


# --------------------------------------------------------------------------------------------------------------
# installer
# --------------------------------------------------------------------------------------------------------------


def install(
    models: Sequence[str], root: Path | None = None, log: Callable[[str], None] = print, force_smoke: bool = False
) -> InstalledBuild:
    """Make sure a compatible llama-server is built and passes the smoke test on every model in ``models``.

    Uses a cached build when one fits this CPU, else builds the most capable profile; if the smoke test fails
    with every setting, rebuilds with the next, more portable profile. Raises BuildError when nothing works."""
    ggufs = [(m, local_llm.assemble_gguf(m)) for m in models]
    fp = llama_build.cpu_fingerprint()
    forced = os.environ.get("RLHN_LLAMA_PROFILE")
    profiles = [llama_build.choose_profile()] if forced else llama_build.profiles_for()
    failures: list[str] = []
    for profile in profiles:
        b = InstalledBuild.load(llama_build.build_dir(profile, root))
        if b is not None and not llama_build.compatible(b):
            log(f"cached build {b.path.name} needs CPU flags this machine lacks; not using it")
            b = None
        if b is None:
            b = llama_build.build(profile, root, log=log)
        else:
            log(f"using the cached llama-server build {b.path} ({profile.name})")
        results = {}
        for name, gguf in ggufs:
            sha = local_llm.model_sha256(gguf)
            known = llama_build.read_smoke(b.server).get(fp, {}).get(sha)
            if known and known.get("ok") and not force_smoke:
                log(
                    f"smoke test {gguf.name}: passed before on this CPU with "
                    f"{' '.join(known['args']) or 'default settings'} (smoke.json)"
                )
                results[name] = known
            else:
                results[name] = smoke_test(b.server, gguf, sha, alias=name, log=log)
        bad = [n for n, r in results.items() if not r["ok"]]
        if not bad:
            log(
                f"llama-server ready: {b.server} ({profile.name}); settings per model: "
                + ", ".join(f"{n}: {' '.join(r['args']) or 'default'}" for n, r in results.items())
            )
            return b
        failures.append(
            f"{profile.name}: {', '.join(bad)} failed with every setting "
            f"({'; '.join(t.get('error', '') for r in results.values() for t in r['tried'] if not t['ok'])})"
        )
        log(f"{profile.name} build does not work on this CPU; trying a more portable build")
    raise BuildError(
        "no llama-server build works on this machine:\n  "
        + "\n  ".join(failures)
        + "\nThe `local` preset's tier 2 can use any OpenAI-compatible endpoint instead (README, "
        "'When the local server cannot start')."
    )


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhn_assets.lib.llama_install", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_inst = sub.add_parser("install", help="build (if needed) and smoke-test llama-server on the given models")
    p_inst.add_argument("models", nargs="+")
    p_inst.add_argument("--force-smoke", action="store_true", help="re-run smoke tests that passed before")
    sub.add_parser("info", help="show this CPU's profile and the cached builds")
    a = ap.parse_args(argv)
    log = lambda m: print(f"[install_local_llm] {m}", flush=True)  # noqa: E731
    if a.cmd == "info":
        flags = llama_build.cpu_flags()
        print(
            json.dumps(
                {
                    "cpu": llama_build.cpu_model(),
                    "fingerprint": llama_build.cpu_fingerprint(),
                    "machine": platform.machine(),
                    "profiles": [p.name for p in llama_build.profiles_for(flags)],
                    "isa_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "sse", "fma", "f16c", "bmi"))),
                    "builds": {
                        str(p): llama_build.read_smoke(p / "bin" / "llama-server")
                        for p in sorted((llama_build.cache_root() / "llama-server").glob("[!.]*"))
                    },
                },
                indent=2,
            )
        )
        return 0
    try:
        install(a.models, log=log, force_smoke=a.force_smoke)
    except (BuildError, RuntimeError) as e:
        print(f"[install_local_llm] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
