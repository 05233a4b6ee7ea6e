"""`mapray <verb>`: score, select, demo. jobs/ holds `ray job submit` entrypoints over the same functions."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

from mapray.config import ConfigError, SelectionConfig, from_dict, load_config

DEMO_CONFIG = "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapray", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    score = verbs.add_parser("score", help="score preference pairs and select by MAP")
    score.add_argument("--config", required=True, help="YAML run config")
    score.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set policy.dtype=bfloat16 (repeatable)")

    rescore = verbs.add_parser("rescore", help="score again after a policy update, reusing cached reference "
                               "log-probs and rewards (needs `cache` in the config); what a scheduler runs")
    rescore.add_argument("--config", required=True, help="YAML run config with a cache URI")
    rescore.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")

    select = verbs.add_parser("select", help="select again from an existing output, without running models")
    select.add_argument("--output", required=True, help="output URI of a finished `mapray score`")
    select.add_argument("--metric", default="map_z",
                        choices=["map_z", "map", "map_unreg", "explicit_margin", "implicit_margin_small", "random"])
    group = select.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="fraction of the pool to keep (default 0.4)")
    group.add_argument("--top-k", type=int, help="number of rows to keep")
    select.add_argument("--alpha", type=float, help="weight of the implicit term (default: the scoring run's)")
    select.add_argument("--seed", type=int, default=0, help="seed for --metric random")

    demo = verbs.add_parser("demo", help="score the shipped UltraFeedback sample with SmolLM2-135M on this machine")
    demo.add_argument("--output", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.verb in ("score", "rescore"):
            cfg = load_config(args.config, args.set)
            if args.verb == "rescore" and cfg.cache is None:
                raise ConfigError("rescore needs a cache URI: set cache in the config (or --set cache=URI)")
        elif args.verb == "demo":
            package = resources.files("mapray")
            data = package / "data" / "ultrafeedback-binarized-1000.jsonl"
            cfg = load_config(str(package / "configs" / DEMO_CONFIG),
                              [f"input.uri={data}", f"output={args.output}", *args.set])
        else:
            return _select(args)
        from mapray.pipeline import score

        manifest = score(cfg)
    except ConfigError as e:
        print(f"mapray: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, cfg.output))
    return 0


def _select(args) -> int:
    from mapray.pipeline import reselect

    ratio = args.ratio if args.ratio is not None or args.top_k is not None else 0.4
    sel = from_dict(SelectionConfig, {"metric": args.metric, "ratio": ratio, "top_k": args.top_k,
                                      "seed": args.seed}, "select")
    try:
        manifest = reselect(args.output, sel, args.alpha)
    except ConfigError as e:
        print(f"mapray: error: {e}", file=sys.stderr)
        return 2
    print(summary(manifest, args.output))
    return 0


def summary(manifest: dict, output: str) -> str:
    c, t = manifest["counts"], manifest["timings"]
    lines = [
        f"mapray: {c['input']} input pairs -> {c['scored']} scored, {c['rejected']} rejected, "
        f"{c['selected']} selected ({manifest['config']['selection']['metric']})",
        f"  time {t.get('total_s', t.get('reselect_s', 0)):.1f} s"
        + (f", {manifest['pairs_per_s']:.2f} pairs/s" if manifest.get("pairs_per_s") else ""),
        f"  outputs: {output}/scored  {output}/selected  {output}/rejects  {output}/manifest.json",
    ]
    for reason, n in list(c.get("rejected_by_reason", {}).items())[:5]:
        lines.append(f"  rejected {n:>6}  {reason}")
    lines += [f"  warning: {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
