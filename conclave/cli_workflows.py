"""``conclave workflow run|show|cancel``, ``conclave workflows`` and
``conclave submit-batch`` (many tasks from a JSON-lines file, one progress bar)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conclave.cli_tasks import AsJson, _print_json, _query, _when, err, out
from conclave.domain.events import Priority
from conclave.errors import ConclaveError, InvalidCommand, NotFound
from conclave.settings import Settings
from projections import workflows as queries

__all__ = ["list_workflows", "submit_batch", "workflow_app"]

T = TypeVar("T")

workflow_app = typer.Typer(
    help="Workflows: DAGs of steps, each a task; run, inspect, cancel.", no_args_is_help=True
)
ENDED = frozenset({"completed", "failed", "cancelled", "rejected"})


def _with_client(run: Callable[[Any], Awaitable[T]]) -> T:
    from conclave.client import Client

    async def go() -> T:
        async with Client(Settings.from_env()) as client:
            return await run(client)

    return asyncio.run(go())


def _load(path: Path) -> Any:
    """A YAML or JSON file (JSON is YAML), or a one-line refusal."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConclaveError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConclaveError(f"{path} is neither YAML nor JSON: {exc}".splitlines()[0]) from None


@workflow_app.command("run")
def workflow_run(
    file: Annotated[Path, typer.Argument(help="The workflow definition, YAML or JSON.")],
    input: Annotated[
        str | None, typer.Option("--input", help="The workflow's input, JSON.")
    ] = None,
    workflow_id: Annotated[
        str | None, typer.Option("--id", help="The workflow id (the same id runs once).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until it ends; draw its steps.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="With --wait.")] = 600,
) -> None:
    """Run a workflow; prints its id (with --wait, its steps once it has ended)."""
    definition = _load(file)
    if not isinstance(definition, dict):
        raise ConclaveError(f"{file}: a workflow is a mapping with 'steps'")
    try:
        value = json.loads(input) if input is not None else None
    except ValueError as exc:
        raise typer.BadParameter(f"--input is not JSON: {exc}") from None
    wid = _with_client(lambda c: c.run_workflow(definition, value, workflow_id=workflow_id))
    if not wait:
        out.print(wid)
        return
    err.print(f"workflow {wid}")
    view = _ended(wid, timeout)
    out.print(_workflow_table(view))
    if view.status != "completed":
        raise ConclaveError(f"workflow {wid} {view.status}: {view.reason}")


def _ended(workflow_id: str, timeout_s: float) -> queries.WorkflowView:
    async def poll(db: Any) -> queries.WorkflowView:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                view = await queries.get_workflow(db, workflow_id)
            except NotFound:
                view = None
            if view is not None and view.status in ENDED:
                return view
            if time.monotonic() > deadline:
                status = view.status if view is not None else "not seen yet"
                raise ConclaveError(
                    f"workflow {workflow_id!r} not ended within {timeout_s:g} s (it is {status})"
                )
            await asyncio.sleep(0.1)

    return _query(poll)


@workflow_app.command("show")
def workflow_show(workflow_id: Annotated[str, typer.Argument()], as_json: AsJson = False) -> None:
    """The workflow's state: each step's status, task, attempts and output once done."""
    view = _query(lambda db: queries.get_workflow(db, workflow_id))
    if as_json:
        _print_json(dataclasses.asdict(view))
        return
    out.print(_workflow_table(view))


def _workflow_table(view: queries.WorkflowView) -> Table:
    title = f"workflow {view.workflow_id} ({view.name}): {view.status}"
    if view.reason and view.status != "completed":
        title += f" - {view.reason}"
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for column in ("step", "status", "task", "attempts", "after", "output"):
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for s in view.steps:
        status = s.status
        if s.status == "submitted" and s.task_status is not None:
            status = f"submitted ({s.task_status})"
        output = s.output if s.output is not None else "-"
        if len(output) > 60:
            output = output[:57] + "..."
        table.add_row(
            s.step,
            status,
            s.task_id if s.status not in {"pending", "skipped"} else "-",
            f"{s.attempts}/{s.max_attempts}",
            ", ".join(s.depends_on) or "-",
            output,
        )
    return table


@workflow_app.command("cancel")
def workflow_cancel(
    workflow_id: Annotated[str, typer.Argument()],
    reason: Annotated[str, typer.Option("--reason")] = "",
) -> None:
    """Cancel a running workflow as a whole: running steps are stopped, the rest never run."""
    _with_client(lambda c: c.cancel_workflow(workflow_id, reason=reason))
    out.print(f"cancel requested for {workflow_id}")


def list_workflows(
    status: Annotated[
        str | None, typer.Option(help="running, completed, failed, cancelled or rejected.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
    as_json: AsJson = False,
) -> None:
    """Workflows, newest first."""
    views = _query(lambda db: queries.list_workflows(db, status=status, limit=limit))
    if as_json:
        _print_json([dataclasses.asdict(v) for v in views])
        return
    if not views:
        out.print("no workflows")
        return
    table = Table(box=None, header_style="bold")
    for column in ("workflow", "name", "status", "started", "ended", "reason"):
        table.add_column(column)
    for v in views:
        reason = v.reason if v.status != "completed" else None
        table.add_row(
            v.workflow_id, v.name, v.status, _when(v.started_at), _when(v.ended_at), reason or "-"
        )
    out.print(table)


# -- batches ---------------------------------------------------------------------------

_BATCH_KEYS = frozenset({"input", "id", "pool", "priority", "max_attempts", "depends_on"})


def _batch_lines(path: Path) -> list[dict[str, Any]]:
    """The tasks of a JSON-lines file: each line a string (the input) or an object with
    ``input`` and optionally ``id``, ``pool``, ``priority``, ``max_attempts``,
    ``depends_on``. A bad line is refused with its number, before anything is sent."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConclaveError(f"cannot read {path}: {exc.strerror}") from None
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ConclaveError(f"{path}:{number}: not JSON: {exc}") from None
        if isinstance(item, str):
            item = {"input": item}
        if not isinstance(item, dict) or not isinstance(item.get("input"), str):
            raise ConclaveError(f"{path}:{number}: a string, or an object with an 'input' string")
        if unknown := set(item) - _BATCH_KEYS:
            raise ConclaveError(f"{path}:{number}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            item["priority"] = Priority.parse(str(item.get("priority", "normal")))
        except ValueError as exc:
            raise ConclaveError(f"{path}:{number}: {exc}") from None
        tasks.append(item)
    return tasks


def submit_batch(
    file: Annotated[Path, typer.Argument(help="JSON lines: one task per line.")],
    pool: Annotated[str, typer.Option(help="For lines that name no pool.")] = "default",
) -> None:
    """Submit many tasks from a JSON-lines file with one progress bar; prints their ids.

    Each line is the input as a JSON string, or an object: {"input": ..., "id": ...,
    "pool": ..., "priority": ..., "max_attempts": ..., "depends_on": [...]}."""
    tasks = _batch_lines(file)
    for item in tasks:
        item.setdefault("pool", pool)
    # Consecutive lines with the same pool, priority and attempts go in one call.
    runs: list[list[dict[str, Any]]] = []
    for item in tasks:
        shape = (item["pool"], item["priority"], item.get("max_attempts", 1))
        last = runs[-1][0] if runs else None
        if (
            last is not None
            and (last["pool"], last["priority"], last.get("max_attempts", 1)) == shape
        ):
            runs[-1].append(item)
        else:
            runs.append([item])

    async def send(client: Any) -> list[str]:
        ids: list[str] = []
        columns = (
            TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        )  # fmt: skip
        with Progress(*columns, console=err, transient=False) as progress:
            bar = progress.add_task("submit", total=len(tasks))
            for run in runs:
                for start in range(0, len(run), 1000):
                    chunk = run[start : start + 1000]
                    first = chunk[0]
                    given = [i.get("id") for i in chunk]
                    ids += await client.submit_many(
                        [i["input"] for i in chunk],
                        task_ids=[g or f"batch-{time.time_ns():x}-{n}" for n, g in enumerate(given)]
                        if any(given)
                        else None,
                        pool=first["pool"],
                        priority=first["priority"],
                        max_attempts=first.get("max_attempts", 1),
                        depends_on=[list(i.get("depends_on", [])) for i in chunk],
                    )
                    progress.advance(bar, len(chunk))
        return ids

    try:
        ids = _with_client(send)
    except InvalidCommand as exc:
        raise ConclaveError(f"refused: {exc}") from None
    for task_id in ids:
        out.print(task_id)
