import io
import subprocess
import sys

import pytest

from mapray.config import load_config
from mapray.errors import ConfigError
from tests.conftest import UF


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mapray", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


GOOD = f"""
input: {{uri: {UF}}}
output: OUT
policy: {{path: POLICY}}
"""


@pytest.mark.parametrize("text,message", [
    ("input: {uri: x}\noutput: o\npolicy: {path: p, dtyp: float32}\n", "unknown config key policy.dtyp"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p, dtype: fp8}\n", "policy.dtype: 'fp8' is not one of"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p, actors: two}\n", "policy.actors: expected int, got str"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p}\nmetric: {implicit: dpo}\n", "needs a reference model"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p}\nselection: {ratio: 1.5}\n", "selection.ratio: must be in"),
    ("input: {uri: x}\noutput: o\npolicy: {path: p}\nselection: {ratio: 0.2, top_k: 5}\n",
     "selection.ratio=0.2 and selection.top_k=5: set only one of ratio, top_k, threshold"),
    ("- a list\n", "must be a mapping of sections"),
    ("input: [unclosed\n", "is not valid YAML"),
])
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path, capsys, text, message):
    from mapray.cli import main

    # in this process (the next tests run `python -m mapray` itself): nothing here reaches Ray
    assert main(["score", "--config", _write(tmp_path, text)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mapray: error: ") and message in lines[0], lines


def test_missing_model_and_bad_input_fail_before_anything_loads(tmp_path, tiny):
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", str(tmp_path / "nope")))
    result = run_cli("score", "--config", cfg)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mapray: error: policy.path: model path does not exist: {tmp_path / 'nope'}"
    assert "Started a local Ray" not in result.stdout + result.stderr
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("score", "--config", cfg, "--set", f"input.uri={tmp_path}/missing/*.jsonl")
    assert result.returncode == 2 and "input.uri: no input files at" in result.stderr
    result = run_cli("score", "--config", cfg, "--set", "reward.source=model", "--set",
                     f"reward.model.path={tiny['policy']}/config.json")
    assert result.returncode == 2 and "reward.model.path" in result.stderr and "no config.json" in result.stderr


def test_unwritable_output_fails_fast(tmp_path, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _write(tmp_path, GOOD.replace("OUT", str(blocker / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("score", "--config", cfg)
    assert result.returncode == 2 and "output: cannot write to" in result.stderr


def test_overrides_are_typed():
    cfg = load_config(None, ["policy.dtype=bfloat16", "policy.actors=3", "selection.top_k=10"],
                      base={"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}})
    assert (cfg.policy.dtype, cfg.policy.actors, cfg.selection.top_k) == ("bfloat16", 3, 10)
    with pytest.raises(ConfigError, match="--set policy: expected key.sub=value|policy is not a section"):
        load_config(None, ["policy=3", "policy.dtype=x"], base={"input": {"uri": "x"}, "output": "o"})


def test_select_on_a_folder_without_manifest(tmp_path):
    result = run_cli("select", "--output", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json under" in result.stderr


def test_rescore_needs_a_cache(tmp_path, tiny):
    cfg = _write(tmp_path, GOOD.replace("OUT", str(tmp_path / "out")).replace("POLICY", tiny["policy"]))
    result = run_cli("rescore", "--config", cfg)
    assert result.returncode == 2
    assert result.stderr.strip() == ("mapray: error: rescore needs a cache URI: "
                                     "set cache in the config (or --set cache=URI)")


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1.5"], "mapray: error: --ratio: must be in [0, 1], got 1.5"),
    (["--ratio", "nan"], "mapray: error: --ratio: must be in [0, 1], got nan"),
    (["--top-k", "-1"], "mapray: error: --top-k: must be >= 0, got -1"),
    (["--threshold", "nan"], "mapray: error: --threshold: must be a finite number, got nan"),
    (["--threshold=-inf"], "mapray: error: --threshold: must be a finite number, got -inf"),
    (["--alpha", "nan"], "mapray: error: --alpha: must be a finite number >= 0, got nan"),
    (["--alpha", "-1"], "mapray: error: --alpha: must be a finite number >= 0, got -1.0"),
])
def test_select_checks_its_arguments_before_anything_runs(tmp_path, capsys, args, message):
    from mapray.cli import main

    # the folder has no manifest: the argument is refused first, before the output is read or Ray starts
    assert main(["select", "--output", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message]


@pytest.mark.parametrize("args,message", [
    (["--ratio", "0.2", "--top-k", "3"], "argument --top-k: not allowed with argument --ratio"),
    (["--top-k", "3", "--threshold", "0.5"], "argument --threshold: not allowed with argument --top-k"),
    (["--ratio", "abc"], "argument --ratio: invalid float value: 'abc'"),
    # the choices are config.SelectionMetric's names, in its order
    (["--metric", "mapz"], "argument --metric: invalid choice: 'mapz' (choose from 'map_z', 'map', 'map_unreg', "
                           "'explicit_margin', 'implicit_margin_small', 'random', 'implicit_margin_large', "
                           "'dpo_loss', 'dpo_grad_weight', 'rm_confidence', 'rank_disagreement')"),
])
def test_select_usage_errors_are_one_line(tmp_path, capsys, args, message):
    from mapray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["select", "--output", str(tmp_path), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"mapray: error: {message} (see mapray select --help)"]


def test_select_takes_its_defaults_from_the_config(monkeypatch, tmp_path):
    from mapray import cli, pipeline
    from mapray.config import SelectionConfig

    seen = []
    monkeypatch.setattr(pipeline, "reselect", lambda uri, sel, alpha, combine: seen.append((sel, alpha, combine)) or {})
    monkeypatch.setattr(cli, "summary", lambda manifest, output: "")
    assert cli.main(["select", "--output", str(tmp_path)]) == 0
    assert seen == [(SelectionConfig(), None, None)]  # unset flags: SelectionConfig's defaults (map_z, ratio 0.4)
    assert cli.main(["select", "--output", str(tmp_path), "--metric", "map", "--threshold", "0.5", "--combine",
                     "mean_z"]) == 0
    assert seen[1] == (SelectionConfig(metric="map", threshold=0.5), None, "mean_z")


def test_version(capsys):
    from mapray import __version__
    from mapray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"mapray {__version__}\n"


def test_a_terminal_gets_one_progress_display_per_stage(monkeypatch):
    """In a terminal as in a log: mapray's stage lines, not Ray Data's bars beside them (a bar per operator that
    wraps at the terminal's width and breaks up around the lines); `--verbose` keeps Ray Data's bars."""
    import ray.data

    from mapray import console

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(sys, "stderr", Terminal())
    console.setup(verbose=True, whole_process=False)
    assert ctx.enable_progress_bars
    console.setup(verbose=False, whole_process=False)
    assert not ctx.enable_progress_bars


def test_a_stage_prints_one_progress_line_per_interval_however_many_executions_it_runs(monkeypatch, capsys):
    """Two Ray Data executions of one stage step at once (the demo's model pass printed each line twice): one
    line per `PROGRESS_EVERY_S` for the stage."""
    import ray.data

    from mapray import console

    clock = [100.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])

    class Executor:  # what the callback reads of Ray Data's executor: its context and its operators
        _topology: dict = {}

        def __init__(self):
            self._data_context = ray.data.DataContext.get_current().copy()

    with console.stage("model pass", total=64) as progress:
        callbacks = [console._StageProgress(), console._StageProgress()]
        for callback in callbacks:
            callback.before_execution_starts(Executor())
        progress["rows"] = 16
        for step in (5.0, console.PROGRESS_EVERY_S, console.PROGRESS_EVERY_S + 1, 2 * console.PROGRESS_EVERY_S):
            clock[0] = 100.0 + step
            for callback in callbacks:
                callback.on_execution_step(Executor())
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["mapray: model pass: 16/64 rows, 1.1 rows/s, ETA 45 s",
                     "mapray: model pass: 16/64 rows, 0.5 rows/s, ETA 90 s", "mapray: model pass: 16 rows in 30.0 s"]


def test_the_console_drops_only_the_known_lines_of_rays_making():
    from mapray import console

    known = (b"[2026-12-05 07:16:08,858 E 15649 15649] core_worker.cc:2465: Actor with class name: "
             b"'MapWorker(MapBatches(LogprobStage))' and ID: 'fa5e' has constructor arguments in the object store "
             b"and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
             b"restart will fail.")
    assert console._noise(known)
    for line in (b"\x1b[36m(MapWorker(MapBatches(GenerateStage)) pid=17842)\x1b[0m Triton is installed, but doesn't "
                 b"include CPU backend. Disabling Triton.",
                 b"\x1b[36m(MapWorker(MapBatches(GenerateStage)) pid=17842)\x1b[0m [W1207 01:19:36.618374282 "
                 b"utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes "
                 b"(0). Memory allocations will be strictly bound to these NUMA nodes."):  # vLLM's CPU backend
        assert console._noise(line)
    for kept in (b"mapray: error: policy.path: model path does not exist: /x",
                 b"(MapWorker(MapBatches(GenerateStage)) pid=1) WARNING [vllm] max_model_len is larger than ...",
                 b"Traceback (most recent call last):", b"core_worker.cc:1: Actor with class name: 'A' died"):
        assert not console._noise(kept)
    progress = {"name": "model pass", "total": 100, "rows": 25, "started": 0.0}
    assert console.progress_line(progress, 10.0) == "mapray: model pass: 25/100 rows, 2.5 rows/s, ETA 30 s"
    assert console.progress_line({**progress, "total": None}, 10.0) == "mapray: model pass: 25 rows, 2.5 rows/s"
