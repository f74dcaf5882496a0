"""A small kustomize renderer: the subset this repository's kustomizations use.

`kubectl kustomize` is the reference; this exists so the manifest tests run offline on machines
without kubectl (test_manifests.py compares the two when kubectl is installed). Supported:

  resources   files (one or more YAML documents) and directories holding a kustomization
  components  directories holding a `kind: Component`: its resources join the including
              kustomization's, then its patches apply to everything gathered so far
  namespace   set on every namespaced object; a Namespace object is renamed, as kustomize does
  images      name -> newName / newTag / digest, on every `containers` / `initContainers` list
  patches     `path:` or inline `patch:`, optional `target:` (group, version, kind, name,
              namespace); a patch that is a YAML list is a JSON 6902 patch (add, replace, remove,
              test), otherwise a merge patch of maps (null deletes). A merge patch that touches a
              list is refused: kustomize merges some lists by key, so use a JSON 6902 patch

Anything else in a kustomization is refused rather than silently ignored. Transformers run in
kustomize's order: resources, then components, then the kustomization's own patches, namespace
and images.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


class KustomizeError(ValueError):
    pass


class Loader(yaml.SafeLoader):
    """YAML as the Kubernetes API reads it: timestamps stay strings (sigs.k8s.io/yaml)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_all(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=Loader) if doc is not None]


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def kustomization_file(folder: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise KustomizeError(f"no kustomization file in {folder}")


def render(folder: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize <folder>` would print, in resource order."""
    return accumulate(Path(folder), [], component=False)


def accumulate(
    folder: Path, objects: list[dict[str, Any]], component: bool
) -> list[dict[str, Any]]:
    """Add the folder's resources to `objects` and run its transformers over all of them.

    A Kustomization starts from an empty list; a Component works on its includer's list.
    """
    spec = load(kustomization_file(folder).read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder}: fields this renderer does not support: {sorted(unknown)}")
    kind = spec.get("kind", "Kustomization")
    if component and kind != "Component":
        raise KustomizeError(f"{folder} is a {kind}, not a Component: list it under resources")
    if not component and kind == "Component":
        raise KustomizeError(f"{folder} is a Component: list it under components")
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects.extend(render(path))
        elif path.is_file():
            objects.extend(load_all(path.read_text()))
        else:
            raise KustomizeError(f"{folder}: resource {entry!r} does not exist")
    for entry in spec.get("components", []):
        if not (folder / entry).is_dir():
            raise KustomizeError(f"{folder}: component {entry!r} is not a directory")
        accumulate(folder / entry, objects, component=True)
    for patch in spec.get("patches", []):
        apply_patch(folder, patch, objects)
    if "namespace" in spec:
        set_namespace(objects, spec["namespace"])
    for image in spec.get("images", []):
        set_image(objects, image)
    seen: set[tuple[str, str, str, str]] = set()
    for obj in objects:
        key = identity(obj)
        if key in seen:
            raise KustomizeError(f"{folder}: {key} is defined twice")
        seen.add(key)
    return objects


def identity(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""), meta["name"])


def set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if obj.get("kind") == "Namespace":
            meta["name"] = namespace
        elif obj.get("kind") not in CLUSTER_SCOPED:
            meta["namespace"] = namespace


def split_image(image: str) -> tuple[str, str, str]:
    """name, ":tag" or "", "@digest" or ""."""
    name, _, digest = image.partition("@")
    digest = f"@{digest}" if digest else ""
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon:]
    return name, tag, digest


def set_image(objects: list[dict[str, Any]], rule: dict[str, Any]) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and "image" in container:
                            container["image"] = rewrite(container["image"])
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    def rewrite(image: str) -> str:
        name, tag, digest = split_image(image)
        if name != rule["name"]:
            return image
        name = rule.get("newName", name)
        if "digest" in rule:
            return f"{name}@{rule['digest']}"
        if "newTag" in rule:
            return f"{name}:{rule['newTag']}"
        return f"{name}{tag}{digest}"

    for obj in objects:
        visit(obj)


def group_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"patch target fields this renderer does not support: {unknown}")
    group, version = group_version(obj.get("apiVersion", ""))
    meta = obj.get("metadata") or {}
    actual = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(actual[k] == v for k, v in target.items())


def apply_patch(folder: Path, entry: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"{folder}: patch fields this renderer does not support: {unknown}")
    text = (folder / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = load_all(text)
    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if "target" not in entry:
            raise KustomizeError(f"{folder}: a JSON 6902 patch needs a target")
        hit = [o for o in objects if matches(o, entry["target"])]
        if not hit:
            raise KustomizeError(f"{folder}: patch target {entry['target']} matches nothing")
        for obj in hit:
            for op in docs[0]:
                json6902(obj, op)
        return
    for doc in docs:
        if "target" in entry:
            hit = [o for o in objects if matches(o, entry["target"])]
        else:
            group, version = group_version(doc.get("apiVersion", ""))
            target = {"group": group, "version": version, "kind": doc.get("kind")}
            target["name"] = doc["metadata"]["name"]
            hit = [o for o in objects if matches(o, target)]
        if not hit:
            raise KustomizeError(f"{folder}: merge patch for {doc.get('kind')} matches nothing")
        for obj in hit:
            merged = merge(obj, doc)
            obj.clear()
            obj.update(merged)


def merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, list):
            raise KustomizeError(f"merge patch sets the list {key!r}: use a JSON 6902 patch")
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: dict[str, Any], op: dict[str, Any]) -> None:
    parts = _pointer(op["path"])
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        elif kind == "test":
            if parent[index] != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
        else:
            raise KustomizeError(f"JSON 6902 op {kind!r} is not supported here")
        return
    if kind == "add":
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "replace":
        if last not in parent:
            raise KustomizeError(f"replace: {op['path']} does not exist")
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        if last not in parent:
            raise KustomizeError(f"remove: {op['path']} does not exist")
        del parent[last]
    elif kind == "test":
        if parent.get(last) != op["value"]:
            raise KustomizeError(f"test failed at {op['path']}")
    else:
        raise KustomizeError(f"JSON 6902 op {kind!r} is not supported here")
