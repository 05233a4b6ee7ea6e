"""`mapray <verb>`: score, select, report, show, demo. jobs/ holds `ray job submit` entrypoints over the same
functions."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from importlib import resources

from mapray import __version__
from mapray.config import (
    DEFAULT_RATIO,
    CombineRule,
    DiffConfig,
    RayConfig,
    SelectionConfig,
    SelectionMetric,
    check_alpha,
    load_config,
)
from mapray.errors import ChurnExceeded, ConfigError
from mapray.typed_config import build

DEMO_CONFIG = "demo.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """A usage error reads like a config error: one line, exit 2."""
        self.exit(2, f"mapray: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mapray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mapray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print the INFO logs of Ray (cluster start, every Ray Data execution's plan) and of "
                             "the other libraries")
    verbs = parser.add_subparsers(dest="verb", required=True)

    score = verbs.add_parser("score", help="score preference pairs and select by MAP")
    score.add_argument("--config", required=True, help="YAML run config")
    score.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set policy.dtype=bfloat16 (repeatable)")

    rescore = verbs.add_parser("rescore", help="score again after a policy update, reusing cached reference "
                               "log-probs and rewards (needs `cache` in the config); what a scheduler runs")
    rescore.add_argument("--config", required=True, help="YAML run config with a cache URI")
    rescore.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    selfplay = verbs.add_parser("selfplay", help="sample N responses per prompt from the policy (vLLM), score "
                                "them with the reward model, pair best and worst, select by MAP")
    selfplay.add_argument("--config", required=True, help="YAML run config: input holds prompts (any format)")
    selfplay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    evolve = verbs.add_parser("evolve", help="rewrite the best prompts of a self-play output (Evol-Instruct) and "
                              "run self-play on the rewrites: the next round")
    evolve.add_argument("--from", dest="source", required=True, metavar="OUT",
                        help="output URI of a finished `mapray selfplay` or `mapray evolve` (round k)")
    evolve.add_argument("--config", required=True, help="YAML run config; its output is round k+1's")
    evolve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    select = verbs.add_parser("select", help="select again from an existing output, without running models")
    select.add_argument("--output", required=True, help="output URI of a finished `mapray score`")
    default = SelectionConfig()
    select.add_argument("--metric", choices=typing.get_args(SelectionMetric),
                        help=f"score to rank or threshold by (default {default.metric})")
    group = select.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, metavar="R",
                       help=f"keep the top fraction R of the pool (the default, {DEFAULT_RATIO})")
    group.add_argument("--top-k", type=int, metavar="K", help="keep the top K rows")
    group.add_argument("--threshold", type=float, metavar="T",
                       help="keep every row whose score exceeds T (the paper's MAP > tau)")
    select.add_argument("--alpha", type=float, metavar="A",
                        help="weight of the implicit term (default: the scoring run's)")
    select.add_argument("--seed", type=int, help=f"seed for --metric random (default {default.seed})")
    select.add_argument("--by", metavar="COLUMN", help="select within each group of this column of scored/ "
                        "(the rule per group; README \"Keeping a mixture\")")
    select.add_argument("--quota", dest="quotas", action="append", type=_quota, metavar="VALUE=N",
                        help="with --by: group VALUE keeps N rows (an integer) or that share of its rows (a "
                             "fraction, e.g. 0.25); repeatable; groups not named take the rule")
    select.add_argument("--zscore", choices=typing.get_args(typing.get_type_hints(SelectionConfig)["zscore"]),
                        help=f"with --by: map_z's moments from the whole pool or each group (default "
                             f"{default.zscore})")
    select.add_argument("--combine", choices=typing.get_args(CombineRule),
                        help="several reward models: how their margins make the explicit margin (default: the "
                             "scoring run's reward.combine)")

    diff = verbs.add_parser("diff", help="what changed between two runs' selections (pairs that entered and left, "
                            "what moved, why); writes NEW/diff.json and NEW/diff/; no model runs")
    diff.add_argument("old", metavar="OLD", help="output URI of the earlier run")
    diff.add_argument("new", metavar="NEW", help="output URI of the later run")
    diff.add_argument("--max-churn", type=float, metavar="R",
                      help="exit 3 when more than a share R of either selection is not in the other")
    diff.add_argument("--tolerance", type=float, metavar="T", default=DiffConfig().tolerance,
                      help="a margin moved when it changed by more than T x max(1, |old|) (default %(default)g)")

    estimate = verbs.add_parser("estimate", help="what a run will cost: tokens per model from a sample of its input, "
                                "FLOPs, and wall time and device-hours on N devices of a measured kind; no model runs")
    estimate.add_argument("--config", required=True, help="YAML run config")
    estimate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    estimate.add_argument("--devices", type=int, default=1, metavar="N", help="devices the run gets (default 1)")
    estimate.add_argument("--kind", default="h200", metavar="KIND",
                          help="device kind with measured figures: h200 (bf16), cpu (bf16, fp32) (default h200); "
                               "another kind gets tokens and FLOPs only")
    estimate.add_argument("--sample-rows", type=int, default=256, metavar="N",
                          help="input rows tokenized to estimate from (default 256)")

    compact = verbs.add_parser("compact-cache", help="merge each model's cached scores (one generation per run) "
                               "into one; run it while no scoring run uses the cache")
    compact.add_argument("cache", metavar="CACHE", help="the cache URI of the runs' configs")

    _add_report_verbs(verbs)

    demo = verbs.add_parser("demo", help="score the shipped UltraFeedback sample with SmolLM2-135M on this machine")
    demo.add_argument("--output", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


def _add_report_verbs(verbs) -> None:
    from mapray.report.settings import ReportSettings  # light: no Ray, no pyarrow

    default = ReportSettings()
    for verb, text in (("report", "write OUT/report/: an HTML page with figures, report.json and the PNGs"),
                       ("show", "print the report's headline numbers (reuses OUT/report/report.json when current)")):
        sub = verbs.add_parser(verb, help=f"{text}; no model runs")
        sub.add_argument("output", metavar="OUT", help="output URI of a finished `mapray score`")
        sub.add_argument("--alphas", type=_floats, metavar="A,B,...",
                         help=f"alphas of the sweep (default {','.join(f'{a:g}' for a in default.alphas)})")
        sub.add_argument("--noise-fraction", type=float, metavar="F",
                         help=f"share of pairs the noise audit swaps (default {default.noise_fraction:g})")
        sub.add_argument("--noise-seed", type=int, metavar="N", help=f"its seed (default {default.noise_seed})")
        sub.add_argument("--by", metavar="COLUMN", help="break the pool down by this input column of scored/")
        sub.add_argument("--bias-fractions", type=_floats, metavar="F,G,...",
                         help="the reward-bias audit's strengths, as fractions of the margin's spread per unit of "
                              f"the bias's (default {','.join(f'{f:g}' for f in default.bias_fractions)})")


def _quota(text: str) -> tuple[str, int | float]:
    """`VALUE=N`: a group's count of rows (an integer) or share of its rows (a fraction)."""
    group, _, amount = text.rpartition("=")
    if group:
        try:
            return group, int(amount) if re.fullmatch(r"[+-]?\d+", amount.strip()) else float(amount)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected VALUE=N (a count) or VALUE=F (a share), got {text!r}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _report(args) -> int:
    """`report` writes OUT/report/ and prints where; `show` prints the headline numbers."""
    from mapray.report import ReportSettings, report, summary
    from mapray.report.text import headline

    given = {"alphas": args.alphas, "noise_fraction": args.noise_fraction, "noise_seed": args.noise_seed,
             "by": args.by, "bias_fractions": args.bias_fractions}
    given = {k: v for k, v in given.items() if v is not None}
    settings = ReportSettings(**given)  # checked before Ray starts
    if args.verb == "report":
        from mapray.console import stage

        with stage("report"):
            numbers = report(args.output, settings)
    else:  # without flags, any report.json of the published run will do
        numbers = summary(args.output, settings if given else None)
    print(headline(numbers))
    if args.verb == "report":
        print(f"  report: {numbers['output']}/report/index.html (report.json and the figures beside it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mapray import console  # imports Ray: after the arguments are checked

    # the process's own stderr is filtered only when this is its command line (not a call from Python)
    console.setup(verbose=args.verbose, whole_process=argv is None)
    try:
        if args.verb in ("report", "show"):
            return _report(args)
        if args.verb == "compact-cache":
            return _compact(args.cache)
        if args.verb == "estimate":
            from mapray.estimate import estimate, render

            print(render(estimate(load_config(args.config, args.set), args.kind.lower(), args.devices,
                                  args.sample_rows)))
            return 0
        if args.verb == "diff":
            return _diff(args)
        if args.verb == "select":
            output, manifest = args.output, _select(args)
        elif args.verb in ("selfplay", "evolve"):
            cfg = load_config(args.config, args.set, base=_SELFPLAY_INPUT if args.verb == "evolve" else None)
            output = cfg.output
            if args.verb == "selfplay":
                from mapray.generation.run import selfplay

                manifest = selfplay(cfg)
            else:
                from mapray.generation.evolve import evolve

                manifest = evolve(cfg, args.source)
        else:
            cfg = _run_config(args)
            from mapray.pipeline import score

            output, manifest = cfg.output, score(cfg)
    except ConfigError as e:
        print(f"mapray: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, ChurnExceeded) else 2
    print(summary(manifest, output))
    return 0


# evolve reads its prompts from the previous round: a config without input is complete for it
_SELFPLAY_INPUT = {"input": {"uri": "(the previous round's output)"}}


def _diff(args) -> int:
    """Prints the diff's summary; a churn above --max-churn is raised after it (exit 3)."""
    from mapray.changes import check_churn, diff, summary
    from mapray.console import stage

    build(DiffConfig, lambda name: "--" + name.replace("_", "-"), max_churn=args.max_churn, tolerance=args.tolerance)
    with stage("diff"):
        numbers = diff(args.old, args.new, args.max_churn, args.tolerance)
    print(summary(numbers))
    print(f"  diff: {numbers['new']['output']}/diff.json  {numbers['new']['output']}/diff/")
    check_churn(numbers, f"{numbers['new']['output']}/diff.json", "--max-churn")
    return 0


def _compact(cache_uri: str) -> int:
    from mapray.cache import compact, namespaces_under
    from mapray.console import stage
    from mapray.runtime import init_ray

    spaces = namespaces_under(cache_uri)
    init_ray(RayConfig(), [])
    for ns in spaces:
        with stage(f"compacting {ns.id}", quiet=True):  # its line below says what it did
            merged = compact(ns)
        print(f"{ns.id}: {f'{merged} generations merged into one' if merged else 'nothing to merge'}")
    return 0


def _run_config(args):
    if args.verb == "demo":
        package = resources.files("mapray")
        data = package / "data" / "ultrafeedback-binarized-1000.jsonl"
        return load_config(str(package / "configs" / DEMO_CONFIG),
                           [f"input.uri={data}", f"output={args.output}", *args.set])
    cfg = load_config(args.config, args.set)
    if args.verb == "rescore" and cfg.cache is None:
        raise ConfigError("rescore needs a cache URI: set cache in the config (or --set cache=URI)")
    return cfg


def _select(args) -> dict:
    """Checks the arguments as `score` checks a config (before Ray starts), then reselects."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SelectionConfig)
             if getattr(args, f.name, None) is not None}  # unset flags take SelectionConfig's defaults
    if "quotas" in given:
        given["quotas"] = dict(given["quotas"])
    sel = build(SelectionConfig, lambda name: "--" + name.replace("_", "-"), **given)
    if args.alpha is not None:
        check_alpha(args.alpha, "--alpha")
    from mapray.pipeline import reselect

    return reselect(args.output, sel, args.alpha, args.combine)


def summary(manifest: dict, output: str) -> str:
    c, t = manifest["counts"], manifest["timings"]
    lines = [
        f"mapray: {c['input']} input pairs -> {c['scored']} scored, {c['rejected']} rejected, "
        f"{c['selected']} selected {_how_selected(manifest)}",
        (f"  reselection time {t['reselect_s']:.1f} s" if manifest.get("reselected_at") else
         f"  {'scoring ' if manifest.get('generation') else ''}time {t.get('total_s', 0):.1f} s"
         + (f", {manifest['pairs_per_s']:.2f} pairs/s" if manifest.get("pairs_per_s") else "")),
        f"  outputs: {output}/scored  {output}/selected  {output}/rejects  {output}/README.md  "
        f"{output}/manifest.json",
    ]
    g = manifest.get("generation")
    if g:
        lines.insert(1, f"  generated: {g['samples']} samples ({g['generated_tokens']} tokens) for {g['prompts']} "
                        f"prompts in {g['timings']['generation_s']:.1f} s ({g['sampled_this_attempt']} sampled by "
                        f"this run), {output}/generated; round {manifest['lineage']['round']}")
    for code, entry in list(c.get("rejected_by_code", {}).items())[:5]:
        lines.append(f"  rejected {entry['count']:>6}  {code}: {entry['example']}")
    lines += [f"  warning: {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def _how_selected(manifest: dict) -> str:
    sel = manifest.get("selection")
    if not sel:
        return f"({manifest['config']['selection']['metric']})"
    return f"({sel['metric']}) by {sel['rule']} {sel[sel['rule']]}"


if __name__ == "__main__":
    sys.exit(main())
