"""Starts tonight's rescoring RayJob unless the last one is still going: the one step of the nightly CronJob.

    python start_rescore.py /scheduler/rayjob.yaml

Why not a schedule of KubeRay's own: its RayCronJob (KubeRay >= 1.6, alpha, behind the `RayCronJob` feature
gate) creates a RayJob named after each tick whatever the state of the previous one (it has no
concurrencyPolicy), and a CronJob's `concurrencyPolicy: Forbid` only sees its own short-lived pod. So the RayJob
has a fixed name, which the API server refuses to create twice, and this script decides what to do with the
one it finds:

    none                                     -> create it
    finished (Complete, Failed, ...)         -> delete it, wait until it and its cluster are gone, create it
    anything else (starting, running, retrying, suspended) -> leave it alone, start nothing tonight

It talks to the Kubernetes API as the pod's service account (rbac.yaml grants get/delete on that RayJob and
create on rayjobs) with the standard library and PyYAML only, so it runs in the mapray image as it is.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

# KubeRay's terminal JobDeploymentStatus values (`IsJobDeploymentTerminal`, plus a spec the operator rejected)
FINISHED = frozenset({"Complete", "Failed", "ValidationFailed"})
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class ApiError(Exception):
    pass


class Api:
    """The few RayJob calls the scheduler makes, against one namespace."""

    def __init__(self, base: str, namespace: str, bearer: str, context: ssl.SSLContext | None = None):
        self.rayjobs = f"{base}/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
        self.bearer, self.context = bearer, context

    @classmethod
    def in_cluster(cls) -> Api:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        return cls(f"https://{host}:{port}", (SERVICE_ACCOUNT / "namespace").read_text().strip(),
                   (SERVICE_ACCOUNT / "token").read_text().strip(), context)

    def call(self, method: str, url: str, body: dict | None = None) -> dict | None:
        """The response object, or None when the API answers 404."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.bearer}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise ApiError(f"{method} {url}: HTTP {e.code} {e.read().decode(errors='replace')[:300]}") from None
        except urllib.error.URLError as e:
            raise ApiError(f"{method} {url}: {e.reason}") from None

    def get(self, name: str) -> dict | None:
        return self.call("GET", f"{self.rayjobs}/{name}")

    def delete(self, name: str) -> None:
        # Foreground: the RayJob stays until its RayCluster and submitter Job are gone, so "it is gone" below
        # means last night's pods are gone too
        self.call("DELETE", f"{self.rayjobs}/{name}", {"propagationPolicy": "Foreground"})

    def create(self, manifest: dict) -> None:
        self.call("POST", self.rayjobs, manifest)


def deployment_status(rayjob: dict) -> str:
    return (rayjob.get("status") or {}).get("jobDeploymentStatus") or ""


def wait_until_gone(api: Api, name: str, wait_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while api.get(name) is not None:
        if time.monotonic() > deadline:
            raise ApiError(f"RayJob {name} still exists {wait_s:g} s after its deletion")
        time.sleep(poll_s)


def start(api: Api, manifest: dict, wait_s: float = 600, poll_s: float = 5) -> str:
    """Creates the RayJob of `manifest` unless one of its name is still going; says what it did."""
    name = manifest["metadata"]["name"]
    current = api.get(name)
    if current is not None:
        state = deployment_status(current)
        if state not in FINISHED:
            return f"RayJob {name} is still {state or 'starting'}: nothing started tonight"
        api.delete(name)
        wait_until_gone(api, name, wait_s, poll_s)
    api.create(manifest)
    return f"RayJob {name} created" + (f" (the last one had ended {state})" if current is not None else "")


def main(argv: list[str]) -> int:
    manifest = yaml.safe_load(Path(argv[0]).read_text())
    try:
        print(f"start_rescore: {start(Api.in_cluster(), manifest)}")
    except ApiError as e:
        print(f"start_rescore: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
