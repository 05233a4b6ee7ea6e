"""Cuts the parts of KubeRay's CRD schemas that deploy/kuberay/ uses into small JSON files for the tests.

    python tests/data/kuberay/vendor_schemas.py KUBERAY_GIT_DIR v1.2.0 v1.7.0

KUBERAY_GIT_DIR is a clone (or bare mirror) of github.com/ray-project/kuberay; each tag's
`ray-operator/config/crd/bases/ray.io_{rayjobs,rayclusters}.yaml` is read with `git show`. Only the `v1`
`openAPIV3Schema` is kept, without `status` and descriptions. Along every path the manifests use, the schema
is kept whole; a property they do not use keeps only its type, so its name stays known (a misspelt field
fails the test's unknown-field check) without the thousands of lines of Pod schema behind it. Rerun after a
manifest starts using a field it did not use before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE.parents[2] / "deploy" / "kuberay"
CRDS = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}
KEPT = ("type", "required", "enum", "anyOf", "pattern", "format", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")
STUB = ("type", "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def used_paths(value) -> dict:
    """The keys a manifest uses, as a tree; list items are merged under "[]"."""
    if isinstance(value, dict):
        return {k: used_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return {"[]": merge([used_paths(v) for v in value])}
    return {}


def merge(trees: list[dict]) -> dict:
    out: dict = {}
    for tree in trees:
        for key, sub in tree.items():
            out[key] = merge([out.get(key, {}), sub])
    return out


def prune(schema: dict, used: dict) -> dict:
    out = {k: schema[k] for k in KEPT if k in schema}
    if "properties" in schema:
        out["properties"] = {name: prune(sub, used[name]) if name in used else {k: sub[k] for k in STUB if k in sub}
                             for name, sub in schema["properties"].items()}
    if "items" in schema:
        out["items"] = prune(schema["items"], used.get("[]", {}))
    if isinstance(schema.get("additionalProperties"), dict):  # a map: its values are merged like list items
        out["additionalProperties"] = prune(schema["additionalProperties"], merge(list(used.values())))
    return out


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True).stdout


def crd_schema(git_dir: str, tag: str, plural: str) -> dict:
    text = git(git_dir, "show", f"{tag}:ray-operator/config/crd/bases/ray.io_{plural}.yaml")
    version = next(v for v in yaml.safe_load(text)["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    return schema


def main(git_dir: str, tags: list[str]) -> None:
    docs = [d for p in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    for tag in tags:
        commit = git(git_dir, "rev-parse", f"{tag}^{{commit}}").strip()
        (HERE / tag).mkdir(exist_ok=True)
        for kind, plural in CRDS.items():
            used = merge([used_paths(d) for d in docs if d.get("kind") == kind])
            schema = prune(crd_schema(git_dir, tag, plural), used)
            out = {"kuberay": tag, "commit": commit, "source": f"ray-operator/config/crd/bases/ray.io_{plural}.yaml",
                   "openAPIV3Schema": schema}
            (HERE / tag / f"{plural}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
