"""Object storage for real (issue 11, item 4): input, models, output and cache on `s3://`, against a real S3 API
server started here (moto in server mode on a free localhost port). Every `mapray` run is a subprocess whose
environment points s3fs (botocore), pyarrow's S3FileSystem (Ray Data's reads, writes and checkpoint) and, through
the local Ray it starts, every Ray worker at that server; the session's own Ray is not involved.

One run story, checked in parts: the suite's DPO run (tests/conftest.py: policy, reference and reward model) with
everything on s3, `mapray score` SIGKILLed with its local Ray while every model stage runs, the same command again
(it resumes from the checkpoint on s3, and its output equals the suite's clean local run), then the policy
rewritten in place on s3 and `mapray rescore`: the reference log-probs and the rewards come from the cache on s3
(neither model is loaded again), and the published output equals a local run of the same config.
A poller lists the output all along: whenever manifest.json is there, scored/, selected/ and rejects/ are exactly
those of a finished run. A URI mapray cannot use stops the run before Ray starts with one line naming its key."""

import collections
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mapray.config import load_config
from mapray.pipeline import score
from mapray.testing.compare import FP32_ATOL, FP32_RTOL, assert_same_rows
from mapray.testing.faults import kill_with_its_local_ray
from mapray.testing.tiny_models import perturbed_copy
from tests.conftest import BAD_LINES, UF, dpo_config, dpo_input_lines, model_config

BUCKET = "mapray-test"
ROLES = ("policy", "reference", "reward")


@dataclass
class S3:
    url: str  # the endpoint
    env: dict  # for a `mapray` subprocess: this server, dummy credentials, nothing of this process's Ray
    fs: object  # s3fs for the test's own reads, no listings cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str, home: Path) -> dict:
    """The environment of a `mapray` run against `endpoint`: botocore (s3fs) and the AWS SDK in pyarrow both read
    AWS_ENDPOINT_URL (pyarrow's S3 from a URI, as Ray Data resolves `s3://`; http from the URL's scheme). The
    caller's AWS profile, config files and instance metadata are kept out; so is the test session's Ray, and the
    suite's in-process vLLM setting (the runs take mapray's own default, as a user's do)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in (
        "RAY_ADDRESS", "PYTHONBREAKPOINT", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(home / "aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
               MAPRAY_CACHE=str(home / "mapray-cache"), RAY_AUTH_MODE="disabled")
    return env


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server in a process of its own: imported here, its Flask app would sit in sys.modules, whose
    context-bound globals vLLM's start-up trips over when it scans modules (later vLLM tests failed so)."""
    import s3fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:  # it answers
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's server did not start on {url}") from None
                time.sleep(0.2)
        fs = s3fs.S3FileSystem(endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True,
                               use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield S3(url, s3_env(url, tmp_path_factory.mktemp("s3-home")), fs)
    finally:
        server.kill()
        server.wait()


def mapray(*args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mapray", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kwargs)


# --- the run story: killed, resumed, rescored with the cache on s3, against a local run ---

def _config(inputs: str, models: dict, out: str, cache: str | None, batch_size: int = 1) -> dict:
    """The suite's DPO run with these models, input, output and cache; batches of one row for the run that is
    killed, so that the kill lands between two checkpointed writes rather than after the last (with batches of 4
    the tiny models' pass once finished all 33 rows between the first commit and the kill: each commit on s3 is a
    few requests, each batch of the tiny models a few milliseconds)."""
    config = dpo_config(models, inputs, out, cache=cache)
    for model in (config["policy"], config["reference"], config["reward"]["model"]):
        model["batch_size"] = batch_size
    return config


class Poller:
    """Lists the output prefix over and over (one ListObjectsV2 each: a consistent view of its keys) while runs
    publish into it."""

    def __init__(self, fs, prefix: str):
        self.fs, self.prefix, self.views = fs, prefix, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                self.views.append(frozenset(self.fs.find(self.prefix)))
            self._stop.wait(0.2)  # the server runs in this process: polling costs it CPU

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def published(view, prefix: str) -> frozenset:
    """The files of the result folders in a listing."""
    return frozenset(k for k in view if k.startswith(tuple(f"{prefix}/{d}/" for d in ("scored", "selected",
                                                                                       "rejects"))))


def _upload(fs, folder: str, prefix: str) -> None:
    """Each file of a checkpoint folder to `prefix/<name>`, replacing what is there (`put` of a folder onto an
    existing prefix would nest it one level down, as `cp -r` does)."""
    for file in sorted(Path(folder).iterdir()):
        fs.put(str(file), f"{prefix}/{file.name}")


def _committed_rows(fs, out: str, kind: str = "run") -> int:
    """Rows a run's (or a generation's: `gen`) checkpoint on s3 records as written."""
    files = [f for f in fs.glob(f"{out}/_staging/{kind}-*/checkpoint/*.parquet")
             if not f.endswith(".pending.parquet")]
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def killed_after_first_write(verb: str, config, env: dict, written) -> int:
    """`mapray VERB --config CONFIG` SIGKILLed with its local Ray once `written()` (rows its checkpoint on s3
    records) is above 0; what it had written when it went down. The S3 server completes a request the killed
    writer had sent (a file's copy into place): that is what the listing shows once it stops changing."""
    run = subprocess.Popen([sys.executable, "-m", "mapray", verb, "--config", str(config)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while not written() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, f"mapray {verb} ended before it could be killed: make it longer"
    kill_with_its_local_ray(run)
    return _settled(written)


def _settled(read, quiet_s: float = 3.0, limit_s: float = 60.0):
    """`read()` once it has returned the same value for `quiet_s` seconds (at most `limit_s` in all)."""
    value, since, started = read(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - started < limit_s:
        time.sleep(0.5)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def model_loads(fs, cache: str, shas: dict) -> dict:
    """Times each model (by role) was loaded: the cache's `_loads/` markers under a folder named by its hash."""
    found = collections.Counter()
    for marker in fs.glob(f"{cache}/**/_loads/*"):
        parts = marker.split("/")
        found.update(role for role, sha in shas.items() if sha in parts)
    return {role: found[role] for role in shas}


def read_output(fs, out: str) -> dict:
    return {"manifest": json.loads(fs.cat(f"{out}/manifest.json")),
            **{name: pq.read_table(f"{out}/{name}", filesystem=fs) for name in ("scored", "selected", "rejects")}}


@pytest.fixture(scope="module")
def story(s3, tiny, tmp_path_factory):
    """Input, models, output and cache on s3: `mapray score` killed after its first checkpointed rows, run again,
    then `mapray rescore` after the policy is rewritten in place. Returns what each step left."""
    fs, home = s3.fs, tmp_path_factory.mktemp("story")
    lines = dpo_input_lines()
    (home / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    fs.put(str(home / "pairs.jsonl"), f"{BUCKET}/in/pairs.jsonl")
    for role in ROLES:
        _upload(fs, tiny[role], f"{BUCKET}/models/{role}")
    out, cache = f"{BUCKET}/out", f"{BUCKET}/cache"
    models = {role: f"s3://{BUCKET}/models/{role}" for role in ROLES}
    config = home / "run.yaml"
    config.write_text(json.dumps(_config(f"s3://{BUCKET}/in/pairs.jsonl", models, f"s3://{out}", f"s3://{cache}")))
    step = {"lines": lines, "home": home}
    with Poller(fs, out) as poller:
        step["done_before"] = killed_after_first_write("score", config, s3.env, lambda: _committed_rows(fs, out))
        step["manifest_after_kill"] = fs.exists(f"{out}/manifest.json")

        # the same command again, its batches of 8 rows: a setting of how the run runs, not of what it computes,
        # so it resumes (as a run killed for memory resumes with a smaller batch)
        config.write_text(json.dumps(_config(f"s3://{BUCKET}/in/pairs.jsonl", models, f"s3://{out}",
                                             f"s3://{cache}", batch_size=8)))
        resumed = mapray("score", "--config", str(config), env=s3.env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        step["first"] = read_output(fs, out)
        step["first_view"] = frozenset(fs.find(out))
        models_run = step["first"]["manifest"]["models"]  # the manifest names a reward model by its config key
        shas = {role: models_run["reward.model" if role == "reward" else role]["sha256"] for role in ROLES}
        step["loads_first"] = model_loads(fs, cache, shas)

        step["new_policy"] = perturbed_copy(tiny["policy"], home / "policy-v2")
        _upload(fs, step["new_policy"], f"{BUCKET}/models/policy")  # the same URI, new weights
        # as a user runs it: without the suite's RAY_DATA_DISABLE_PROGRESS_BARS (Ray Data warns that it is set)
        rescored = mapray("rescore", "--config", str(config),
                          env={k: v for k, v in s3.env.items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"})
        assert rescored.returncode == 0, rescored.stderr[-3000:]
        step["console"] = (rescored.stdout, rescored.stderr)
    step["second"] = read_output(fs, out)
    step["second_view"] = frozenset(fs.find(out))
    step["views"] = poller.views
    new_sha = step["second"]["manifest"]["models"]["policy"]["sha256"]
    step["loads_second"] = model_loads(fs, cache, {**shas, "new policy": new_sha})
    return step


def test_a_killed_driver_resumes_from_its_checkpoint_on_s3(story, dpo_run):
    n, done_before = len(story["lines"]), story["done_before"]
    assert 0 < done_before < n and not story["manifest_after_kill"]
    first = story["first"]
    manifest = first["manifest"]
    assert manifest["resumed"] is True
    # every row the kill left unwritten, and only those, was scored again (cut-short writes on s3 recovered)
    assert manifest["counts"]["model_pass_rows_this_attempt"] == n - done_before
    clean = dpo_run.manifest  # the same config and lines, run once on a local output, nothing killed
    assert {k: manifest["counts"][k] for k in ("input", "scored", "rejected", "selected")} == \
        {k: clean["counts"][k] for k in ("input", "scored", "rejected", "selected")}
    # every input line comes out exactly once, scored or rejected, with the values of the clean run
    ids = first["scored"]["pair_id"].to_pylist() + first["rejects"]["pair_id"].to_pylist()
    assert collections.Counter(ids) == collections.Counter(_pair_id(x) for x in story["lines"])
    rejected = first["rejects"].select(["pair_id", "reason"]).sort_by("pair_id")
    assert rejected == pq.read_table(dpo_run.out / "rejects").select(["pair_id", "reason"]).sort_by("pair_id")
    assert rejected["reason"].to_pylist().count("invalid JSON (Expecting value)") == 1
    assert manifest["counts"]["scored"] > n // 2  # most rows reach the models: the comparison below has teeth
    assert_same_rows(first["scored"].sort_by("pair_id"), pq.read_table(dpo_run.out / "scored").sort_by("pair_id"),
                     {"chosen_logps", "ref_rejected_logps", "reward_chosen", "explicit_margin", "implicit_margin",
                      "map", "map_z"})


def _pair_id(line: bytes) -> str | None:
    """A line's prompt_id; None for a line that is not JSON (its reject has no pair id)."""
    try:
        return json.loads(line)["prompt_id"]
    except json.JSONDecodeError:
        return None


def test_the_rescore_reads_the_reference_log_probs_from_the_cache_on_s3(story):
    first, second = story["loads_first"], story["loads_second"]
    old, new = (story[run]["manifest"]["models"]["policy"]["sha256"] for run in ("first", "second"))
    assert new != old  # the policy rewritten in place is a new model: its copy follows the objects, not the URI
    assert min(first.values()) >= 1  # the killed run and its resume loaded each model (once or twice)
    # the rescore loaded the new policy once, and neither the reference nor the reward model
    assert second == {**first, "new policy": 1}
    manifest = story["second"]["manifest"]
    assert manifest["from_cache_alone"] == ["reference", "reward"]  # their stages started no actor
    assert manifest["resumed"] is False
    assert manifest["counts"]["scored"] == story["first"]["manifest"]["counts"]["scored"]


def test_a_successful_run_prints_its_stages_and_summary_and_nothing_of_rays(story):
    """What the terminal shows of a successful run (the rescore: the new policy's actor, the reference and the
    reward model from the cache on S3): one line per stage, the summary last on stdout; no warning or error line,
    no weight-loading bar, no Ray Data log, no other library's INFO line (botocore's at each s3 read)."""
    stdout, stderr = story["console"]
    noise = [line for line in stderr.splitlines()
             if re.search(r"\b(WARNING|ERROR|Warning)\b|^\[\S+ \S+ [EW] \d+|Loading weights|core_worker|"
                          r"Starting execution|logging_progress|Token authentication|^INFO (?!mapray)", line)]
    assert not noise, "\n".join(noise)
    stages = [line.split(":")[1].strip() for line in stderr.splitlines()
              if line.startswith("mapray: ") and "rows/s" not in line]  # each stage's last line
    assert stages == ["normalize", "cache lookup", "model pass", "cache store", "selection and outputs"], stderr
    assert f"mapray: selection and outputs: {len(story['lines'])} rows in " in stderr  # the pool, every line once
    assert stdout.splitlines()[0].startswith("mapray: ") and "rejected" in stdout, stdout
    assert "invalid_json: invalid JSON" in stdout  # the reasons by code, with an example each


def test_publishing_on_s3_is_manifest_last_and_removes_staging(story):
    out = f"{BUCKET}/out"
    results = {published(story["first_view"], out), published(story["second_view"], out)}
    assert len(results) == 2 and all(results)  # two runs, each with its own files
    with_manifest = [v for v in story["views"] if f"{out}/manifest.json" in v]
    assert with_manifest and published(with_manifest[-1], out) == published(story["second_view"], out)
    for view in with_manifest:  # a reader that sees manifest.json sees one finished run's folders, whole
        assert published(view, out) in results
    for view in (story["first_view"], story["second_view"]):
        assert not [k for k in view if k.startswith(f"{out}/_staging/run-")], sorted(view)


def test_the_output_on_s3_equals_a_local_run_of_the_same_config(story, tiny, local_ray):
    home = story["home"]
    models = {"policy": story["new_policy"], "reference": tiny["reference"], "reward": tiny["reward"]}
    # a pool per model here, where the runs on s3 had every model in one pool (`colocate_models`' default on CPUs):
    # the same values either way
    config = {**_config(str(home / "pairs.jsonl"), models, str(home / "local"), None, batch_size=8),
              "colocate_models": False}
    local = score(load_config(None, base=config))
    assert story["second"]["manifest"]["models_colocated"] and not local["models_colocated"]
    got = story["second"]
    manifest = got["manifest"]
    for key in ("counts", "selection", "pool_moments", "tokenization", "warnings"):
        _assert_close(manifest[key], local[key], key)
    assert {k: m["sha256"] for k, m in manifest["models"].items()} == \
        {k: m["sha256"] for k, m in local["models"].items()}
    for name in ("scored", "selected"):
        assert_same_rows(got[name].sort_by("pair_id"), pq.read_table(home / "local" / name).sort_by("pair_id"),
                         {"chosen_logps", "ref_rejected_logps", "reward_chosen", "implicit_margin", "map_z"})
    rejects = [got["rejects"], pq.read_table(home / "local" / "rejects")]
    s3_rows, local_rows = ({_line(r["source"]): {**r, "source": _line(r["source"])} for r in t.to_pylist()}
                           for t in rejects)
    assert s3_rows == local_rows and len(s3_rows) >= len(BAD_LINES)
    assert all(r["source"].rsplit(":", 1)[0].endswith(f"{BUCKET}/in/pairs.jsonl") for r in got["rejects"].to_pylist())


def _assert_close(got, want, where: str) -> None:
    """Equal, floats to fp32 rounding (`mapray.testing.compare`), through nested dicts and lists."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=FP32_RTOL, abs=FP32_ATOL), where
    else:
        assert got == want, where


def _line(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


# --- a URI mapray cannot use: one line naming the key, exit 2, before Ray starts ---

NO_PACKAGES = ("import sys; sys.modules['s3fs'] = sys.modules['gcsfs'] = None; "
               "from mapray.cli import main; sys.exit(main())")  # as if neither package were installed


def _error_runs(cases: dict, base: Path, tiny: dict, home: Path) -> dict:
    """Runs `mapray score` for each case (name -> (env, --set overrides, without packages?)) at once, and returns
    each run's one error line."""
    config = home / "base.yaml"
    config.write_text(json.dumps({"input": {"uri": str(base), "columns": {"id": "prompt_id"}},
                                  "output": str(home / "out"), "policy": model_config(tiny["policy"])}))
    runs = {}
    for name, (env, overrides, no_packages) in cases.items():
        head = [sys.executable, "-c", NO_PACKAGES] if no_packages else [sys.executable, "-m", "mapray"]
        sets = [x for kv in overrides for x in ("--set", kv)]
        runs[name] = subprocess.Popen([*head, "score", "--config", str(config), *sets], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
    return {name: _error_line(run, *run.communicate(timeout=300)) for name, run in runs.items()}


def _error_line(run: subprocess.Popen, stdout: str, stderr: str) -> str:
    """The one `mapray: error:` line of a run that stopped with exit 2 before Ray started (log lines may come
    before it), or what went wrong instead: every case's outcome shows in one comparison."""
    errors = [line for line in stderr.splitlines() if line.startswith("mapray: error: ")]
    tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
    if run.returncode == 2 and len(errors) == 1 and tail[0] == errors[0] and "Traceback" not in stderr and \
            "Started a local Ray" not in stdout + stderr:
        return errors[0].removeprefix("mapray: error: ")
    return f"exit {run.returncode}, not one error line before Ray starts: ...{tail[0]}"


@pytest.fixture(scope="module")
def error_setup(s3, tmp_path_factory):
    home = tmp_path_factory.mktemp("errors")
    (home / "pairs.jsonl").write_bytes(b"\n".join(UF.read_bytes().splitlines()[:4]) + b"\n")
    s3.fs.put(str(home / "pairs.jsonl"), f"{BUCKET}/errors/pairs.jsonl")
    # nothing listens there: botocore gives up at once with one attempt (it retries for ~10 s by default)
    unreachable = dict(s3.env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_MAX_ATTEMPTS="1")
    return home, unreachable


def _cases(key: str, uri_of, s3_env: dict, unreachable: dict) -> dict:
    """The same three problems for one config key: `uri_of(bucket)` is the URI it gets."""
    return {f"{key} without s3fs": (s3_env, [f"{key}={uri_of(BUCKET)}"], True),
            f"{key} in a missing bucket": (s3_env, [f"{key}={uri_of('no-such-bucket')}"], False),
            f"{key} unreachable": (unreachable, [f"{key}={uri_of(BUCKET)}"], False)}


def _expected(key: str, uri_of, unreachable: dict) -> dict:
    host = unreachable["AWS_ENDPOINT_URL"]
    return {f"{key} without s3fs": f"{key}: {uri_of(BUCKET)} needs the s3fs package, which is not installed "
                                   "(pip install 'mapray[s3]')",
            f"{key} in a missing bucket": f"{key}: bucket 'no-such-bucket' does not exist "
                                          f"({uri_of('no-such-bucket')})",
            f"{key} unreachable": f'{key}: cannot reach {uri_of(BUCKET)}: Could not connect to the endpoint URL: '
                                  f'"{host}/{BUCKET}"'}


def test_input_and_output_uris_mapray_cannot_use_stop_it_with_one_line(s3, tiny, error_setup):
    home, unreachable = error_setup

    def inputs(bucket):
        return f"s3://{bucket}/errors/pairs.jsonl"

    def output(bucket):
        return f"s3://{bucket}/errors/out"

    cases = {**_cases("input.uri", inputs, s3.env, unreachable), **_cases("output", output, s3.env, unreachable),
             "input.uri on gs without gcsfs": (s3.env, ["input.uri=gs://bucket/pairs.jsonl"], True)}
    lines = _error_runs(cases, home / "pairs.jsonl", tiny, home)
    assert lines == {**_expected("input.uri", inputs, unreachable), **_expected("output", output, unreachable),
                     "input.uri on gs without gcsfs": "input.uri: gs://bucket/pairs.jsonl needs the gcsfs package, "
                                                      "which is not installed (pip install 'mapray[gcs]')"}
    assert not s3.fs.exists("no-such-bucket")  # the output's write probe did not create it


def test_model_and_cache_uris_mapray_cannot_use_stop_it_with_one_line(s3, tiny, error_setup):
    home, unreachable = error_setup

    def policy(bucket):
        return f"s3://{bucket}/models/policy"

    def cache(bucket):
        return f"s3://{bucket}/cache"

    cases = {**_cases("policy.path", policy, s3.env, unreachable), **_cases("cache", cache, s3.env, unreachable)}
    lines = _error_runs(cases, home / "pairs.jsonl", tiny, home)
    expected = {**_expected("policy.path", policy, unreachable), **_expected("cache", cache, unreachable)}
    assert lines == expected


def test_move_folder_moves_a_folder_ray_data_wrote_on_s3(s3):
    """What publishing and the cache's generations do with Ray's output folders. pyarrow writes an empty marker
    object for each folder it creates, and s3fs's own recursive `mv` fails on it (NoSuchKey)."""
    from pyarrow import fs as pafs

    from mapray.uris import move_folder

    writer = pafs.S3FileSystem(endpoint_override=s3.url, access_key="testing", secret_key="testing",
                               region="us-east-1")
    src, dst = f"{BUCKET}/move/_staging/scored", f"{BUCKET}/move/scored"
    writer.create_dir(f"{src}/part")
    for name in ("a.parquet", "part/b.parquet"):
        with writer.open_output_stream(f"{src}/{name}") as f:
            f.write(name.encode())
    assert f"{src}/" in s3.fs.find(f"{BUCKET}/move")  # the marker that broke `mv`
    move_folder(s3.fs, src, dst)
    left = sorted(k for k in s3.fs.find(f"{BUCKET}/move") if not k.endswith("/"))  # parents' markers stay
    assert left == [f"{dst}/a.parquet", f"{dst}/part/b.parquet"] and not s3.fs.exists(src)
    assert s3.fs.cat(f"{dst}/part/b.parquet") == b"part/b.parquet"


def test_no_cached_listing_hides_another_writers_files(s3):
    """Ray's workers write into the folders the driver lists. Importing mapray turns s3fs's listings cache off
    (with it, `exists` answered False for a resumed run's own checkpoint files after `find` had listed them)."""
    import fsspec

    import mapray.uris  # noqa: F401  its import sets fsspec's defaults for object stores

    fs = fsspec.filesystem("s3", endpoint_url=s3.url, key="testing", secret="testing", skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/listed/a", b"a")
    assert fs.ls(f"{BUCKET}/listed") == [f"{BUCKET}/listed/a"]
    s3.fs.pipe(f"{BUCKET}/listed/b", b"b")  # another writer
    assert fs.exists(f"{BUCKET}/listed/b") and fs.cat(f"{BUCKET}/listed/b") == b"b"


# --- self-play on object storage: prompts in, a generation killed and resumed, every result out, an evolve round ---

def _prompt_lines() -> tuple[list[str], list[str]]:
    """Five UltraFeedback rows, then three a generation sets aside: a prompt too long to sample from, a line that
    is not JSON, a prompt that is a number."""
    rows = [json.loads(line) for line in UF.read_text().splitlines()[:5]]
    long = dict(rows[0], prompt="Explain this. " + "word " * 1500)
    lines = [json.dumps(r) for r in rows] + [json.dumps(long), "{not json", json.dumps(dict(rows[1], prompt=5))]
    return lines, [r["prompt"] for r in rows]


def test_selfplay_resumes_a_killed_generation_then_evolves_on_s3(s3, tiny, tmp_path, monkeypatch):
    """Prompts on s3 -> `mapray selfplay`, its driver SIGKILLed with its local Ray once the first samples are
    written, the same command again: written prompts are not sampled again; it publishes generated/ +
    generated.json and the scored round there, the samples then current on s3 (asking again samples nothing).
    `mapray evolve --from s3://...` ranks that round's scored/ from s3, rewrites its best prompts (the tiny policy
    on vLLM) and publishes round 1 beside it: every rewrite scored or set aside with its reason, the lineage
    pointing at round 0. (SmolLM2's samples and their log-probs: tests/test_selfplay.py.)"""
    pytest.importorskip("vllm")
    from mapray.generation.run import generate

    fs = s3.fs
    lines, prompts = _prompt_lines()
    fs.pipe(f"{BUCKET}/sp/prompts.jsonl", ("\n".join(lines) + "\n").encode())
    round0, round1 = f"{BUCKET}/sp/round0", f"{BUCKET}/sp/round1"
    config = tmp_path / "selfplay.yaml"
    # batches of one prompt, 48 tokens each: the kill lands between two written batches
    config.write_text(json.dumps({
        "input": {"uri": f"s3://{BUCKET}/sp/prompts.jsonl"}, "output": f"s3://{round0}",
        "policy": {"path": tiny["policy"], "max_length": 1024, "batch_size": 1, "cpus_per_actor": 1},
        "reward": {"source": "model", "model": {"path": tiny["reward"], "max_length": 512, "cpus_per_actor": 0.5}},
        "generation": {"n": 2, "max_tokens": 48, "seed": 7},
        "evolve": {"strategies": ["deepen", "constraints"], "top_fraction": 0.4, "max_tokens": 64},
        "metric": {"alpha": 2.5}, "selection": {"ratio": 0.5}}))

    before = killed_after_first_write("selfplay", config, s3.env, lambda: _committed_rows(fs, round0, "gen"))
    assert 0 < before < len(lines) and not fs.exists(f"{round0}/generated.json")

    run = mapray("selfplay", "--config", str(config), env=s3.env)  # the same command again
    assert run.returncode == 0, run.stderr[-3000:]
    # the sampler's and scorers' actors print no weight-loading bar, no warning of vLLM's import or of its CPU
    # backend and, once Ray Data ends them, no traceback of an engine process's resource tracker; the sampling
    # has its stage line as the scoring's stages do
    assert not re.search(r"Loading safetensors|reduce_op|resource_tracker|Traceback|Triton|NUMA", run.stderr), \
        run.stderr[-3000:]
    assert f"mapray: sampling: {len(lines) - before} rows in " in run.stderr, run.stderr[-3000:]
    marker = json.loads(fs.cat(f"{round0}/generated.json"))
    generated = pq.read_table(f"{round0}/generated", filesystem=fs)
    out = read_output(fs, round0)
    assert marker == out["manifest"]["generation"]
    assert marker["prompts"] == generated.num_rows == len(lines)
    assert marker["sampled_this_attempt"] == len(lines) - before  # written prompts not sampled again
    assert len(set(generated["row_id"].to_pylist())) == len(lines)
    assert not [c for c in generated.column_names if c.startswith("_m_")]  # nothing internal is published
    sampled = [r for r in generated.to_pylist() if r["generation_error"] is None]
    assert sorted(r["prompt"][0]["content"] for r in sampled) == sorted(prompts)
    assert all(len(r["all_generated_responses"]) == 2 for r in sampled)

    scored, rejects = out["scored"].to_pylist(), out["rejects"].to_pylist()
    assert len(scored) + len(rejects) == out["manifest"]["counts"]["input"] == len(lines)  # every prompt once
    assert len(scored) >= 3 and "other" not in {r["reason_code"] for r in rejects}  # every reason has its code
    reasons = [r["reason"] for r in rejects]
    assert all(r["stage"] == "generate" or r["reason"].startswith("fewer than 2") for r in rejects)
    assert any("tokens, the generator's max_length is 1024: no room to sample" in r for r in reasons)
    assert any(r.startswith("prompt: invalid JSON") for r in reasons)
    assert any("must be a string or a list of messages, got int" in r for r in reasons)
    for row in scored:  # the reward model picked best and worst; MAP as the config says
        texts, rewards = row["all_generated_responses"], row["candidate_rewards"]
        assert len(texts) == 2 and row["chosen"][0]["content"] == texts[rewards.index(max(rewards))]
        assert row["rejected"][0]["content"] == texts[rewards.index(min(rewards))]
        assert math.isclose(row["map"], abs(row["explicit_margin"]) - 2.5 * abs(row["implicit_margin"]),
                            rel_tol=1e-9, abs_tol=1e-12)
    selected = out["selected"].to_pylist()
    assert len(selected) == len(scored) // 2 and {r["pair_id"] for r in selected} == {
        r["pair_id"] for r in sorted(scored, key=lambda r: -r["map_z"])[:len(selected)]}
    assert not [k for k in fs.find(f"{BUCKET}/sp") if "/_staging/" in k and not k.endswith("/_staging/")]
    for key, value in s3.env.items():  # this process reads s3 as the runs did
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    assert generate(load_config(str(config))) == marker  # current on s3: returned, nothing sampled

    evolved_run = mapray("evolve", "--from", f"s3://{round0}", "--config", str(config), "--set",
                         f"output=s3://{round1}", env=s3.env)
    assert evolved_run.returncode == 0, evolved_run.stderr[-3000:]
    assert "mapray: rewriting: " in evolved_run.stderr, evolved_run.stderr[-3000:]
    nxt = read_output(fs, round1)
    top = math.ceil(0.4 * len(scored))
    best = [r["prompt_id"] for r in sorted(scored, key=lambda r: (-r["map"], r["prompt_id"]))[:top]]
    evolved = pq.read_table(f"{round1}/evolved", filesystem=fs).to_pylist()
    assert len(evolved) == 2 * top and sorted(r["evolved_from"] for r in evolved) == sorted(best * 2)
    assert {r["evolve_strategy"] for r in evolved} == {"deepen", "constraints"}
    for row in evolved:
        kept = row["evolve_error"] is None
        assert kept == (row["prompt"] is not None)
        if kept:
            assert 0 < len(row["prompt"]) <= 5 * len(row["original"])
        else:
            assert row["evolve_error"].startswith("evolve: ")
    lineage = nxt["manifest"]["lineage"]
    assert lineage["round"] == 1 and lineage["parent"]["run_id"] == out["manifest"]["run_id"]
    assert lineage["parent"]["output"].endswith(round0) and lineage["evolve"]["rewrites"] == 2 * top
    assert nxt["manifest"]["counts"]["input"] == 2 * top  # every rewrite once: scored, or set aside with its reason
    scored1 = nxt["scored"].to_pylist()
    assert all(r["evolved_from"] in best and r["evolve_round"] == 1 for r in scored1)
    rejected1 = nxt["rejects"]["reason"].to_pylist()
    assert all(r["evolve_error"] in rejected1 for r in evolved if r["evolve_error"] is not None)
    assert len(scored1) + len(rejected1) == 2 * top
