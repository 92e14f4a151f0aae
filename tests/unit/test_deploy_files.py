"""The shipped deployment files (deploy/, .dockerignore) are parsed and checked against the
code they deploy: every finops invocation is accepted by the real CLI, every Secret a
Kubernetes variant references is defined in it, every pod meets the "restricted" Pod Security
Standard, the Dockerfile's base is pinned, .dockerignore keeps finops' state out of any image,
and the systemd unit is hardened. ``kubernetes-validate`` (bundled schemas, no network),
``kubectl kustomize`` and ``systemd-analyze`` run when they are installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controller.cli.app import cli
from controller.daemon import metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VARIANTS = ("single", "ha")
UNIT = DEPLOY / "systemd" / "finops.service"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

PLACEHOLDER = "REPLACE_ME"
SECRETS_DIR = "/run/finops/secrets"
PSS_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
"""The volume types the "restricted" Pod Security Standard allows."""
PENDING_ENV: dict[str, str] = {}
"""finops environment variables the deploy files set before the code reading them is merged."""


# --- the CLI ----------------------------------------------------------------------------------


def finops_command(argv: list[str]) -> click.Command:
    """Parse ``argv`` (after ``finops``) exactly as the CLI would, without running it: an
    unknown command, flag, or a value the flag refuses raises ``click.UsageError``."""
    ctx = click.Context(cli, info_name="finops")
    name, *args = argv
    command = cli.get_command(ctx, name)
    assert command is not None, f"finops has no command {name!r}"
    command.make_context(name, list(args), parent=ctx)
    return command


def known_env_names() -> set[str]:
    """Every environment variable finops reads: the CLI's option envvars and the names in its source."""
    ctx = click.Context(cli, info_name="finops")
    names: set[str] = set()
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert command is not None
        commands = [command, *getattr(command, "commands", {}).values()]
        for cmd in commands:
            for param in cmd.params:
                envvar = getattr(param, "envvar", None)
                names.update([envvar] if isinstance(envvar, str) else (envvar or []))
    source = "\n".join(p.read_text() for p in (ROOT / "controller").rglob("*.py"))
    names.update(re.findall(r"\b(?:FINOPS|GREENHELIX)_[A-Z_]+\b", source))
    return names


def check_env_names(names: set[str], where: str) -> None:
    ours = {n for n in names if n.startswith(("FINOPS_", "GREENHELIX_"))}
    unknown = ours - known_env_names() - set(PENDING_ENV)
    assert not unknown, f"{where} sets environment variables finops never reads: {sorted(unknown)}"


def test_the_cli_check_refuses_what_the_cli_refuses() -> None:
    """The checker itself is not a no-op: a misspelt flag, a bad value, an unknown command."""
    finops_command(["run", "--metrics-port", "9464", "--log-format", "json"])
    for argv in (["run", "--metric-port", "9464"], ["run", "--log-format", "xml"], ["runn"]):
        with pytest.raises((click.UsageError, AssertionError)):
            finops_command(argv)


# --- Kubernetes -------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.name}: expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def main(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod["containers"] if c["name"] == "finops"]
        return container

    def secrets(self) -> dict[str, set[str]]:
        return {
            s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in self.of_kind("Secret")
        }


def load_variant(name: str) -> Variant:
    directory = KUBERNETES / name
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, f"{name}: kustomization resources {listed} != files {on_disk}"
    docs = [d for f in listed for d in yaml.safe_load_all((directory / f).read_text()) if d is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    return Variant(name, docs)


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    return load_variant(request.param)


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def test_every_pod_meets_the_restricted_pod_security_standard(variant: Variant) -> None:
    pod = variant.pod
    pod_ctx = pod.get("securityContext", {})
    for forbidden in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        assert not pod.get(forbidden), f"{variant.name}: {forbidden}"
    for volume in pod["volumes"]:
        types = set(volume) - {"name"}
        assert types <= PSS_VOLUME_TYPES, f"{variant.name}: volume {volume['name']} is {types}"
    assert pod.get("automountServiceAccountToken") is False  # finops never calls the Kubernetes API
    if "fsGroup" in pod_ctx:  # "Always" would make key files group-writable on every mount
        assert pod_ctx.get("fsGroupChangePolicy") == "OnRootMismatch"
    for c in containers(pod):
        ctx = c.get("securityContext", {})
        where = f"{variant.name}/{c['name']}"
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("privileged") is not True, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not ctx.get("capabilities", {}).get("add"), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) not in (0, None), where
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert "memory" in resources.get("limits", {}), where
    # A read-only root file system: /tmp is a volume.
    assert "/tmp" in {m["mountPath"] for m in variant.main["volumeMounts"]}
    assert variant.one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_finops_invocation_is_accepted_by_the_cli(variant: Variant) -> None:
    for c in containers(variant.pod):
        if "command" in c:
            continue  # the init container's shell script
        assert c["args"][0] == "run"
        command = finops_command(c["args"])
        assert command.name == "run"
    check_env_names({e["name"] for c in containers(variant.pod) for e in c.get("env", [])}, variant.name)


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_probes_and_monitoring_reach_the_daemons_endpoint(variant: Variant) -> None:
    main, args = variant.main, variant.main["args"]
    port = int(_flag(args, "--metrics-port"))
    assert _flag(args, "--metrics-host") == "0.0.0.0"  # reachable from the kubelet and Prometheus
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["metrics"] == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = main[probe]["httpGet"]
        assert http["path"] in metrics._Handler.routes, (probe, http)
        assert http["port"] in ports or http["port"] == port
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The pod outlives finops' own SIGTERM deadline, so an in-flight pass finishes.
    run = finops_command(["run"])
    stop_timeout = next(p.default for p in run.params if p.name == "stop_timeout")
    assert isinstance(stop_timeout, float)
    assert variant.pod["terminationGracePeriodSeconds"] > stop_timeout
    labels = variant.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    monitor = variant.one("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports)
    assert {e.get("path", "/metrics") for e in monitor["spec"]["podMetricsEndpoints"]} == {"/metrics"}
    policy = variant.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {port}


def _copied_secrets(pod: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """What the init container copies: destination file name -> (secret volume, key)."""
    (init,) = pod["initContainers"]
    script = " ".join(init["args"]).replace("\\\n", " ")
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    out = {}
    for src, dst in re.findall(r"\b([\w.-]+/[\w.-]+):([\w.-]+)\b", script):
        directory, key = src.split("/")
        out[dst] = (mounts[f"/secrets-in/{directory}"], key)
    assert out, "the init container copies no secret"
    assert PLACEHOLDER in script  # it refuses placeholders
    return out


def test_every_referenced_secret_is_defined_with_its_keys(variant: Variant) -> None:
    defined = variant.secrets()
    pod = variant.pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    referenced: set[str] = set()
    for volume in volumes.values():
        if "secret" in volume:
            secret = volume["secret"]
            name = secret["secretName"]
            referenced.add(name)
            assert name in defined, f"{variant.name}: volume {volume['name']} names undefined Secret {name}"
            for item in secret.get("items", []):
                assert item["key"] in defined[name], (name, item)
    for c in containers(pod):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add(ref["name"])
                assert ref["key"] in defined.get(ref["name"], set()), f"{variant.name}: {env['name']} -> {ref}"
    assert referenced == set(defined), f"{variant.name}: Secrets defined but never used: {set(defined) - referenced}"
    # Each file the init container copies comes from a key of a mounted Secret ...
    copied = _copied_secrets(pod)
    for dst, (volume, key) in copied.items():
        secret = volumes[volume]["secret"]
        keys = {i["path"]: i["key"] for i in secret.get("items", [])} or {k: k for k in defined[secret["secretName"]]}
        assert key in keys, f"{variant.name}: {dst} copies {key}, not in Secret {secret['secretName']}"
    # ... and every secret file the daemon is pointed at is one it copies.
    pointed = {
        PurePosixPath(v).name
        for c in containers(pod)
        for v in [str(e.get("value", "")) for e in c.get("env", [])]
        + [token.split("=", 1)[-1] for token in shlex.split(_ssh_command(c))]
        if v.startswith(SECRETS_DIR + "/")
    }
    assert pointed and pointed <= set(copied), (pointed, copied)
    # Secrets stay private: the source volumes are read by the init container only.
    main_volumes = {m["name"] for m in variant.main["volumeMounts"]}
    assert not main_volumes & {v for v, _ in copied.values()}


def _ssh_command(container: dict[str, Any]) -> str:
    return next((str(e["value"]) for e in container.get("env", []) if e["name"] == "GIT_SSH_COMMAND"), "")


def test_placeholders_are_obvious_and_never_look_like_a_key(variant: Variant) -> None:
    from policies.keyprint import looks_like_key_material

    for secret in variant.of_kind("Secret"):
        for key, value in secret.get("stringData", {}).items():
            assert not looks_like_key_material(str(value)), (secret["metadata"]["name"], key)
            if key != "url":
                assert PLACEHOLDER in str(value), (secret["metadata"]["name"], key)
        assert "data" not in secret  # base64 would hide what is a placeholder


def test_single_replica_sqlite_variant() -> None:
    single = load_variant("single")
    deployment = single.one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = single.one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    state = next(v for v in single.pod["volumes"] if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "FINOPS_STATE_URL" not in {e["name"] for e in single.main["env"]}
    # The readiness probe is /readyz: invalid manifests or a revision awaiting approval show.
    assert single.main["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_ha_variant_two_replicas_on_postgresql() -> None:
    ha = load_variant("ha")
    deployment = ha.one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0  # never a third replica
    labels = spec["template"]["metadata"]["labels"]
    anti = ha.pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"].items() <= labels.items()
    budget = ha.one("PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    env = {e["name"]: e for e in ha.main["env"]}
    assert env["FINOPS_STATE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "finops-postgresql"
    assert env["PGPASSFILE"]["value"].startswith(SECRETS_DIR)
    assert env["FINOPS_KEY_ENCRYPTION_KEY_FILE"]["value"].startswith(SECRETS_DIR)
    postgresql = next(s for s in ha.of_kind("Secret") if s["metadata"]["name"] == "finops-postgresql")
    netloc = str(postgresql["stringData"]["url"]).split("//", 1)[1].split("/", 1)[0]
    assert ":" not in netloc.rpartition("@")[0], "no password in the state URL"
    assert not ha.of_kind("PersistentVolumeClaim")  # nothing shared lives on a volume
    # The standby answers 503 on /readyz by design: readiness must not be /readyz, or every
    # rolling update would wait forever for a standby to become Ready.
    assert ha.main["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # Both replicas sign alerts with the same secret: an absolute path into the copied Secrets.
    assert "alert-signing.secret" in _copied_secrets(ha.pod)


def test_kubernetes_validate_accepts_every_core_resource(variant: Variant) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    checked = 0
    for doc in variant.docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no bundled schema
        kv.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 6
    # The validator is not a no-op: a misspelt field fails it.
    broken = json.loads(json.dumps(variant.one("Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_each_variant(variant: Variant) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / variant.name)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in variant.docs
    )
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "finops"
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    images = {c["image"] for c in containers(deployment["spec"]["template"]["spec"])}
    assert images == {"registry.example.com/finops:0.1.0"}


# --- Dockerfile and .dockerignore -------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_pinned_non_root_and_copies_only_the_package() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    froms = [rest for word, rest in instructions if word == "FROM"]
    for base in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.split()[0])
        assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", image), f"base image not pinned by digest: {image}"
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), "the image runs as a numeric non-root user"
    assert any(word == "WORKDIR" for word, _ in final)
    entrypoint = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    assert entrypoint == ["finops"]
    finops_command(cmd)
    env_names = {m for word, rest in final if word == "ENV" for m in re.findall(r"\b([A-Z_]+)=", rest)}
    check_env_names(env_names, "the Dockerfile")
    rules = dockerignore_rules()
    for word, rest in instructions:
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        if "--from=" in rest:
            continue
        *sources, _dest = parts
        for source in sources:
            assert source not in (".", "./", "*"), f"{word} {rest}: never copy the whole context"
            # ... and what it copies survives the .dockerignore
            probe = source.rstrip("/") + ("/__init__.py" if (ROOT / source).is_dir() else "")
            assert not ignored(rules, probe), f"{word} {source}: excluded by .dockerignore"


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    exclusion: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (moby/patternmatcher): ``**`` any number of directories,
    ``*`` and ``?`` within one path segment."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if i + 1 == len(pattern):
                    out += ".*"
                elif pattern[i + 1] == "/":
                    out += "(.*/)?"
                    i += 1
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def dockerignore_rules(text: str | None = None) -> list[Rule]:
    rules = []
    for raw in (DOCKERIGNORE.read_text() if text is None else text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip())).lstrip("/")
        rules.append(Rule(_pattern_regex(pattern), exclusion))
    return rules


def ignored(rules: list[Rule], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (the last matching rule wins;
    a rule matching a parent directory matches everything under it)."""
    parts = PurePosixPath(path).parts
    candidates = [path] + ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    result = False
    for rule in rules:
        if any(rule.regex.match(c) for c in candidates):
            result = not rule.exclusion
    return result


SENSITIVE = [
    ".finops/state-sandbox.db",
    ".finops/secrets/sandbox/res-01.key",
    ".finops/sandbox/admin.key",
    ".finops/alert-signing.secret",
    ".finops/generated-secrets/state-sandbox/gateway-webhook-research.secret",
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/finops.pth",
    ".git/config",
    "admin.key",
    "deploy/kubernetes/ha/alert-signing.secret",
    "controller/.finops/state-sandbox.db",
    "controller/leftover.key",
    "policies/some.secret",
    "controller/.venv/bin/python",
    "id_ed25519",
    "deploy/id_ed25519.pub",
    ".env",
    "manifests/research-fleet.yaml",
    "tests/conftest.py",
]


def test_dockerignore_keeps_state_keys_and_secrets_out_of_the_image() -> None:
    rules = dockerignore_rules()
    for path in SENSITIVE:
        assert ignored(rules, path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "controller/cli/app.py", "policies/spec.py"):
        assert not ignored(rules, path), f"{path} is needed by the image"
    # The matcher is Docker's: a negation re-includes, the last rule wins.
    assert not ignored(dockerignore_rules("*\n!keep\n"), "keep/file")
    assert ignored(dockerignore_rules("!keep\n*\n"), "keep/file")
    assert ignored(dockerignore_rules("**/*.key\n"), "a/b/c.key") and ignored(dockerignore_rules("**/*.key\n"), "c.key")


_segment = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True)


@given(
    prefix=st.lists(_segment, max_size=3),
    danger=st.sampled_from([".finops", ".venv", ".git"]),
    suffix=st.lists(_segment, min_size=1, max_size=3),
)
def test_nothing_under_a_state_venv_or_git_directory_reaches_the_image(
    prefix: list[str], danger: str, suffix: list[str]
) -> None:
    assert ignored(_RULES, "/".join([*prefix, danger, *suffix]))


@given(parts=st.lists(_segment, min_size=1, max_size=4), ext=st.sampled_from([".key", ".secret", ".pem", ".db"]))
def test_no_key_or_secret_file_reaches_the_image_wherever_it_is(parts: list[str], ext: str) -> None:
    for top in ("", "controller/", "policies/"):
        assert ignored(_RULES, top + "/".join(parts) + ext)


_RULES = dockerignore_rules()


# --- systemd ----------------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = "", ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in entries if k == key]


def test_systemd_unit_is_hardened() -> None:
    service = unit_entries(UNIT.read_text())["Service"]
    one = {k: v for k, v in service}
    assert one["User"] not in ("", "root", "0")
    assert one["StateDirectory"] == "finops" and one["StateDirectoryMode"] == "0700"
    assert one["WorkingDirectory"] == "%S/finops"  # the state directory, never /
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["UMask"] == "0077"
    assert one["PrivateTmp"] == "yes" and one["ProtectHome"] == "yes"
    assert one["TimeoutStopSec"] and int(one["TimeoutStopSec"]) > 90  # finops run --stop-timeout
    # Every credential the environment points at is loaded.
    loaded = {v.split(":", 1)[0] for v in _values(service, "LoadCredential")}
    pointed = set(re.findall(r"%d/([\w.-]+)", " ".join(_values(service, "Environment"))))
    assert pointed and pointed <= loaded, pointed - loaded
    env_names = {re.sub(r'^"', "", v).split("=", 1)[0] for v in _values(service, "Environment")}
    check_env_names(env_names, "finops.service")


def test_systemd_exec_start_is_accepted_by_the_cli() -> None:
    service = unit_entries(UNIT.read_text())["Service"]
    (exec_start,) = _values(service, "ExecStart")
    argv = shlex.split(exec_start.replace("${STATE_DIRECTORY}", "/var/lib/finops"))
    assert argv[0].endswith("/bin/finops")
    assert finops_command(argv[1:]).name == "run"


def test_systemd_env_example_names_only_settings_finops_reads_and_no_secret() -> None:
    text = (DEPLOY / "systemd" / "finops.env.example").read_text()
    names = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    check_env_names(names, "finops.env.example")
    assert not {n for n in names if re.search(r"(API_KEY|PASSWORD|SECRET|TOKEN)$", n)}
    for url in re.findall(r"postgresql://\S+", text):
        assert ":" not in url.split("//", 1)[1].split("@")[0], "no password in a state URL"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_at_most_3(tmp_path: Path) -> None:
    copy = tmp_path / "finops.service"
    copy.write_text(UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for finops\.service: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None and "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_knows_every_directive(tmp_path: Path) -> None:
    """Every key is one systemd knows and every value parses (a misspelt hardening directive
    is only a warning to systemd, and the service would run without it)."""
    finops = Path(sys.executable).parent / "finops"  # ExecStart must name an existing program
    copy = tmp_path / "finops.service"
    copy.write_text(UNIT.read_text().replace("/opt/finops/.venv/bin/finops", str(finops)))
    result = _verify(copy)
    output = result.stdout + result.stderr
    if "--recursive-errors" in output:
        pytest.skip("this systemd-analyze has no --recursive-errors (systemd < 250)")
    assert result.returncode == 0 and "ignoring" not in output, output
    # The check is not a no-op: a misspelt directive and a bad value are reported.
    bad = tmp_path / "bad.service"
    bad.write_text(f"[Service]\nExecStart={finops}\nProtectSytem=strict\nNoNewPrivileges=maybe\n")
    reported = _verify(bad)
    assert "Unknown key 'ProtectSytem'" in reported.stderr and "bad.service:4:" in reported.stderr


def test_finops_commands_named_in_comments_exist() -> None:
    """A comment telling the operator to run `finops …` names a real command and real flags."""
    files = [DOCKERFILE, UNIT, *(DEPLOY / "systemd").glob("*.example"), *KUBERNETES.rglob("*.yaml")]
    named = [
        (path, m.group(1))
        for path in files
        for m in re.finditer(r"`finops ([^`]+)`", path.read_text())
    ]
    assert named  # the Dockerfile names `finops run --git`
    for path, invocation in named:
        argv = shlex.split(invocation)
        ctx = click.Context(cli, info_name="finops")
        command: click.Command | None = cli
        while isinstance(command, click.Group) and argv and not argv[0].startswith("-"):
            command = command.get_command(ctx, argv.pop(0))
            assert command is not None, f"{path.name}: `finops {invocation}` names no command"
        flags = {o for p in command.params for o in p.opts + p.secondary_opts} if command else set()
        for word in argv:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{path.name}: `finops {invocation}`: no flag {word}"
