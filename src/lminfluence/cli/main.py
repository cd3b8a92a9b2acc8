"""`lminfluence`: fit factors, score queries, write the report, or run the built-in demo.

Each command resolves its configuration (defaults < --config YAML < flags),
checks every input before touching the run directory, saves the resolved
config there, and calls the library. Exit status 2 means bad input; the
message says what to fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..storage import layout
from ..workflow.config import RunConfig, merge, read_yaml
from ..workflow.rundir import RunDir

logger = logging.getLogger("lminfluence")

MODEL_FLAGS = {"model": "path", "gguf_file": "gguf_file", "tokenizer": "tokenizer", "dtype": "dtype", "device": "device"}
CORPUS_FLAGS = {"corpus": "path", "text_field": "text_field", "id_field": "id_field", "max_length": "max_length"}
FIT_FLAGS = {
    "strategy": "strategy",
    "fisher": "fisher",
    "modules": "modules",
    "seed": "seed",
    "fit_batch_size": "batch_size",
    "cache_gib": "cache_gib",
    "lissa_scale": "lissa_scale",
    "lissa_depth": "lissa_depth",
    "lissa_repeats": "lissa_repeats",
    "lissa_batch_size": "lissa_batch_size",
}
SCORE_FLAGS = {
    "queries": "queries",
    "candidates": "candidates",
    "rank": "rank",
    "rescore_top": "rescore_top",
    "top": "top",
    "damping_scale": "damping_scale",
    "damping": "damping",
    "score_batch_size": "batch_size",
    "query_batch_size": "query_batch_size",
    "chunk_size": "chunk_size",
    "save_matrix": "save_matrix",
}


class DeferredFileHandler(logging.Handler):
    """Logs into RUN/logs/<command>.log, holding records back until the run directory passed its checks.

    It opens once a record marked ``run_dir_ready`` arrives (``RunDir.prepare`` logs one), so
    a command refused for bad input leaves no log behind in somebody's directory.
    """

    def __init__(self, run_dir: Path, command: str, *, ready: bool = False) -> None:
        super().__init__()
        self.path = run_dir / layout.LOG_DIR / f"{command}.log"
        self.ready = ready
        self.pending: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(record)
        self.ready = self.ready or bool(getattr(record, "run_dir_ready", False))
        if self.ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                for r in self.pending:
                    f.write(self.format(r) + "\n")
            self.pending.clear()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with sections run_dir, model, corpus, fit, score (flags override it)")
    p.add_argument("--run-dir", "-o", dest="run_dir", help="the run directory (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="recompute this stage, replacing what --run-dir holds (needed when it holds a different run)")
    p.add_argument("--quiet", "-q", action="store_true", help="log warnings only")


def _add_fit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="Hugging Face model folder, or a .gguf file")
    g.add_argument("--gguf-file", help="GGUF file name inside --model")
    g.add_argument("--tokenizer", help="tokenizer folder, when not the model's")
    g.add_argument("--dtype", choices=("auto", "float32", "float64", "bfloat16", "float16"))
    g.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", help="JSON Lines, text file or folder, Parquet, or a saved `datasets` dataset")
    g.add_argument("--text-field", help="field/column holding the text (default text)")
    g.add_argument("--id-field", help="field/column holding the document id (default id)")
    g.add_argument("--max-length", type=int, help="tokens per training sequence (default 512)")
    g = p.add_argument_group("fit")
    g.add_argument("--strategy", help="ekfac (default), kfac, diagonal, identity, lissa")
    g.add_argument("--fisher", choices=("sampled", "empirical"))
    g.add_argument("--modules", help="comma-separated presets (mlp, attention) or globs over module names")
    g.add_argument("--seed", type=int)
    g.add_argument("--fit-batch-size", type=int, help="sequences per pass when fitting (default 8)")
    g.add_argument("--cache-gib", type=float, help="memory for replaying EK-FAC's first pass (default 4; 0 = off)")
    g.add_argument("--lissa-scale", type=float, help="LiSSA's α (default: from a power iteration)")
    g.add_argument("--lissa-depth", type=int, help="LiSSA recursion steps (default 1000)")
    g.add_argument("--lissa-repeats", type=int, help="independent LiSSA recursions averaged (default 1)")
    g.add_argument("--lissa-batch-size", type=int, help="sequences per Gauss–Newton-vector product (default 8)")


def _add_score(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("score")
    g.add_argument("--queries", help="JSON Lines with prompt, completion and an optional id")
    g.add_argument("--candidates", type=int, help="score only each query's top K sequences by TF-IDF")
    g.add_argument("--rank", type=int, help="rank-R query batching for the scan (the paper uses 32)")
    g.add_argument("--rescore-top", type=int, help="re-score each query's top and bottom M at full rank")
    g.add_argument("--top", type=int, help="sequences kept per query, most positive and most negative (default 10)")
    g.add_argument("--damping-scale", type=float, help="λ = scale × mean eigenvalue per layer (default 0.1)")
    g.add_argument("--damping", type=float, help="absolute λ, overriding --damping-scale")
    g.add_argument("--score-batch-size", type=int, help="training sequences per pass (default 8)")
    g.add_argument("--query-batch-size", type=int, help="queries per gradient pass / full-rank group (default 16)")
    g.add_argument("--chunk-size", type=int, help="sequences per saved chunk, the unit of resuming (default 1024)")
    g.add_argument("--save-matrix", action="store_true", default=None, help="also write every scored pair (matrix.parquet)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lminfluence", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="tokenize a corpus and fit curvature factors into a run directory")
    _add_common(p)
    _add_fit(p)
    p = sub.add_parser("score", help="score queries against a fitted run's corpus")
    _add_common(p)
    _add_score(p)
    p = sub.add_parser("report", help="write the HTML report of a scored run")
    p.add_argument("--run-dir", "-o", dest="run_dir", required=True)
    p.add_argument("--top", type=_positive, default=10, help="sequences shown per query (default 10)")
    p.add_argument("--output", help="HTML file to write (default RUN/report/index.html)")
    p.add_argument("--quiet", "-q", action="store_true")
    p = sub.add_parser("run", help="fit, score and report in one go (e.g. replay a saved config.yaml)")
    _add_common(p)
    _add_fit(p)
    _add_score(p)
    p = sub.add_parser("demo", help="the built-in example: planted facts in real text, a small GPT, EK-FAC, the report")
    p.add_argument("--workdir", default="lminfluence-demo", help="where the demo builds its data, model and run (default ./lminfluence-demo)")
    p.add_argument("--scale", choices=("full", "tiny"), default="full", help="tiny: a seconds-long smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="recompute the run in WORKDIR/run (the data and model are rebuilt only when their settings change)")
    p.add_argument("--quiet", "-q", action="store_true")
    return parser


def _section(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, flag) for flag, key in flags.items() if hasattr(args, flag) and getattr(args, flag) is not None}


def resolve(args: argparse.Namespace, sections: tuple[str, ...]) -> RunConfig:
    """defaults < --config < flags; `score` takes model, corpus and fit from the run directory.

    Score settings come from --config and flags over the defaults; only a bare
    `lminfluence score -o RUN` (no score flag, no score section) repeats the saved ones,
    and a missing --queries falls back to the saved queries file.
    """
    from_file = read_yaml(args.config) if args.config else {}
    for name in ("model", "corpus", "fit", "score"):
        if name in from_file and not isinstance(from_file[name], dict):
            raise InputError(f"{args.config}: section {name!r} must be a mapping of options, got {type(from_file[name]).__name__}")
    run_dir = args.run_dir or from_file.get("run_dir")
    if not run_dir:
        raise InputError("give --run-dir (or run_dir in --config)")
    data: dict[str, Any] = {k: v for k, v in from_file.items() if k in sections or (k in ("model", "corpus", "fit") and "fit" in sections)}
    if "fit" in sections:
        data = merge(data, {"model": _section(args, MODEL_FLAGS), "corpus": _section(args, CORPUS_FLAGS), "fit": _section(args, FIT_FLAGS)})
    else:  # score reuses what fit saved
        saved = RunDir(run_dir).saved_config()
        if saved is None:
            raise InputError(f"{run_dir} is not a run directory (no {layout.RUN_CONFIG}); run `lminfluence fit` first")
        data.update({k: v for k, v in saved.items() if k in ("model", "corpus", "fit")})
    if "score" in sections:
        flags = _section(args, SCORE_FLAGS)
        if "damping" in flags:  # one damping wins over the other, whichever layer set it
            flags["damping_scale"] = None
        elif "damping_scale" in flags:
            flags["damping"] = None
        given = dict(from_file.get("score") or {})
        saved_score = (RunDir(run_dir).saved_config() or {}).get("score") if "fit" not in sections else None
        if not given and not flags and saved_score:
            score = dict(saved_score)
        else:
            score = {**given, **flags}
            if not score.get("queries") and saved_score:
                score["queries"] = saved_score.get("queries")
        if not score.get("queries"):
            raise InputError("give --queries (or a score section in --config)")
        data["score"] = score
    return RunConfig.from_dict({"run_dir": run_dir, **{k: v for k, v in data.items() if k != "run_dir"}})


def _setup_logging(quiet: bool) -> None:
    import os

    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if quiet:  # progress bars too (ours and the libraries' tqdm bars)
        os.environ["TQDM_DISABLE"] = "1"


def _attach_log(run_dir: str, command: str, *, ready: bool = False) -> None:
    logger.addHandler(DeferredFileHandler(Path(run_dir).expanduser().resolve(), command, ready=ready))


def run_command(args: argparse.Namespace) -> int:
    from ..workflow.fitting import run_fit
    from ..workflow.scoring import run_score

    if args.command == "fit":
        config = resolve(args, ("fit",))
        _attach_log(config.run_dir, "fit")
        run_fit(config, overwrite=args.overwrite, progress=not args.quiet)
        print(f"factors: {Path(config.run_dir) / layout.FACTORS_DIR}")
    elif args.command == "score":
        config = resolve(args, ("score",))
        _attach_log(config.run_dir, "score")
        run_score(config, overwrite=args.overwrite)
        print(f"scores: {Path(config.run_dir) / layout.SCORES_DIR}")
    elif args.command == "report":
        from ..report import write_report

        _attach_log(args.run_dir, "report", ready=(Path(args.run_dir) / layout.RUN_CONFIG).is_file())
        path = write_report(args.run_dir, output=args.output, top=args.top)
        print(f"report: {path}")
    elif args.command == "run":
        config = resolve(args, ("fit", "score"))
        _attach_log(config.run_dir, "run")
        run_fit(config, overwrite=args.overwrite)
        run_score(config, overwrite=args.overwrite)
        from ..report import write_report

        print(f"report: {write_report(config.run_dir)}")
    elif args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = list(logger.handlers)
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    _setup_logging(args.quiet)
    try:
        return run_command(args)
    except (InputError, FileNotFoundError) as e:
        print(f"lminfluence {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ArithmeticError as e:  # e.g. LiSSA's divergence: numbers we refuse to return
        print(f"lminfluence {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lminfluence {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:  # leave the process as it was (tests and notebooks call main() many times)
        for h in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(h)
            h.close()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)


if __name__ == "__main__":
    sys.exit(main())
