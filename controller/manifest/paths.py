"""Relative paths in manifests resolve against finops' state directory, never the working
directory.

Manifests live in git and are read from wherever a command or the daemon happens to run
(a checkout, a git worktree under the state directory, a temporary copy of an approved
bundle), so "relative to the manifest" or "relative to the working directory" would name a
different file on every machine, and under systemd (working directory ``/``) a file at the
root of the host. finops' state directory is the one place that is always finops' own and
always writable by it: a relative ``signingSecret.file`` (``{file: alert-signing.secret,
generate: true}``) and a relative ``keys.sink.directory`` name places inside it. ``..`` and
``~`` are refused by the schema (``controller.manifest.schema``), so a relative path never
leaves the state directory; an absolute path is used as written.

This is applied once, right after loading (``load_manifests(..., state_dir=...)``): every
consumer (plan-time checks, apply, alert delivery, the alert outbox, key sinks) sees
absolute paths only. ``finops validate`` (offline, no state directory) leaves them relative.

An older finops resolved these paths against the working directory. When a relative path
does not exist under the state directory but does under the working directory, loading
stops with an error that names both (before any write): finops must not silently generate a
new signing secret, or deliver keys to a new directory, while the old one is still in use.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from controller.errors import ManifestError, ManifestIssue
from policies.spec import AgentSpec, DesiredState, KeySinkSpec, SecretRef, Source


def _base(state_dir: Path) -> Path:
    return Path(os.path.abspath(state_dir))


def _relative(path: str) -> bool:
    return not os.path.isabs(path) and not path.startswith("~")


def _legacy_issue(source: Source | None, field: str, written: str, anchored: Path) -> ManifestIssue | None:
    """The old resolution (working directory) found something the new one does not."""
    legacy = Path(os.path.abspath(written))
    if legacy == anchored or os.path.lexists(anchored) or not os.path.lexists(legacy):
        return None
    return ManifestIssue(
        source.file if source else "<manifests>",
        source.line if source else None,
        field,
        f"{written!r} is relative, so finops resolves it against its state directory: {anchored} does not exist, "
        f"but {legacy} (relative to the working directory, where older finops looked) does. Move it "
        f"(`mv {legacy} {anchored}`) or write an absolute path; finops will not create a new one beside the old",
    )


def anchor_relative_paths(desired: DesiredState, state_dir: Path) -> DesiredState:
    """``desired`` with every relative secret file and sink directory made absolute under
    ``state_dir`` (module doc). Raises ``ManifestError`` for a path still only found where
    an older finops looked."""
    base = _base(state_dir)
    issues: dict[tuple[str, str], ManifestIssue] = {}

    def secret(ref: SecretRef, source: Source | None, field: str) -> SecretRef:
        if ref.file is None or not _relative(ref.file):
            return ref
        anchored = base / ref.file
        issue = _legacy_issue(source, field, ref.file, anchored)
        if issue is not None:
            issues.setdefault((field, ref.file), issue)
        return replace(ref, file=str(anchored))

    def sink(spec: KeySinkSpec, source: Source | None) -> KeySinkSpec:
        if spec.kind != "directory" or spec.path is None or not _relative(spec.path):
            return spec
        anchored = base / spec.path
        issue = _legacy_issue(source, "keys.sink.directory", spec.path, anchored)
        if issue is not None:
            issues.setdefault(("keys.sink.directory", spec.path), issue)
        return replace(spec, path=str(anchored))

    def agent(spec: AgentSpec) -> AgentSpec:
        return replace(
            spec,
            alert_routes=tuple(
                replace(r, secret=secret(r.secret, spec.source, "signingSecret.file")) for r in spec.alert_routes
            ),
            gateway_webhooks=tuple(
                replace(h, secret=secret(h.secret, spec.source, "gatewayWebhooks.signingSecret.file"))
                for h in spec.gateway_webhooks
            ),
            keys=replace(spec.keys, sink=sink(spec.keys.sink, spec.source)),
        )

    anchored = replace(
        desired, fleets=tuple(replace(fleet, agents=tuple(agent(a) for a in fleet.agents)) for fleet in desired.fleets)
    )
    if issues:
        raise ManifestError(list(issues.values()))
    return anchored
