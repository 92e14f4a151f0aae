"""``finops approve``: an operator holding the admin key accepts a revision's exposure.

Registered on the main group by ``controller.cli``. It does not take the writer lock (it
writes only finops' own state, never the gateway), so it works while the daemon runs; the
daemon picks the approval up on its next pass.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from controller.cli.keys import Session, with_session
from controller.cli.options import EXIT_OK, TargetOptions, load, run_command, target_options
from controller.errors import ConfigError
from controller.reconcile import approval
from controller.state import Approval, PendingRevision
from policies.exposure import Exposure, exposure_of, review

MIN_PREFIX = 7


APPROVE_FORMAT_VERSION = 1
"""``approve --format json``'s schema version (``--show`` and an approval)."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _find_pending(pending: list[PendingRevision], revision: str) -> PendingRevision | None:
    exact = [p for p in pending if p.revision == revision]
    if exact:
        return exact[0]
    if len(revision) < MIN_PREFIX:
        return None
    matches = [p for p in pending if p.revision.startswith(revision)]
    if len(matches) > 1:
        raise ConfigError(f"revision prefix {revision!r} is ambiguous: {', '.join(p.revision for p in matches)}")
    return matches[0] if matches else None


def _approval_dict(a: Approval) -> dict[str, Any]:
    return {
        "revision": a.revision,
        "source": a.source,
        "how": a.how,
        "approved_at": _iso(a.approved_at),
        "by_key": a.by_key,
        "by_user": a.by_user,
        "exposure": a.exposure_after.to_dict(),
    }


def _show(session: Session, fmt: str) -> int:
    store = session.store
    pending = store.pending_revisions()
    last = store.last_approval()
    if fmt == "json":
        doc = {
            "format_version": APPROVE_FORMAT_VERSION,
            "last_approval": _approval_dict(last) if last else None,
            "pending": [
                {
                    "revision": p.revision,
                    "source": p.source,
                    "first_seen": _iso(p.first_seen),
                    "last_seen": _iso(p.last_seen),
                    "review": p.review.to_dict(),
                }
                for p in pending
            ],
        }
        click.echo(json.dumps(doc, indent=2))
        return EXIT_OK
    if last is None:
        click.echo("No approval recorded yet: the first revision is judged over zero by its own bound.")
    else:
        click.echo(
            f"Last approved: {last.revision} ({last.how}) at {_iso(last.approved_at)} by {last.by_user} "
            f"with admin key {last.by_key}"
        )
    if not pending:
        click.echo("No revision is waiting for approval.")
    for p in pending:
        head = click.style(f"Waiting for approval: {p.revision}", bold=True)
        click.echo(f"{head} (seen since {_iso(p.first_seen)})")
        for line in p.review.lines():
            click.echo(f"  {line}")
        for excess in p.review.excesses:
            click.echo(f"  above the bound: {excess}")
        click.echo(f"  approve with: finops approve {p.revision}")
    return EXIT_OK


def _from_path(revision: str, path: str) -> tuple[str, Exposure]:
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"manifest path {path!r} does not exist")
    now = approval.path_revision(root)
    if now != revision:
        raise ConfigError(
            f"{path} is at revision {now}, not {revision}: review it again (`finops plan {path}`) and approve "
            "the revision you reviewed"
        )
    desired = load(path, None)  # its exposure only: no secret or sink is used
    if approval.path_revision(root) != revision:
        raise ConfigError(f"{path} changed while it was being read; approve again")
    return path, exposure_of(desired)


@click.command("approve")
@click.argument("revision", required=False)
@click.argument("path", required=False)
@click.option("--show", is_flag=True, help="List revisions waiting for approval and the last approval.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@target_options
def approve(revision: str | None, path: str | None, show: bool, fmt: str, opts: TargetOptions) -> None:
    """Approve REVISION's spending authority (a commit, or `dir:<digest>` of PATH).

    REVISION is one the daemon is holding back (see `--show`; a unique prefix of 7+
    characters will do), or the current revision of the manifest directory PATH (as
    `finops plan` and a refused `apply --auto-approve` print it). Needs a working admin key;
    recorded in finops' state with the key's fingerprint and your OS user."""

    def run() -> int:
        if revision is None and not show:
            raise ConfigError("name the REVISION to approve (`finops approve --show` lists those waiting)")

        async def go(s: Session) -> int:
            await s.client.list_keys()  # admin-only: proves the key works and is an admin key
            if show or revision is None:
                return _show(s, fmt)
            pending = _find_pending(s.store.pending_revisions(), revision)
            if pending is not None:
                name, source, exposure = pending.revision, pending.source, pending.exposure
            elif path is not None:
                name = revision
                source, exposure = _from_path(revision, path)
            else:
                raise ConfigError(
                    f"no revision {revision!r} is waiting for approval (see `finops approve --show`); "
                    "to approve a manifest directory, also give its PATH"
                )
            verdict = review(approval.approved_exposure(s.store), exposure)
            record = approval.record(s.store, name, source, exposure, how=approval.APPROVE, api_key=s.target.api_key)
            if fmt == "json":
                click.echo(
                    json.dumps(
                        {
                            "format_version": APPROVE_FORMAT_VERSION,
                            "approved": _approval_dict(record),
                            "review": verdict.to_dict(),
                        },
                        indent=2,
                    )
                )
                return EXIT_OK
            click.echo(f"Approved {name} by {record.by_user} with admin key {record.by_key}.")
            for line in verdict.lines() or ["exposure unchanged from the previous approval"]:
                click.echo(f"  {line}")
            click.echo("The daemon applies it on its next pass; `finops apply` may now apply it unattended.")
            return EXIT_OK

        return with_session(opts, go, quiet_banner=fmt == "json")

    run_command(run)
