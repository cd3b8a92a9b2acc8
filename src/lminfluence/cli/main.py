"""`lminfluence`: fit factors, index the corpus's gradients, score queries, write the report, or run the built-in demo.

Each command resolves its configuration (defaults < --config YAML < flags),
checks every input before touching the run directory, then calls the
library. Exit status 2 means bad input (the one-line message says what to
fix), 1 numbers the library refuses to return (a diverging LiSSA), 130 an
interruption (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..errors import InputError, describe, exit_status
from ..storage import layout
from ..workflow.config import RunConfig, check_sections, merge, read_yaml
from ..workflow.rundir import EXECUTION_KEYS, RunDir
from .logging import attach_log, command_logging, silence
from .options import add_section, given

STAGE_SECTIONS = {"fit": ("model", "corpus", "fit"), "index": ("index",), "score": ("score",), "run": ("model", "corpus", "fit", "score")}


def _add_common(p: argparse.ArgumentParser, dry_run: bool) -> None:
    p.add_argument("--config", help="YAML file with sections run_dir, model, corpus, fit, score, index (flags override it)")
    p.add_argument("--run-dir", "-o", dest="run_dir", help="the run directory (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="recompute, replacing what --run-dir holds once the new results are complete")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    if dry_run:
        p.add_argument(
            "--dry-run", action="store_true",
            help="print the memory and time each stage will need and the batch sizes picked for the budget (--memory-gib), then stop; writes nothing",
        )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `lminfluence` argument parser; the stage commands' flags come from the config dataclasses."""
    parser = argparse.ArgumentParser(prog="lminfluence", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "fit": "tokenize a corpus and fit curvature factors into a run directory",
        "index": "store the fitted run's training gradients compressed, for `score --index` (docs/index.md)",
        "score": "score queries against a fitted run's corpus",
        "run": "fit, score and report in one go (e.g. replay a saved config.yaml)",
    }
    for command, sections in STAGE_SECTIONS.items():
        p = sub.add_parser(command, help=helps[command])
        _add_common(p, dry_run=command != "index")  # the index's compression is not in the memory plan yet
        for section in sections:
            add_section(p, section)
    p = sub.add_parser("analyze", help="the paper's analyses of a scored run (sparsity, layers, spurious sequences, cross-lingual, word order)")
    p.add_argument("--run-dir", "-o", dest="run_dir", required=True)
    p.add_argument(
        "--k", type=_positive, help="sequences per end of each query's list used by the layer, spurious and cross-lingual analyses (default: all shown)"
    )
    p.add_argument("--pairs", help="JSON Lines of statement pairs (query_id, statement, flipped, optional id) to score in both word orders")
    p.add_argument("--quiet", "-q", action="store_true")
    p = sub.add_parser("compare", help="compare the rankings of two scored runs (two models on the same corpus and queries)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--k", type=_positive, default=10, help="top-k of the overlap (default 10)")
    p.add_argument("--output", help="also write the comparison table to this Parquet file")
    p.add_argument("--quiet", "-q", action="store_true")
    p = sub.add_parser("report", help="write the HTML report of a scored run")
    p.add_argument("--run-dir", "-o", dest="run_dir", required=True)
    p.add_argument("--top", type=_positive, default=10, help="sequences shown per query (default 10)")
    p.add_argument("--output", help="HTML file to write (default RUN/report/index.html)")
    p.add_argument("--quiet", "-q", action="store_true")
    p = sub.add_parser("demo", help="the built-in example: planted facts in real text, a small GPT, EK-FAC, the report")
    p.add_argument("--workdir", default="lminfluence-demo", help="where the demo builds its data, model and run (default ./lminfluence-demo)")
    p.add_argument("--scale", choices=("full", "tiny"), default="full", help="tiny: a seconds-long smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="recompute the run in WORKDIR/run (the data and model are rebuilt only when their settings change)")
    p.add_argument("--quiet", "-q", action="store_true")
    return parser


def resolve(args: argparse.Namespace, command: str) -> RunConfig:
    """Defaults < --config < flags; `score` and `index` take model, corpus and fit from the run directory.

    Score settings come from --config and flags over the defaults; only a bare
    `lminfluence score -o RUN` (no score flag, no score section) repeats the saved ones,
    and a missing --queries falls back to the saved queries file. The same holds for
    `index` and its section. Each of the two keeps the other's saved section.
    """
    from_file = read_yaml(args.config) if args.config else {}
    check_sections(from_file, args.config or "config")
    run_dir = args.run_dir or from_file.get("run_dir")
    if not run_dir or not isinstance(run_dir, str):
        raise InputError("give --run-dir (or run_dir in --config)")
    data: dict[str, Any] = {k: v for k, v in from_file.items() if k != "run_dir"}
    if command in ("score", "index"):  # model, corpus and fit are what the finished fit recorded in run.json
        rd = RunDir(run_dir)
        fit = rd.finished("fit") if rd.is_run() else None
        if fit is None or not isinstance(fit.get("sections"), dict):
            raise InputError(f"{run_dir} is not a run directory with a finished fit; run `lminfluence fit` first")
        data.update(fit["sections"])
        saved = rd.saved_config() or {}
        other = "index" if command == "score" else "score"
        data[other] = saved.get(other) if rd.finished(other) else None
        if command == "index":
            data["index"] = _index_section(args, saved, from_file)
    else:
        data = merge(data, {name: given(args, name) for name in ("model", "corpus", "fit")})
        data.pop("index", None)  # fit and run build no index
    if "score" in STAGE_SECTIONS[command]:
        data["score"] = _score_section(args, run_dir, from_file, command)
    elif command == "fit":
        data.pop("score", None)
    return RunConfig.from_dict({"run_dir": run_dir, **data}, where=args.config or "options")


def _index_section(args: argparse.Namespace, saved: dict[str, Any], from_file: dict[str, Any]) -> dict[str, Any]:
    """Flags over --config's index section over the defaults; a bare `lminfluence index -o RUN` repeats the saved section."""
    flags = given(args, "index")
    in_file = from_file.get("index")
    if in_file is not None and not isinstance(in_file, dict):
        raise InputError(f"{args.config}: section 'index' must be a mapping of options, got {type(in_file).__name__}")
    if not in_file and not set(flags) - EXECUTION_KEYS and isinstance(saved.get("index"), dict):
        return {**saved["index"], **flags}  # execution flags (batch size, memory) change no result: over the saved section
    return {**(in_file or {}), **flags}


def _score_section(args: argparse.Namespace, run_dir: str, from_file: dict[str, Any], command: str) -> dict[str, Any]:
    flags = given(args, "score")
    if "damping" in flags:  # one damping wins over the other, whichever layer set it
        flags["damping_scale"] = None
    elif "damping_scale" in flags:
        flags["damping"] = None
    in_file = from_file.get("score")
    if in_file is not None and not isinstance(in_file, dict):
        raise InputError(f"{args.config}: section 'score' must be a mapping of options, got {type(in_file).__name__}")
    saved = (RunDir(run_dir).saved_config() or {}).get("score") if command == "score" else None
    if not in_file and not set(flags) - EXECUTION_KEYS and saved:
        score = {**saved, **flags}  # execution flags (batch sizes, memory) change no result: over the saved section
    else:
        score = {**(in_file or {}), **flags}
        if not score.get("queries") and saved:
            score["queries"] = saved.get("queries")
    if not score.get("queries"):
        raise InputError("give --queries (or a score section in --config)")
    return score


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command; its exit status (errors are raised, and mapped by ``main``)."""
    from ..workflow.fitting import execute_fit, prepare_fit
    from ..workflow.indexing import execute_index, prepare_index
    from ..workflow.scoring import execute_score, prepare_queries, prepare_score

    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "report":
        from ..report import load_run, write_report

        rd = RunDir(args.run_dir)
        run = load_run(rd.path, args.top)  # every file checked before anything (a log line included) is written
        attach_log(rd.path, "report", ready=True)
        inside = args.output is None or rd.path in Path(args.output).expanduser().resolve().parents
        with rd.lock() if inside else contextlib.nullcontext():
            path = write_report(rd.path, output=args.output, top=args.top, run=run)
        print(f"report: {path}")
        return 0

    config = resolve(args, args.command)
    if getattr(args, "dry_run", False):
        from .dryrun import dry_run

        print(dry_run(config, args.command, args.overwrite))
        return 0
    if dist.init(_device(config)) and not dist.is_main():  # under torchrun rank 0 alone logs, draws bars and prints
        silence()
    elif dist.is_main():
        attach_log(config.run_dir, args.command)
    if args.command == "fit":
        plan = prepare_fit(config, overwrite=args.overwrite)
        with _lock(plan.rd, writes=not plan.reuse):
            execute_fit(plan, progress=not args.quiet)
        _say(f"factors: {Path(config.run_dir) / layout.FACTORS_DIR}")
    elif args.command == "index":
        indexing = prepare_index(config, overwrite=args.overwrite)
        with _lock(indexing.rd, writes=not indexing.up_to_date):
            built = execute_index(indexing)
        if built is not None:
            _say(f"index: {built.path} ({built.num_sequences} sequences, {built.bytes_per_sequence:,} bytes each)")
    elif args.command == "score":
        score = prepare_score(config, overwrite=args.overwrite)
        with _lock(score.rd, writes=not score.up_to_date):
            execute_score(score)
        _say(f"scores: {Path(config.run_dir) / layout.SCORES_DIR}")
    elif args.command == "run":
        plan = prepare_fit(config, overwrite=args.overwrite)
        queries = prepare_queries(config, plan.tokenizer, plan.model)  # bad queries are refused before the fit
        with _lock(plan.rd):
            execute_fit(plan, progress=not args.quiet)
            score = prepare_score(config, overwrite=args.overwrite, model=plan.model, tokenizer=plan.tokenizer, queries=queries)
            execute_score(score)
            with dist.checked():
                if dist.is_main():
                    from ..analysis import analyze_run
                    from ..report import write_report

                    analyze_run(config.run_dir, model=plan.model, tokenizer=plan.tokenizer)
                    _say(f"report: {write_report(config.run_dir)}")
    return 0


def _device(config: RunConfig) -> str | None:
    return None if config.model.device == "auto" else config.model.device


def _lock(rd: RunDir, writes: bool = True) -> Any:
    """The run directory's lock, held by rank 0 for all ranks (one process group is one command).

    A command that will write nothing (the results are up to date) takes no lock, so it also
    works on a run directory it may only read.
    """
    return rd.lock() if dist.is_main() and writes else contextlib.nullcontext()


def _say(text: str) -> None:
    if dist.is_main():
        print(text)


def _analyze(args: argparse.Namespace) -> int:
    from ..analysis import analyze_run

    rd = RunDir(args.run_dir)
    if not rd.is_run():
        raise InputError(f"{rd.path} is not a run directory; run `lminfluence fit` and `lminfluence score` first")
    attach_log(rd.path, "analyze", ready=True)
    with rd.lock():
        result = analyze_run(rd.path, k=args.k, word_order_pairs=args.pairs)
    print(f"analysis: {rd / layout.ANALYSIS_DIR} ({', '.join(sorted(result.tables))})")
    if result.word_order:
        w = result.word_order
        print(
            f"word order: {w['num_pairs']} pairs; the flipped form keeps a median {w['median_kept']:.2f}× the influence "
            f"and scores lower for {w['flipped_lower_share']:.0%}"
        )
    return 0


def _compare(args: argparse.Namespace) -> int:
    import numpy as np

    from ..analysis import compare_runs

    table = compare_runs(args.run_a, args.run_b, k=args.k)
    if args.output:
        import pyarrow.parquet as pq

        from ..storage.atomic import atomic_write

        atomic_write(Path(args.output), lambda tmp: pq.write_table(table, tmp))
    cols = table.to_pydict()
    print(f"{'query':24} {'spearman':>9} {f'top-{args.k} overlap':>14}")
    for row in zip(*(cols[c] for c in ("query_id", "spearman", "overlap"))):
        print(f"{str(row[0])[:24]:24} {row[1]:9.3f} {row[2]:14.2f}")
    spearman, overlap = np.nanmedian(cols["spearman"]), np.nanmedian(cols["overlap"])
    print(f"median: spearman {spearman:.3f}, top-{args.k} overlap {overlap:.2f} over {len(cols['query_id'])} queries")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The console script: run a command and map what it raises to an exit status with one line on stderr."""
    args = build_parser().parse_args(argv)
    left = False
    with command_logging(args.quiet):
        try:
            status = run_command(args)
            dist.barrier()  # every rank finished: leave together
        except BaseException as e:  # noqa: BLE001 - mapped to an exit status, or re-raised
            code = exit_status(e)
            if code is None or isinstance(e, SystemExit):
                raise
            status = code
            if status == 130:
                print(f"lminfluence {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
            else:
                print(f"lminfluence {args.command}: error: {describe(e)}", file=sys.stderr)
        finally:
            left = dist.shutdown()
    if left:  # under torchrun: every output is written and the group is left
        # gloo's transport threads can outlive the group and abort the interpreter's own exit (SIGABRT, "terminate
        # called without an active exception", in about one run in ten), which torchrun reports as a failed run
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
