"""Key files: where ``conclave witness keygen`` writes a key pair, and reading keys back.

``<dir>/<name>.key`` holds the private key line (mode 0600, never overwritten) and
``<dir>/<name>.vkey`` the public verifier key line, the one to publish. Characters of the
key name that do not belong in a file name (a '/' in ``log.example/witness``) become '_'.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from conclave.errors import ProofFailure, WitnessProofError
from conclave.transparency.keys import SignerKey, VerifierKey

__all__ = ["read_signer", "read_verifier", "write_key_pair"]


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "key"


def _write_new(path: Path, text: str, mode: int) -> None:
    # O_EXCL: never replace a key; the mode is set at creation, so no moment of 0644.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, mode)  # whatever the umask


def write_key_pair(signer: SignerKey, directory: Path) -> tuple[Path, Path]:
    """Write the private and public key files; refuses to overwrite either."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(signer.name)
    private, public = directory / f"{stem}.key", directory / f"{stem}.vkey"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; keys are never overwritten")
    _write_new(private, signer.text() + "\n", 0o600)
    _write_new(public, signer.verifier.text() + "\n", 0o644)
    return private, public


def read_verifier(value: str) -> VerifierKey:
    """A verifier key given as its text, or as the path of a file holding it."""
    path = Path(value)
    if "+" not in value or path.is_file():
        value = _read_key_file(path, "verifier key")
    return VerifierKey.parse(value)


def read_signer(path: Path) -> SignerKey:
    return SignerKey.parse(_read_key_file(path, "private key"))


def _read_key_file(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise WitnessProofError(
            f"cannot read {what} {path}: {exc}", reason=ProofFailure.MALFORMED
        ) from None
