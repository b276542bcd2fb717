"""``conclave witness keygen|check-proof|checkpoint|prove|consistency``: the transparency
log from the shell. Thin: the rules live in ``conclave.domain.merkle`` and
``conclave.transparency``; every refusal is one line on stderr and exit code 1.

``keygen`` and ``check-proof`` need nothing but files; ``checkpoint``, ``prove`` and
``consistency`` read the witness topic (the broker must be up) and sign with the log's
private key until the witness processor publishes checkpoints itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from conclave.domain.events import WitnessEntry
from conclave.errors import ConclaveError

__all__ = ["witness_app"]

witness_app = typer.Typer(help="The witness log.", no_args_is_help=True)

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

KeyFile = Annotated[Path, typer.Option("--key", help="The log's private key file (from keygen).")]
Origin = Annotated[
    str | None,
    typer.Option(help="The log's origin line (default: the name of the key)."),
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(1)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {exc}") from None


def _emit(text: str, destination: Path | None) -> None:
    if destination is None:
        print(text)
    else:
        destination.write_text(text + "\n", encoding="utf-8")
        err.print(f"wrote {destination}")


@witness_app.command("keygen")
def keygen(
    name: Annotated[str, typer.Option(help="Key name: the log's origin, e.g. example.org/log.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the key files.")],
) -> None:
    """Make an Ed25519 signing key: NAME.key (private, mode 0600) and NAME.vkey (public)."""
    from conclave.transparency.keyfiles import write_key_pair
    from conclave.transparency.keys import SignerKey

    try:
        private, public = write_key_pair(SignerKey.generate(name), out_dir)
    except (ConclaveError, OSError) as exc:
        raise _fail(str(exc)) from None
    out.print(public.read_text().strip())
    err.print(f"private key {private} (keep it secret), public key {public}")


@witness_app.command("check-proof")
def check_proof_command(
    bundle_file: Annotated[Path, typer.Argument(metavar="FILE", help="A proof bundle (JSON).")],
    vkeys: Annotated[
        list[str],
        typer.Option("--vkey", help="A trusted public key, or a .vkey file; repeat for several."),
    ],
    origin: Origin = None,
) -> None:
    """Check an inclusion or consistency proof offline: signature, checkpoint, path."""
    from conclave.transparency.bundle import load_bundle
    from conclave.transparency.keyfiles import read_verifier
    from conclave.transparency.proofs import check_proof

    try:
        verifiers = [read_verifier(value) for value in vkeys]
        result = check_proof(load_bundle(_read(bundle_file)), verifiers, origin=origin)
    except ConclaveError as exc:
        raise _fail(str(exc)) from None
    out.print(f"OK: {result.summary()}")


def _topic_entries() -> list[WitnessEntry]:
    from conclave.domain.witness import first_violation
    from conclave.settings import Settings
    from conclave.verify import topic_entries

    try:
        entries, _ = asyncio.run(topic_entries(Settings.from_env()))
    except ConclaveError as exc:
        raise _fail(str(exc)) from None
    if (violation := first_violation(entries)) is not None:
        raise _fail(
            f"the witness chain is broken at sequence {violation.sequence} "
            f"({violation.reason}); no proof is made over it"
        )
    return list(entries)


@witness_app.command("checkpoint")
def checkpoint_command(key: KeyFile, origin: Origin = None) -> None:
    """Sign a checkpoint of the witness topic as it is now; prints the signed note."""
    from conclave.transparency.keyfiles import read_signer
    from conclave.transparency.proofs import sign_checkpoint, tree_of

    try:
        signer = read_signer(key)
        tree = tree_of(_topic_entries())
        note = sign_checkpoint(tree, origin or signer.name, [signer])
    except (ConclaveError, ValueError) as exc:
        raise _fail(str(exc)) from None
    print(note, end="")


@witness_app.command("prove")
def prove_command(
    ref: Annotated[str, typer.Argument(metavar="TASK_ID|SEQ", help="A task id or a sequence.")],
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            help="Sign a checkpoint of the whole topic now with this private key, "
            "instead of proving against the latest published checkpoint.",
        ),
    ] = None,
    origin: Origin = None,
    to: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")] = None,
) -> None:
    """An inclusion proof bundle for an output (by task id) or any entry (by sequence),
    against the latest checkpoint the witness processor published (or, with --key, one
    signed now)."""
    from conclave.domain.witness import leaf_bytes
    from conclave.transparency.keyfiles import read_signer
    from conclave.transparency.proofs import find_entry, inclusion_bundle, prove_inclusion, tree_of

    try:
        entries = _topic_entries()
        sequence = find_entry(entries, ref)
        if key is not None:
            signer = read_signer(key)
            bundle = prove_inclusion(entries, sequence, origin or signer.name, [signer])
        else:
            note = _published_covering(sequence)
            bundle = inclusion_bundle(tree_of(entries), leaf_bytes(entries[sequence - 1]), note)
    except (ConclaveError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _emit(bundle.to_json(), to)


def _published_covering(sequence: int) -> str:
    """The signed note of the latest published checkpoint, which must cover ``sequence``."""
    from conclave.settings import Settings
    from conclave.verify import published_checkpoints

    published = asyncio.run(published_checkpoints(Settings.from_env()))
    if not published:
        raise _fail(
            "no checkpoint has been published (the worker needs CONCLAVE_WITNESS_KEY); "
            "sign one now with --key"
        )
    latest = max(published, key=lambda c: c.tree_size)
    if latest.tree_size < sequence:
        raise _fail(
            f"entry {sequence} is not under a published checkpoint yet (the latest covers "
            f"{latest.tree_size}); the next is due within CONCLAVE_CHECKPOINT_INTERVAL_S"
        )
    return latest.note


@witness_app.command("consistency")
def consistency_command(
    old: Annotated[Path, typer.Argument(help="The older signed checkpoint (a file).")],
    new: Annotated[Path, typer.Argument(help="The newer signed checkpoint (a file).")],
    to: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")] = None,
) -> None:
    """A consistency proof bundle between two checkpoints of the witness topic."""
    from conclave.transparency.proofs import consistency_bundle, tree_of

    try:
        tree = tree_of(_topic_entries())
        bundle = consistency_bundle(tree, _read(old), _read(new))
    except (ConclaveError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _emit(bundle.to_json(), to)


@witness_app.command("export")
def export_command(
    output: Annotated[
        str, typer.Option("--output", "-o", help="The export file, or - for stdout.")
    ] = "-",
    source: Annotated[
        str, typer.Option("--from", help="Read the log from the topic or from postgres.")
    ] = "topic",
    fmt: Annotated[str, typer.Option("--format", help="jsonl (JSON lines).")] = "jsonl",
    vkeys: Annotated[
        list[str] | None,
        typer.Option("--vkey", help="Another public key to carry (the log's own is always)."),
    ] = None,
) -> None:
    """Write the witness log as JSON lines with everything needed to re-verify the chain,
    the tree and the signed checkpoints offline (docs/witness.md, "Export")."""
    import os
    import sys

    from conclave.exporting import export_log, known_keys
    from conclave.settings import Settings
    from conclave.transparency.export import LogBroken
    from conclave.transparency.keyfiles import read_verifier

    if fmt != "jsonl":
        raise _fail(f"--format must be jsonl, not {fmt!r}")
    if source not in ("topic", "postgres"):
        raise _fail(f"--from must be topic or postgres, not {source!r}")
    destination = None if output == "-" else Path(output)
    partial = None if destination is None else destination.with_name(destination.name + ".part")
    try:
        settings = Settings.from_env()
        keys = known_keys(settings, [read_verifier(value) for value in vkeys or ()])
        with (
            open(partial, "w", encoding="utf-8", newline="\n")
            if partial is not None
            else open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False)
        ) as file:
            checker, findings = asyncio.run(
                export_log(
                    settings, "topic" if source == "topic" else "postgres", keys, file, console=err
                )
            )
        if partial is not None and destination is not None:
            os.replace(partial, destination)
    except LogBroken as exc:
        outcome = "the lines on stdout are incomplete" if partial is None else "nothing written"
        raise _fail(f"the log is broken at {exc.where}: {exc.reason}; {outcome}") from None
    except (ConclaveError, OSError) as exc:
        raise _fail(str(exc)) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    for finding in findings:
        err.print(f"[yellow]not an entry:[/] {finding}")
    err.print(
        f"exported {checker.size} entries and {checker.checkpoints} checkpoints "
        f"(root {checker.root.hex()}) to {output if destination else 'stdout'}"
    )
