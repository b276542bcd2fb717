"""Prometheus' ``promtool``, found or fetched, for the tests of infra/.

No PyPI or npm package ships promtool; Debian's ``prometheus`` package does. It is
*downloaded* (``apt-get download``) and unpacked (``dpkg -x``) rather than installed:
installing it would register and try to start a Prometheus service. The binary is
cached in ``.venv/tools/`` so that only a fresh clone pays the ~20 MB download.

Order: ``$PROMTOOL``, then ``promtool`` on the ``PATH``, then the cache, then the
download. When all fail, :func:`promtool` raises :class:`PromtoolUnavailable` with
what was tried; the tests turn that into a failure, never a skip, since rules that
were never evaluated are not known to work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PromtoolUnavailable", "promtool"]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".venv" / "tools" / "promtool"
DEBIAN_PACKAGE = "prometheus"
_TIMEOUT_S = 300


class PromtoolUnavailable(Exception):
    """promtool is neither installed nor obtainable here."""


def promtool() -> Path:
    """A working promtool binary, downloading it into the cache on first use."""
    for candidate in _installed():
        if _runs(candidate):
            return candidate
    tried: list[str] = []
    try:
        _fetch_into(CACHE)
    except PromtoolUnavailable as exc:
        tried.append(str(exc))
    else:
        if _runs(CACHE):
            return CACHE
        tried.append(f"{CACHE} was unpacked but does not run")
    raise PromtoolUnavailable(
        "promtool is needed to evaluate infra/alerts.yml and was not found: set $PROMTOOL, "
        f"put promtool on the PATH, or let `apt-get download {DEBIAN_PACKAGE}` work "
        f"(Debian's package holds /usr/bin/promtool). Tried: {'; '.join(tried)}"
    )


def _installed() -> list[Path]:
    found = [Path(os.environ["PROMTOOL"])] if os.environ.get("PROMTOOL") else []
    if on_path := shutil.which("promtool"):
        found.append(Path(on_path))
    if CACHE.is_file():
        found.append(CACHE)
    return found


def _runs(binary: Path) -> bool:
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _fetch_into(target: Path) -> None:
    """Download Debian's prometheus package and keep only its promtool."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise PromtoolUnavailable("no apt-get/dpkg here (not a Debian-like system)")
    with tempfile.TemporaryDirectory(prefix="promtool-") as scratch:
        work = Path(scratch)
        # The _apt sandbox user cannot write into a private temporary directory.
        work.chmod(0o755)
        download = ["apt-get", "download", "-q", DEBIAN_PACKAGE]
        failed = _run(download, work)
        if failed is not None:
            # A fresh machine may have no package lists yet (or stale ones).
            if os.geteuid() != 0:
                raise PromtoolUnavailable(
                    f"`apt-get download {DEBIAN_PACKAGE}`: {failed}; refreshing the package "
                    "lists (apt-get update) needs root"
                )
            _run(["apt-get", "update", "-q"], work)
            if (failed := _run(download, work)) is not None:
                raise PromtoolUnavailable(
                    f"`apt-get download {DEBIAN_PACKAGE}` after apt-get update: {failed}"
                )
        packages = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if not packages:
            raise PromtoolUnavailable(f"apt-get download left no {DEBIAN_PACKAGE}_*.deb")
        unpacked = work / "root"
        if (failed := _run(["dpkg", "-x", str(packages[-1]), str(unpacked)], work)) is not None:
            raise PromtoolUnavailable(f"dpkg -x {packages[-1].name}: {failed}")
        binary = unpacked / "usr" / "bin" / "promtool"
        if not binary.is_file():
            raise PromtoolUnavailable(f"{packages[-1].name} holds no usr/bin/promtool")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copied next to the target, then renamed: a concurrent run never sees half a file.
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copy2(binary, partial)
        partial.chmod(0o755)
        partial.replace(target)


def _run(command: list[str], cwd: Path) -> str | None:
    """None when ``command`` succeeded, else what went wrong (its last line of output)."""
    try:
        proc = subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_TIMEOUT_S,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr + proc.stdout).decode(errors="replace").strip().splitlines()
    return f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
