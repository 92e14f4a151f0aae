"""Manifest loading: the canonical fleet resolves as documented; every bad case points at the
exact file, line and field, and reports all of its problems at once."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import ManifestError, ManifestIssue
from controller.manifest import load_manifests
from controller.manifest.keyscan import API_KEY_PATTERN, key_lines, key_lines_in_chunks
from controller.manifest.loader import MAX_FILE_BYTES
from policies.spec import (
    AgentSpec,
    AlertRoute,
    ApprovalPolicy,
    DesiredState,
    FleetSpec,
    GatewayWebhookSpec,
    KeyPolicy,
    RebalanceSettings,
    SecretRef,
    Source,
)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BAD = ROOT / "tests" / "data" / "bad_manifests"
CASES = sorted(p.name for p in BAD.iterdir() if p.is_dir())

FLEET_HEAD = """\
apiVersion: finops.greenhelix.net/v1
kind: Fleet
metadata:
  name: research
spec:
  currency: USD
  dailyBudgetTotal: "200.00"
  funding: {perRunCeiling: "500.00"}
  defaults:
    funding: {floor: "20.00", target: "40.00"}
  tiers:
    researcher: {dailyCap: "30.00", monthlyCap: "600.00"}
"""


def _issues(path: str | Path) -> list[ManifestIssue]:
    with pytest.raises(ManifestError) as info:
        load_manifests(path)
    return list(info.value.issues)


def _money(text: str) -> Decimal:
    return Decimal(text)


# --- the canonical example -------------------------------------------------------------------


def _agent(
    agent_id: str, tier: str, daily: str, monthly: str, floor: str, target: str, role: str, file: str, line: int
) -> AgentSpec:
    secret = SecretRef(file="alert-signing.secret", generate=True)
    return AgentSpec(
        agent_id=agent_id,
        fleet="research",
        tier=tier,
        daily_cap=_money(daily),
        monthly_cap=_money(monthly),
        funding_floor=_money(floor),
        funding_target=_money(target),
        alert_thresholds=(75, 90, 100),
        labels={"team": "research", "role": role},
        source=Source(file, line),
        alert_routes=(
            AlertRoute(
                "https://alerts.example.com/research/{agent}/{threshold}", (75, 90), ("budget.threshold",), secret
            ),
            AlertRoute(
                "https://pager.example.com/finops/{fleet}?agent={agent}&window={window}",
                (100,),
                ("budget.threshold", "budget.recovered"),
                secret,
            ),
        ),
        gateway_webhooks=(
            GatewayWebhookSpec(
                f"https://alerts.example.com/gateway/{agent_id}",
                ("billing.usage_recorded", "billing.deposit"),
                # the gateway lists webhook secrets in clear: finops generates this one itself
                SecretRef(managed="gateway-webhook-research"),
            ),
        ),
        keys=KeyPolicy(manage=True, scopes=("read", "write"), rotation="weekly"),
        daily_cap_min=_money(daily) / 2,
        daily_cap_max=_money(daily) * 2,
    )


def test_canonical_manifests_resolve_to_the_research_fleet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    state = load_manifests("manifests")

    fleet_file, workers_file = "manifests/research-fleet.yaml", "manifests/research-workers.yaml"
    expected = DesiredState(
        fleets=(
            FleetSpec(
                name="research",
                currency="USD",
                daily_total=Decimal("200.00"),
                funding_ceiling=Decimal("500.00"),
                agents=(
                    _agent("orch-01", "orchestrator", "80.00", "1600.00", "100.00", "200.00", "lead", fleet_file, 115),
                    _agent("res-01", "researcher", "30.00", "600.00", "40.00", "75.00", "worker", workers_file, 12),
                    _agent("res-02", "researcher", "30.00", "600.00", "40.00", "75.00", "worker", workers_file, 15),
                    _agent("sum-01", "summarizer", "20.00", "400.00", "25.00", "50.00", "worker", workers_file, 18),
                    _agent("cls-01", "classifier", "15.00", "300.00", "20.00", "40.00", "worker", workers_file, 21),
                ),
                source=Source(fleet_file, 16),
                rebalancing=RebalanceSettings(True, 900, Decimal("0.3"), Decimal("0.8"), Decimal("0.5")),
                approval=ApprovalPolicy(Decimal("200.00"), Decimal("4000.00"), Decimal("500.00"), 5),
            ),
        )
    )
    assert state == expected
    assert sum(a.daily_cap for a in state.agents()) == Decimal("175.00")
    assert all(str(a.daily_cap) == f"{a.daily_cap:.2f}" for a in state.agents())  # exactly 2 dp


def test_canonical_fleet_file_alone_is_valid() -> None:
    state = load_manifests(MANIFESTS / "research-fleet.yaml")
    assert [a.agent_id for a in state.agents()] == ["orch-01"]


# --- the bad-manifest corpus -----------------------------------------------------------------
#
# One directory per case (tests/data/bad_manifests/README.md). The helpers below are also used
# by tests/integration/test_bad_manifests_write_nothing.py, which runs the same cases through
# the CLI against a sandbox gateway.

#: Categories the corpus must keep covering, with at least this many cases each.
REQUIRED_CATEGORIES = {
    "yaml-syntax": 5, "yaml-abuse": 5, "huge-file": 4, "wrong-type": 5, "unknown-field": 5,
    "name-reference": 5, "duplicate": 5, "budget": 5, "funding": 3, "amount": 5, "threshold": 5,
    "rotation": 5, "rebalancing": 5, "inline-secret": 5, "secret-ref": 5, "unsafe-url": 5,
    "gateway-webhook": 5, "key-sink": 4, "scopes": 3, "document": 5,
}  # fmt: skip

#: ``NAME.in`` in a case is a template for ``NAME``, so a case can be bigger than the 1 MiB
#: limit without a big file in git. A template line ``#@repeat N TEXT`` becomes N lines of TEXT
#: (``{i}`` counts from 0), ``#@concat N TEXT`` one line of N copies, and ``#@exact N`` pads the
#: file with a final comment line to exactly N bytes.
TEMPLATE_SUFFIX = ".in"
_DIRECTIVE = re.compile(r"#@(repeat|concat|exact) (\d+)(?: (.*))?")


def expected_lines(case: str) -> list[str]:
    """The error lines ``case`` must produce, exactly and in order."""
    text = (BAD / case / "expected.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def case_header(case: str, key: str) -> str | None:
    """A ``# key: value`` comment of the case's expected.txt (``category``, ``xfail``)."""
    for line in (BAD / case / "expected.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def expand_template(text: str) -> str:
    out: list[str] = []
    size: int | None = None
    for line in text.splitlines(keepends=True):
        match = _DIRECTIVE.fullmatch(line.rstrip("\n"))
        if match is None:
            out.append(line)
            continue
        kind, count, body = match.group(1), int(match.group(2)), match.group(3) or ""
        if kind == "exact":
            size = count
        else:
            copies = [body.replace("{i}", str(i)) for i in range(count)]
            out.append(("\n" if kind == "repeat" else "").join(copies) + "\n")
    expanded = "".join(out)
    if size is not None:
        padding = size - len(expanded.encode("utf-8")) - 1
        assert padding > 0, f"template is already {len(expanded)} bytes, more than #@exact {size}"
        expanded += "#" * padding + "\n"
    return expanded


def materialize_case(case: str, into: Path) -> Path:
    """A private copy of ``case`` under ``into`` with its templates expanded; returns its directory."""
    target = into / case
    shutil.copytree(BAD / case, target, ignore=shutil.ignore_patterns("expected.txt"))
    for template in sorted(target.rglob(f"*{TEMPLATE_SUFFIX}")):
        template.with_suffix("").write_text(expand_template(template.read_text(encoding="utf-8")), encoding="utf-8")
        template.unlink()
    return target


def _corpus() -> list[ParameterSet]:
    """Every case; a case marked ``# xfail:`` documents a known gap and must fail until fixed."""
    params = []
    for case in CASES:
        reason = case_header(case, "xfail")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, marks=marks, id=case))
    return params


@pytest.mark.parametrize("case", _corpus())
def test_bad_manifest_reports_exact_file_line_and_field(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(materialize_case(case, tmp_path))
    got = [str(issue) for issue in _issues(".")]
    assert got == expected_lines(case)


@pytest.mark.parametrize("case", _corpus())
def test_no_error_message_ever_contains_an_api_key(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(materialize_case(case, tmp_path))
    with pytest.raises(ManifestError) as info:
        load_manifests(".")
    assert not API_KEY_PATTERN.search(str(info.value))
    assert not API_KEY_PATTERN.search(repr(info.value.issues))


def test_corpus_covers_the_required_cases() -> None:
    required = {
        "unknown_field_typo", "duplicate_agent_id_across_files", "unknown_tier", "caps_over_total",
        "three_decimals", "negative_amount", "invalid_yaml", "alias", "inline_api_key",
        "wrong_api_version", "floor_above_target", "multiple_errors",
    }  # fmt: skip
    assert required <= set(CASES)


def test_corpus_has_100_cases_spread_over_every_category() -> None:
    categories = {case: case_header(case, "category") for case in CASES}
    assert not [case for case, category in categories.items() if category is None]
    assert len(CASES) >= 100
    counts = Counter(categories.values())
    assert {c: counts[c] for c in REQUIRED_CATEGORIES if counts[c] < REQUIRED_CATEGORIES[c]} == {}
    assert all(expected_lines(case) for case in CASES)


def test_huge_cases_really_exceed_the_limit(tmp_path: Path) -> None:
    huge = [case for case in CASES if case_header(case, "category") == "huge-file"]
    for case in huge:
        sizes = [f.stat().st_size for f in materialize_case(case, tmp_path).rglob("*.y*ml")]
        assert max(sizes) > MAX_FILE_BYTES, case
    (one_over,) = materialize_case("huge_one_byte_over", tmp_path / "again").glob("*.yaml")
    assert one_over.stat().st_size == MAX_FILE_BYTES + 1


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.tuples(st.text("ab \t_:", max_size=60), st.booleans()), min_size=1, max_size=12),
    breaks=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=12, max_size=12),
    piece=st.integers(min_value=1, max_value=97),
)
def test_oversized_files_are_scanned_for_keys_like_any_other(
    lines: list[tuple[str, bool]], breaks: list[str], piece: int
) -> None:
    """The huge-file cases rely on the chunked scan finding exactly the lines the whole-text
    scan finds, wherever the chunk boundaries fall (inside a key, between "\r" and "\n")."""
    key = "a2a_free_000000000000000000000000"
    pairs = zip(lines, breaks[: len(lines)], strict=True)
    text = "".join((body[:7] + key + body[7:] if has_key else body) + br for (body, has_key), br in pairs)
    data = text.encode()
    chunks = [data[i : i + piece] for i in range(0, len(data), piece)]
    assert key_lines_in_chunks(chunks, tail=64) == key_lines(text)


def test_inline_api_key_is_reported_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    case = BAD / "inline_api_key"
    key = API_KEY_PATTERN.search((case / "fleet.yaml").read_text(encoding="utf-8"))
    assert key is not None
    monkeypatch.chdir(case)
    with pytest.raises(ManifestError) as info:
        load_manifests(".")
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.field) == ("fleet.yaml", 18, "spec.agents[0].labels.apiKey")
    assert "keys must never be committed in a manifest" in issue.message
    assert "GREENHELIX_API_KEY_FILE" in issue.message
    assert key.group(0) not in str(info.value)
    assert key.group(0)[4:] not in str(info.value)


def test_multiple_errors_span_files_and_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD / "multiple_errors")
    issues = _issues(".")
    assert {i.file for i in issues} == {"fleet.yaml", "workers.yaml"}
    assert len(issues) >= 5


# --- paths as given --------------------------------------------------------------------------


def test_file_names_are_relative_when_the_path_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (issue,) = _issues("tests/data/bad_manifests/unknown_tier")
    assert issue.file == "tests/data/bad_manifests/unknown_tier/fleet.yaml"
    assert issue.line == 17


def test_file_names_are_absolute_when_the_path_is() -> None:
    (issue,) = _issues(BAD / "unknown_tier")
    assert issue.file == str(BAD / "unknown_tier" / "fleet.yaml")


def test_missing_path() -> None:
    (issue,) = _issues("/nonexistent/finops-manifests")
    assert issue == ManifestIssue("/nonexistent/finops-manifests", None, "", "no such file or directory")


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a manifest")
    (issue,) = _issues(tmp_path)
    assert issue.message == f"no manifests found in {tmp_path} (looked for *.yaml and *.yml files)"


def test_directory_with_only_empty_documents(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("# nothing yet\n---\n")
    (issue,) = _issues(tmp_path)
    assert issue.message.startswith("no manifests found in")


def test_recursive_yml_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "fleet.yml").write_text(FLEET_HEAD)
    sub = tmp_path / "teams" / "a"
    sub.mkdir(parents=True)
    group = (
        "apiVersion: finops.greenhelix.net/v1\nkind: AgentGroup\nmetadata: {name: a}\n"
        "spec:\n  fleet: research\n  agents: [{id: res-01, tier: researcher}]\n"
    )
    (sub / "group.yaml").write_text(group)
    (tmp_path / ".draft.yaml").write_text("this: [is not valid")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text("this: [is not valid")
    state = load_manifests(tmp_path)
    (agent,) = state.agents()
    assert agent.source == Source(str(sub / "group.yaml"), 6)


def test_file_over_one_mebibyte_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(FLEET_HEAD + "#" * (1024 * 1024) + "\n")
    (issue,) = _issues(tmp_path)
    assert (issue.file, issue.line) == (str(big), None)
    assert "larger than the 1 MiB limit" in issue.message


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(FLEET_HEAD.encode() + b"# caf\xe9\n")
    (issue,) = _issues(tmp_path)
    assert (issue.line, issue.message) == (13, "file is not valid UTF-8")


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    issues = _issues(tmp_path)
    assert time.monotonic() - started < 2
    assert len(issues) == 9  # one per line holding aliases; nothing was expanded
    assert all("YAML bomb" in i.message for i in issues)
    assert {i.line for i in issues} == set(range(2, 11))


def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    (issue,) = _issues(tmp_path)
    assert "nested more than" in issue.message


def test_api_key_in_a_comment_is_reported_without_a_field(tmp_path: Path) -> None:
    key = "a2a_pro_" + "0123456789abcdef" * 2
    (tmp_path / "f.yaml").write_text(FLEET_HEAD + f"# old key: {key}\n")
    (issue,) = _issues(tmp_path)
    assert (issue.line, issue.field) == (13, "")
    assert key not in str(issue)


def test_api_key_in_a_block_scalar_points_at_its_line(tmp_path: Path) -> None:
    key = "a2a_free_" + "fa63aab628959ce3b1ec48a5"
    text = FLEET_HEAD + "  agents:\n    - id: res-01\n      tier: researcher\n      labels:\n        note: |\n"
    text += f"          first\n          {key}\n"
    (tmp_path / "f.yaml").write_text(text)
    (issue,) = _issues(tmp_path)
    assert (issue.line, issue.field) == (19, "spec.agents[0].labels.note")


def test_api_key_in_an_unparseable_file_is_still_reported(tmp_path: Path) -> None:
    key = "a2a_free_" + "fa63aab628959ce3b1ec48a5"
    (tmp_path / "f.yaml").write_text(f"key: {key}\nbroken: [\n")
    issues = _issues(tmp_path)
    assert (issues[0].line, issues[0].field) == (1, "")
    assert any(i.message.startswith("invalid YAML") for i in issues)
    assert key not in "\n".join(map(str, issues))


def test_key_echoed_by_another_error_is_redacted(tmp_path: Path) -> None:
    key = "a2a_free_" + "fa63aab628959ce3b1ec48a5"
    text = FLEET_HEAD.replace('dailyBudgetTotal: "200.00"', f"dailyBudgetTotal: {key}")
    text = text.replace("kind: Fleet", f"kind: Fleet\n{key}: 1")
    (tmp_path / "f.yaml").write_text(text)
    out = "\n".join(map(str, _issues(tmp_path)))
    assert key not in out
    assert "<redacted API key>" in out


# --- semantics through the loader ------------------------------------------------------------


def test_agent_overrides_win_field_by_field(tmp_path: Path) -> None:
    text = FLEET_HEAD + (
        "  agents:\n"
        "    - id: res-01\n"
        "      tier: researcher\n"
        '      dailyCap: "35.00"\n'
        "      funding: {floor: 25}\n"
        "      alerts: {thresholds: [50, 100]}\n"
        "      labels: {team: x}\n"
    )
    text = text.replace("funding: {floor", "labels: {team: research, env: prod}\n    funding: {floor", 1)
    (tmp_path / "f.yaml").write_text(text)
    (agent,) = load_manifests(tmp_path).agents()
    assert agent.daily_cap == Decimal("35.00")
    assert agent.monthly_cap == Decimal("600.00")
    assert agent.funding_floor == Decimal("25.00")
    assert agent.funding_target == Decimal("40.00")
    assert agent.alert_thresholds == (50, 100)
    assert dict(agent.labels) == {"team": "x", "env": "prod"}


def test_amounts_as_numbers_are_accepted_exactly(tmp_path: Path) -> None:
    text = FLEET_HEAD.replace('{dailyCap: "30.00", monthlyCap: "600.00"}', "{dailyCap: 30.5, monthlyCap: 600}")
    text += "  agents: [{id: res-01, tier: researcher}]\n"
    (tmp_path / "f.yaml").write_text(text)
    (agent,) = load_manifests(tmp_path).agents()
    assert (agent.daily_cap, agent.monthly_cap) == (Decimal("30.50"), Decimal("600.00"))


def test_schema_errors_do_not_cause_spurious_unknown_fleet_errors(tmp_path: Path) -> None:
    broken = FLEET_HEAD.replace("currency: USD", "currency: usd")
    (tmp_path / "a.yaml").write_text(broken)
    group = (
        "apiVersion: finops.greenhelix.net/v1\nkind: AgentGroup\nmetadata: {name: a}\n"
        "spec:\n  fleet: research\n  agents: [{id: res-01, tier: researcher}]\n"
    )
    (tmp_path / "b.yaml").write_text(group)
    issues = _issues(tmp_path)
    assert [i.field for i in issues] == ["spec.currency"]


def test_issues_are_in_file_then_line_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD / "multiple_errors")
    issues = _issues(".")
    keys = [(i.file, i.line or 0) for i in issues]
    assert keys == sorted(keys)


def test_error_text_is_one_line_per_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD / "multiple_errors")
    with pytest.raises(ManifestError) as info:
        load_manifests(".")
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.issues)
    assert all(re.match(r"^[\w./-]+\.ya?ml:\d+: ", line) for line in lines)


def test_os_pathlike_is_accepted() -> None:
    state = load_manifests(os.fspath(MANIFESTS))
    assert len(state.agents()) == 5


GROUP = (
    "apiVersion: finops.greenhelix.net/v1\nkind: AgentGroup\nmetadata: {name: a}\n"
    "spec:\n  fleet: research\n  agents: [{id: res-01, tier: researcher}]\n"
)


@pytest.mark.parametrize(
    ("broken_fleet", "field"),
    [
        (FLEET_HEAD.replace("finops.greenhelix.net/v1", "finops.greenhelix.net/v2"), "apiVersion"),
        (FLEET_HEAD.replace("kind: Fleet", "kind: Flet"), "kind"),
        (FLEET_HEAD.replace('"200.00"', '"200.001"'), "spec.dailyBudgetTotal"),
    ],
)
def test_a_broken_fleet_does_not_make_its_groups_unknown(tmp_path: Path, broken_fleet: str, field: str) -> None:
    (tmp_path / "a.yaml").write_text(broken_fleet)
    (tmp_path / "b.yaml").write_text(GROUP)
    assert [i.field for i in _issues(tmp_path)] == [field]


def test_control_characters_are_invalid_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(FLEET_HEAD + "# bell \x07\n")
    (issue,) = _issues(tmp_path)
    assert (issue.line, issue.message) == (
        13,
        "invalid YAML: unacceptable character #x0007 (special characters are not allowed)",
    )


@pytest.mark.parametrize(
    "value", ["!!python/object/apply:os.system [echo]", "!!python/name:os.system ''", "!custom {a: 1}"]
)
def test_python_and_custom_tags_are_refused_not_constructed(tmp_path: Path, value: str) -> None:
    (tmp_path / "a.yaml").write_text(FLEET_HEAD + f"  x: {value}\n")
    (issue,) = _issues(tmp_path)
    assert (issue.line, issue.field) == (13, "spec.x")
    assert issue.message.startswith("unsupported YAML tag '!")


def test_key_in_a_non_utf8_file_is_still_reported(tmp_path: Path) -> None:
    key = "a2a_free_" + "fa63aab628959ce3b1ec48a5"
    (tmp_path / "a.yaml").write_bytes(f"token: {key}\n# caf".encode() + b"\xe9\n")
    issues = _issues(tmp_path)
    assert [(i.line, i.message.split(";")[0]) for i in issues] == [
        (1, "looks like an API key"),
        (2, "file is not valid UTF-8"),
    ]
    assert key not in "\n".join(map(str, issues))


def test_literal_errors_show_yaml_spelling(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(FLEET_HEAD.replace("currency: USD", "currency: null"))
    (issue,) = _issues(tmp_path)
    assert issue.message == "must be 'CREDITS', 'USD', 'EUR' or 'GBP', got null"
