"""The ``edgepipe`` command line.

    edgepipe run [CONFIG.yaml] [--workdir DIR] [--quiet] [--debug]
    edgepipe validate CONFIG.yaml|TUNE.yaml [--workdir DIR]
    edgepipe tune TUNE.yaml --workdir DIR [--address ADDR] [--trials N] [--time-budget 30m] [--resume]
    edgepipe targets [--file PROFILE.yaml ...]
    edgepipe targets show NAME_OR_PATH
    edgepipe compile-program PROG.sq [--memory FILE] --target NAME... --workdir DIR
    edgepipe plan-attention --target NAME --seq N --head-dim D [--json]

Bad input prints one line naming the cause and where, and exits with code 2 (a failed validation gate: 1);
``--debug`` shows the traceback. ``validate`` runs every check of ``run`` that needs no model weights; on a tune
file (one with ``space`` / ``objective`` / ``search`` keys) every check of ``tune``, for every trial, without Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

log = logging.getLogger("edgepipe")
MAX_PLAN_SEQ = 1 << 20  # plan-attention: longer sequences are refused (closed forms: answered in ~1 s)
MAX_PLAN_HEAD_DIM = 1024
MAX_PLAN_CAUSAL_WORK = (
    1 << 21
)  # --causal counts tiles one by one: seq * head_dim above this is refused (~3 s at the cap)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"edgepipe: error: {self.prog}: {message.splitlines()[0] if message else 'bad arguments'}\n")


def _one_line(exc: BaseException, limit: int = 1000) -> str:
    """The first line of an error message, bounded: the CLI never prints more than one line per error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[:limit] + "..."


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
        for name in (
            "torch",
            "transformers",
            "optimum",
            "onnxscript",
            "onnx_ir",
            "onnxruntime",
            "ort_format_model",
            "",
        ):
            logging.getLogger(name).setLevel(logging.ERROR)  # "" = the root logger some libraries log to directly
        root_logger = logging.getLogger()
        if not root_logger.handlers:
            # tools that call logging.basicConfig() and set their own loggers to DEBUG (onnxruntime's ORT-format
            # converter, its mobile checker) would print through a root handler; with one already there,
            # basicConfig adds none and their records end here. Errors reach the user as edgepipe's one line.
            root_logger.addHandler(logging.NullHandler())
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _quiet_onnxruntime(debug: bool) -> None:
    """ONNX Runtime's C++ logger writes (coloured) lines to stderr on its own; without --debug only fatal ones."""
    if debug:
        return
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
    except Exception:
        pass


def _cmd_run(args: argparse.Namespace) -> int:
    import pipeline
    from pipeline.errors import ConfigError

    if args.workdir is not None and not args.workdir.strip():
        raise ConfigError("--workdir: empty path; give a folder for the run (e.g. runs/my-model)")
    workdir = args.workdir or (f"runs/{Path(args.config).stem}" if args.config else "runs/default")
    _quiet_onnxruntime(args.debug)
    report = pipeline.run(args.config, workdir=workdir, progress=not args.quiet)
    if not args.quiet:
        print(f"edgepipe: run complete in {report['seconds']:.1f} s -> {Path(workdir) / 'report.md'}")
        for name, t in report["targets"].items():
            lat = t.get("latency_ms") or {}
            par = t.get("parity") or {}
            p50 = f"  p50={lat['p50']:.2f} ms" if lat.get("p50") is not None else ""
            print(f"  {name:<18} {t['precision']:<11} {t['size_bytes'] / 1e6:7.3g} MB  parity ok={par.get('ok')}{p50}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import tune
    from pipeline.tune.duration import parse_duration

    budget = parse_duration(args.time_budget) if args.time_budget else None
    try:
        report = tune(
            args.config,
            workdir=args.workdir,
            address=args.address,
            trials=args.trials,
            time_budget_s=budget,
            resume=args.resume,
            echo=(lambda s: None) if args.quiet else (lambda s: print(s, flush=True)),
            debug=args.debug,
        )
    except KeyboardInterrupt as exc:  # SIGINT / SIGTERM: Ray is already shut down
        sig = str(exc) or "SIGINT"
        print(
            f"edgepipe: tune stopped by {sig}; Ray is shut down and finished trials are kept:"
            f" continue with 'edgepipe tune {args.config} --workdir {args.workdir} --resume'",
            file=sys.stderr,
        )
        return 130 if sig == "SIGINT" else 143
    finally:
        sys.stdout.flush()
    if not args.quiet:
        print(
            f"edgepipe: tune complete ({len(report['trials'])} trials) -> {Path(args.workdir) / 'tune' / 'report.md'}"
        )
        from pipeline.tune.report import console_lines

        for line in console_lines(report):
            print(line)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.preflight import check_workdir, preflight

    if Path(args.config).is_file() and _is_tune_file(args.config):
        return _validate_tune(args)
    cfg = load_config(args.config)
    pre = preflight(cfg, source=args.config)
    if args.workdir is not None:
        check_workdir(args.workdir, pre.model_path, cfg.calibration.file)
    print(
        f"{args.config}: OK ({len(cfg.stages)} stages: {', '.join(s.kind for s in cfg.stages)}; targets: {', '.join(pre.profiles)};"
        f" model: {pre.family} {pre.task}; {len(pre.texts)} calibration passages)"
    )
    return 0


def _is_tune_file(path: str) -> bool:
    from pipeline.errors import ConfigError
    from pipeline.tune.check import is_tune_file

    try:
        return is_tune_file(path)
    except ConfigError:  # unreadable YAML: the run config loader names the problem
        return False


def _validate_tune(args: argparse.Namespace) -> int:
    """``edgepipe validate TUNE.yaml``: the tune's whole validation, no Ray started."""
    from pipeline.tune.check import check_tune

    res = check_tune(args.config)
    spec, pre = res.spec, res.preflight
    checked = (
        f"{res.checked} trial configurations checked"
        if res.checked == res.combinations
        else f"{res.checked} of {res.combinations} trial configurations checked"
    )
    print(
        f"{args.config}: OK (tune: {len(spec.dimensions)} dimensions, {checked}; search {spec.search.algorithm},"
        f" {spec.search.trials} trials; base: {', '.join(s.kind for s in spec.base.stages)}; targets:"
        f" {', '.join(pre.profiles)}; model: {pre.family} {pre.task}; {len(pre.texts)} calibration passages)"
    )
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    import yaml

    from targets import list_targets, load_target

    if args.action == "show":
        if not args.name:
            from pipeline.errors import ConfigError

            raise ConfigError("targets show: give a target name or a profile path (see 'edgepipe targets')")
        prof = load_target(args.name)
        print(yaml.safe_dump(prof.model_dump(mode="json"), sort_keys=False).rstrip())
        return 0
    rows = list_targets(args.file or [])
    w = max(len(p.name) for p, _ in rows)
    for prof, src in rows:
        print(f"{prof.name:<{w}}  {prof.arch:<8} {prof.device:<4} {','.join(prof.precisions):<22} {src}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import math

    from pipeline.errors import ConfigError
    from pipeline.kernels.planner import cache_words_from_bytes, plan_attention
    from targets import load_target

    if not 1 <= args.seq <= MAX_PLAN_SEQ:
        raise ConfigError(f"plan-attention: --seq must be in 1..{MAX_PLAN_SEQ}, got {args.seq}")
    if not 1 <= args.head_dim <= MAX_PLAN_HEAD_DIM:
        raise ConfigError(f"plan-attention: --head-dim must be in 1..{MAX_PLAN_HEAD_DIM}, got {args.head_dim}")
    if args.density is not None and not (math.isfinite(args.density) and 0.0 < args.density <= 1.0):
        raise ConfigError(f"plan-attention: --density must be a fraction in (0, 1], got {args.density}")
    if args.causal and args.density is None and args.seq * args.head_dim > MAX_PLAN_CAUSAL_WORK:
        raise ConfigError(
            f"plan-attention: --causal counts every tile; --seq x --head-dim must be at most {MAX_PLAN_CAUSAL_WORK:,}"
            f" (got {args.seq:,} x {args.head_dim}); plan without --causal for an upper bound"
        )
    prof = load_target(args.target)
    plan = plan_attention(
        cache_words=cache_words_from_bytes(prof.cache_bytes()),
        seq=args.seq,
        head_dim=args.head_dim,
        causal=args.causal,
        density=args.density,
    )
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


def _cmd_compile_program(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.programs.build import BuildOptions, compile_to_workdir

    for flag, v in (
        ("--max-steps", args.max_steps),
        ("--random-memories", args.random_memories + 1),
        ("--unroll", args.unroll or 1),
    ):
        if v < 1:
            raise ConfigError(f"{flag}: must be positive, got {v}")
    if args.word_bits is not None and not 2 <= args.word_bits <= 32:
        raise ConfigError(f"--word-bits: must be in 2..32, got {args.word_bits}")
    if args.memory_cells is not None and args.memory_cells < 1:
        raise ConfigError(f"--memory-cells: must be positive, got {args.memory_cells}")
    if args.program_slots is not None and (args.program_slots < 2 or args.program_slots & (args.program_slots - 1)):
        raise ConfigError(f"--program-slots: must be a power of two >= 2, got {args.program_slots}")
    opts = BuildOptions(
        construction=args.construction,
        program_in=args.program_in,
        max_steps=args.max_steps,
        random_memories=args.random_memories,
        unroll_steps=args.unroll,
        sparse=args.sparse,
        seed=args.seed,
    )
    sizes = {"word_bits": args.word_bits, "memory_cells": args.memory_cells, "program_slots": args.program_slots}
    rep = compile_to_workdir(
        Path(args.program),
        Path(args.workdir),
        args.target,
        opts,
        memory_path=Path(args.memory) if args.memory else None,
        sizes=sizes,
    )
    if not args.quiet:
        net, m = rep["network"], rep["machine"]
        print(
            f"edgepipe: {args.program}: N={m['word_bits']} M={m['memory_cells']} I={m['program_slots']}, {rep['construction']} "
            f"depth {net['depth']}, max width {net['max_width']}, {net['nonzeros']} nonzero weights; "
            f"interpreter: {rep['interpreter']['status']} after {rep['interpreter']['steps']} steps -> {Path(args.workdir) / 'report.json'}"
        )
        for name, t in rep["targets"].items():
            exact = ", ".join(
                f"{p} {'exact' if v else 'NOT exact'}" for p, v in t["bit_exact"].items() if v is not None
            )
            print(f"  {name:<18} {exact:<24} {t['steps_per_s']:>10.0f} steps/s  {t['size_bytes'] / 1e3:8.1f} kB")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="edgepipe", description="Compress transformer models and ship validated ONNX models to edge targets."
    )
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

    tu = sub.add_parser(
        "tune", help="search stage options per target on Ray Tune (fastest recipe within the accuracy/memory budget)"
    )
    tu.add_argument("config", help="tune YAML: a base pipeline plus objective, space, search")
    tu.add_argument("--workdir", required=True, help="tune folder (trials, shared cache, tune/report.md)")
    tu.add_argument("--address", help="attach to a Ray cluster ('auto' or ray://HOST:PORT); default: local Ray")
    tu.add_argument("--trials", type=int, help="override search.trials")
    tu.add_argument("--time-budget", help="stop starting trials after this long (e.g. 30m, 2h, 90s)")
    tu.add_argument(
        "--resume", action="store_true", help="continue the tune in --workdir; finished trials are not repeated"
    )
    common(tu)
    tu.set_defaults(fn=_cmd_tune)

    v = sub.add_parser("validate", help="check a config or a tune file without running it")
    v.add_argument("config")
    v.add_argument(
        "--workdir", help="also check this run folder (edgepipe's own, new or empty; not in the model folder)"
    )
    common(v)
    v.set_defaults(fn=_cmd_validate)

    t = sub.add_parser("targets", help="list target profiles, or 'targets show NAME'")
    t.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    t.add_argument("name", nargs="?")
    t.add_argument("--file", action="append", help="also list this user profile YAML (repeatable)")
    common(t)
    t.set_defaults(fn=_cmd_targets)

    from pipeline.programs.compile import CONSTRUCTIONS, PROGRAM_IN

    cp = sub.add_parser(
        "compile-program",
        help="compile a SUBLEQ program into looped ReLU-MLP ONNX models, checked bit-exactly per target",
    )
    cp.add_argument("program", help="SUBLEQ assembly file (.sq)")
    cp.add_argument("--memory", help="JSON file {label: value or [values]} replacing initial memory cells")
    cp.add_argument("--target", action="append", required=True, help="target name or profile YAML (repeatable)")
    cp.add_argument("--workdir", required=True, help="output folder: <target>/ and report.json")
    cp.add_argument(
        "--construction",
        choices=CONSTRUCTIONS,
        default=CONSTRUCTIONS[0],
        help="shallow (default) or the paper's 23 layers",
    )
    cp.add_argument(
        "--program-in",
        choices=PROGRAM_IN,
        default=PROGRAM_IN[0],
        help="code baked into the weights (default) or held in the state",
    )
    cp.add_argument("--word-bits", type=int, help="N (default: the program's .bits, else 8)")
    cp.add_argument("--memory-cells", type=int, help="M (default: the cells the program declares)")
    cp.add_argument("--program-slots", type=int, help="I, a power of two (default: the smallest that holds the code)")
    cp.add_argument("--max-steps", type=int, default=10_000, help="step budget of the parity runs (default 10000)")
    cp.add_argument(
        "--random-memories", type=int, default=8, help="random memories checked besides the given one (default 8)"
    )
    cp.add_argument("--unroll", type=int, help="also ship an unrolled graph of this many steps")
    cp.add_argument(
        "--sparse",
        choices=["auto", "always", "never"],
        default="auto",
        help="sparse weight storage (auto: where it shrinks the file)",
    )
    cp.add_argument("--seed", type=int, default=0)
    common(cp)
    cp.set_defaults(fn=_cmd_compile_program)

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


def main(argv: Sequence[str] | None = None) -> int:
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
        print(f"edgepipe: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `edgepipe targets | head`
        return 0
    except KeyboardInterrupt:
        print("edgepipe: interrupted (completed stages are kept; run again to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # an edgepipe bug or an environment problem: still one line unless --debug
        if args.debug:
            raise
        print(
            f"edgepipe: internal error: {type(exc).__name__}: {_one_line(exc, 300)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
