"""The ``edgepipe`` command line.

    edgepipe run [CONFIG.yaml] [--workdir DIR] [--quiet] [--debug]
    edgepipe validate CONFIG.yaml
    edgepipe tune TUNE.yaml --workdir DIR [--address ADDR] [--trials N] [--time-budget 30m] [--resume]
    edgepipe targets [--file PROFILE.yaml ...]
    edgepipe targets show NAME_OR_PATH
    edgepipe plan-attention --target NAME --seq N --head-dim D [--json]

Bad input prints one line naming the cause and where, and exits with code 2 (a failed validation gate: 1);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

log = logging.getLogger("edgepipe")


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "edgepipe: %(message)s"))
    root = logging.getLogger("edgepipe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not debug:
        # third-party chatter (exporter tracer warnings, optimum notices) is noise for a user; --debug shows it
        warnings.filterwarnings("ignore")
        for name in ("torch", "transformers", "optimum", "onnxscript", "onnx_ir", "onnxruntime", "ort_format_model", ""):
            logging.getLogger(name).setLevel(logging.ERROR)  # "" = the root logger some libraries log to directly
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cmd_run(args: argparse.Namespace) -> int:
    import pipeline

    workdir = args.workdir or (f"runs/{Path(args.config).stem}" if args.config else "runs/default")
    report = pipeline.run(args.config, workdir=workdir, progress=not args.quiet)
    if not args.quiet:
        print(f"edgepipe: run complete in {report['seconds']:.1f} s -> {Path(workdir) / 'report.md'}")
        for name, t in report["targets"].items():
            lat = t.get("latency_ms") or {}
            par = t.get("parity") or {}
            print(f"  {name:<18} {t['precision']:<11} {t['size_bytes'] / 1e6:7.1f} MB  parity ok={par.get('ok')}  p50={lat.get('p50', float('nan')):.2f} ms")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import tune
    from pipeline.tune.duration import parse_duration

    budget = parse_duration(args.time_budget) if args.time_budget else None
    report = tune(args.config, workdir=args.workdir, address=args.address, trials=args.trials, time_budget_s=budget, resume=args.resume,
                  echo=(lambda s: None) if args.quiet else print)
    if not args.quiet:
        print(f"edgepipe: tune complete ({len(report['trials'])} trials) -> {Path(args.workdir) / 'tune' / 'report.md'}")
        for name, t in report["targets"].items():
            print(f"  {name:<18} {'best-' + name + '.yaml' if t['best_yaml'] else 'no feasible recipe'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: OK ({len(cfg.stages)} stages: {', '.join(s.kind for s in cfg.stages)}; targets: {', '.join(cfg.targets)})")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    import yaml

    from targets import list_targets, load_target

    if args.action == "show":
        if not args.name:
            raise SystemExit("edgepipe: error: 'targets show' needs a target name or profile path")
        prof = load_target(args.name)
        print(yaml.safe_dump(prof.model_dump(mode="json"), sort_keys=False).rstrip())
        return 0
    rows = list_targets(args.file or [])
    w = max(len(p.name) for p, _ in rows)
    for prof, src in rows:
        print(f"{prof.name:<{w}}  {prof.arch:<8} {prof.device:<4} {','.join(prof.precisions):<22} {src}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.kernels.planner import cache_words_from_bytes, plan_attention
    from targets import load_target

    prof = load_target(args.target)
    plan = plan_attention(cache_words=cache_words_from_bytes(prof.cache_bytes()), seq=args.seq, head_dim=args.head_dim, causal=args.causal, density=args.density)
    data = {"target": prof.name, "cache_level": prof.cache.attention_level, **plan.__dict__}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(f"target {prof.name}: fast memory M = {plan.cache_words} words ({prof.cache.attention_level})")
        print(f"  algorithm       {plan.algorithm}  (blocks {plan.block_q} x {plan.block_k})")
        print(f"  predicted I/O   {plan.predicted_io_words:,} words")
        print(f"  lower bound     {plan.lower_bound_words:,.0f} words   ratio {plan.ratio:.3f}")
        print(f"  peak working    {plan.peak_working_words:,} words")
        if plan.notes:
            print(f"  notes           {plan.notes}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepipe", description="Compress transformer models and ship validated ONNX models to edge targets.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--quiet", action="store_true", help="only warnings and errors")
        sp.add_argument("--debug", action="store_true", help="show tracebacks and third-party logs")

    r = sub.add_parser("run", help="run a pipeline (default: the embedded MiniLM config)")
    r.add_argument("config", nargs="?", help="pipeline YAML; omitted = the embedded default")
    r.add_argument("--workdir", help="run folder (default runs/<config name>)")
    common(r)
    r.set_defaults(fn=_cmd_run)

    tu = sub.add_parser("tune", help="search stage options per target on Ray Tune (fastest recipe within the accuracy/memory budget)")
    tu.add_argument("config", help="tune YAML: a base pipeline plus objective, space, search")
    tu.add_argument("--workdir", required=True, help="tune folder (trials, shared cache, tune/report.md)")
    tu.add_argument("--address", help="attach to a Ray cluster ('auto' or ray://HOST:PORT); default: local Ray")
    tu.add_argument("--trials", type=int, help="override search.trials")
    tu.add_argument("--time-budget", help="stop starting trials after this long (e.g. 30m, 2h, 90s)")
    tu.add_argument("--resume", action="store_true", help="continue the tune in --workdir; finished trials are not repeated")
    common(tu)
    tu.set_defaults(fn=_cmd_tune)

    v = sub.add_parser("validate", help="check a config without running it")
    v.add_argument("config")
    common(v)
    v.set_defaults(fn=_cmd_validate)

    t = sub.add_parser("targets", help="list target profiles, or 'targets show NAME'")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.add_argument("--file", action="append", help="also list this user profile YAML (repeatable)")
    common(t)
    t.set_defaults(fn=_cmd_targets)

    pa = sub.add_parser("plan-attention", help="pick the attention algorithm and block sizes for a target's cache")
    pa.add_argument("--target", required=True)
    pa.add_argument("--seq", type=int, required=True)
    pa.add_argument("--head-dim", type=int, required=True)
    pa.add_argument("--causal", action="store_true")
    pa.add_argument("--density", type=float, default=None, help="block-sparse density (fraction of blocks kept)")
    pa.add_argument("--json", action="store_true")
    common(pa)
    pa.set_defaults(fn=_cmd_plan)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pipeline.errors import EdgepipeError, ValidationFailed

    args = _parser().parse_args(argv)
    if args.version:
        from pipeline.version import __version__

        print(f"edgepipe {__version__}")
        return 0
    if not getattr(args, "fn", None):
        _parser().print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _setup_logging(args.quiet, args.debug)
    try:
        return args.fn(args)
    except ValidationFailed as exc:
        print(f"edgepipe: validation failed: {exc}", file=sys.stderr)
        if exc.table:
            print(exc.table, file=sys.stderr)
        return exc.exit_code
    except EdgepipeError as exc:
        if args.debug:
            raise
        print(f"edgepipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `edgepipe targets | head`
        return 0
    except KeyboardInterrupt:
        print("edgepipe: interrupted (completed stages are kept; run again to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # an edgepipe bug or an environment problem: still one line unless --debug
        if args.debug:
            raise
        print(f"edgepipe: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
