"""Category 1, bad input: the review's cases 1-101 and 108-136 (read-only folders and full disks are in cases_env.py).

Each row: the review's number and description, the run directory it starts from
(``new``: none; ``fitted``/``scored``: a copy of the base run), the command, and the
words its one error line must contain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cases import Case, Ctx, cli_case
from harness import Outcome, read_table, truncate

FIT = ["fit", "--model", "{A}", "--corpus", "{corpus}", "--max-length", "128", "-o", "{run}"]
SCORE = ["score", "-o", "{run}", "--queries", "{in}/q.jsonl"]
REPORT = ["report", "-o", "{run}"]


def fit(*extra: str, model: str = "{A}", corpus: str = "{corpus}") -> list[str]:
    return ["fit", "--model", model, "--corpus", corpus, "--max-length", "128", "-o", "{run}", *extra]


def fit_config(name: str) -> list[str]:
    return [*FIT, "--config", "{in}/" + name]


def _cuda(ctx: Ctx, run: Path, case: Path) -> dict:
    """--device for a CUDA device that is not there: 'cuda' without a GPU, one past the last with GPUs."""
    import torch

    return {"cuda": f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"}


def _file_at_run(ctx: Ctx, run: Path, case: Path) -> None:
    run.write_text("a file, not a folder\n")


def _foreign_dir(ctx: Ctx, run: Path, case: Path) -> None:
    run.mkdir()
    (run / "notes.txt").write_text("somebody's files\n")


def _damage(rel: str, how: str = "truncate"):
    def setup(ctx: Ctx, run: Path, case: Path) -> None:
        if how == "truncate":
            truncate(run / rel)
        elif how == "delete":
            (run / rel).unlink()

    return setup


def _replace_dir(rel: str, base: str):
    def setup(ctx: Ctx, run: Path, case: Path) -> None:
        shutil.rmtree(run / rel)
        shutil.copytree(ctx.base(base) / rel, run / rel)

    return setup


def _a_file(ctx: Ctx, run: Path, case: Path) -> dict:
    f = case / "q.jsonl"
    shutil.copy(ctx.p["in"] / "q.jsonl", f)
    return {"file": str(f)}


def _a_dir(ctx: Ctx, run: Path, case: Path) -> dict:
    (case / "adir").mkdir()
    return {"adir": str(case / "adir")}


def _blank_skipped(ctx: Ctx, run: Path, o: Outcome) -> tuple[bool, str]:
    ids = set(read_table(run / "corpus/sequences.parquet")["doc_id"])
    return ("blank" not in ids and len(ids) == 5), f"documents tokenized: {sorted(ids)}"


def _queries_are(path: str):
    def check(ctx: Ctx, run: Path, o: Outcome) -> tuple[bool, str]:
        import json

        want = [json.loads(line)["id"] for line in (ctx.p["in"] / path).read_text(encoding="utf-8").splitlines() if line.strip()]
        got = read_table(run / "scores/queries.parquet")["query_id"]
        return got == want, f"queries.parquet ids {got}"

    return check


def cases() -> list[Case]:
    notok = "the tokenizer"
    return [
        cli_case(1, "fit missing corpus", "new", fit(corpus="{in}/nope.jsonl"), mentions=("nope.jsonl",)),
        cli_case(2, "fit missing model dir", "new", fit(model="{in}/nope"), mentions=("nope",)),
        cli_case(3, "fit model dir without config.json", "new", fit(model="{in}/c_emptydir"), mentions=("config.json",)),
        cli_case(4, "fit model dir without tokenizer", "new", fit(model="{A_notok}"), mentions=("tokenizer",), avoid=("corpus has no sequence",),
                 adapted=f"the review failed this by hand for naming the corpus; the message must name {notok}"),
        cli_case(5, "fit truncated model.safetensors", "new", fit(model="{A_corrupt}"), mentions=("modelA_corrupt",)),
        cli_case(6, "fit garbage model.safetensors", "new", fit(model="{A_garbage}"), mentions=("modelA_garbage",)),
        cli_case(7, "fit invalid config.json in model", "new", fit(model="{A_badcfg}"), mentions=("modelA_badcfg",)),
        cli_case(8, "fit --tokenizer missing", "new", fit("--tokenizer", "{in}/nope"), mentions=("tokenizer",)),
        cli_case(9, "fit empty corpus file", "new", fit(corpus="{in}/c_empty.jsonl"), mentions=("c_empty.jsonl",)),
        cli_case(10, "fit corpus of empty lines", "new", fit(corpus="{in}/c_blank_lines.jsonl"), mentions=("c_blank_lines.jsonl",)),
        cli_case(11, "fit corpus = one whitespace-only doc", "new", fit(corpus="{in}/c_ws_doc.jsonl"), mentions=("c_ws_doc.jsonl",)),
        cli_case(12, "fit whitespace-only doc among good docs", "new", fit("--strategy", "identity", corpus="{in}/c_ws_mixed.jsonl"),
                 expect="succeeds", check=_blank_skipped, expected="exit 0; the blank doc skipped"),
        cli_case(13, "fit invalid JSON line", "new", fit(corpus="{in}/c_invalid.jsonl"), mentions=("c_invalid.jsonl:2",)),
        cli_case(14, "fit wrong field names", "new", fit(corpus="{in}/c_wrongfield.jsonl"), mentions=("text",)),
        cli_case(15, "fit text is int/list", "new", fit(corpus="{in}/c_textint.jsonl"), mentions=("text",)),
        cli_case(16, "fit JSON array line", "new", fit(corpus="{in}/c_array.jsonl"), mentions=("c_array.jsonl",)),
        cli_case(17, "fit non-UTF-8 jsonl", "new", fit(corpus="{in}/c_nonutf8.jsonl"), mentions=("UTF-8",)),
        cli_case(18, "fit non-UTF-8 txt", "new", fit(corpus="{in}/c_nonutf8.txt"), mentions=("UTF-8",)),
        cli_case(19, "fit folder with non-UTF-8 txt", "new", fit(corpus="{in}/c_dir_nonutf8"), mentions=("a.txt",)),
        cli_case(20, "fit empty folder corpus", "new", fit(corpus="{in}/c_emptydir"), mentions=("c_emptydir",)),
        cli_case(21, "fit duplicate document ids", "new", fit(corpus="{in}/c_dupids.jsonl"), mentions=("pydoc/assert",)),
        cli_case(22, "fit unicode corpus (emoji/CJK/RTL/NUL)", "new", fit("--strategy", "identity", corpus="{in}/c_unicode.jsonl"), expect="succeeds"),
        cli_case(23, "fit 10 MB single document (identity)", "new", fit("--strategy", "identity", corpus="{in}/c_big.jsonl"),
                 expect="either", expected="exit 0 (or a clean refusal)"),
        cli_case(24, "fit --max-length 1", "new", [*FIT[:-4], "--max-length", "1", "-o", "{run}"], mentions=("max_length",)),
        cli_case(25, "fit --max-length 0", "new", [*FIT[:-4], "--max-length", "0", "-o", "{run}"], mentions=("max_length",)),
        cli_case(26, "fit --max-length -5", "new", [*FIT[:-4], "--max-length", "-5", "-o", "{run}"], mentions=("max_length",)),
        cli_case(27, "fit default max-length 512 > context 128", "new", ["fit", "--model", "{A}", "--corpus", "{corpus}", "-o", "{run}"], mentions=("context",)),
        cli_case(28, "fit --fit-batch-size 0", "new", fit("--fit-batch-size", "0"), mentions=("batch_size",)),
        cli_case(29, "fit --fit-batch-size -1", "new", fit("--fit-batch-size", "-1"), mentions=("batch_size",)),
        cli_case(30, "fit --cache-gib -1", "new", fit("--cache-gib", "-1"), mentions=("cache_gib",)),
        cli_case(31, "fit --cache-gib nan", "new", fit("--cache-gib", "nan"), mentions=("cache_gib",)),
        cli_case(32, "fit --strategy bogus", "new", fit("--strategy", "bogus"), mentions=("strategy",)),
        cli_case(33, "fit --modules no.such.*", "new", fit("--modules", "no.such.*"), mentions=("no.such",)),
        cli_case(34, "fit --device cuda (no GPU)", "new", fit("--device", "{cuda}"), setup=_cuda, mentions=("cuda",),
                 adapted="on a machine with GPUs the device is one past the last (cuda:N), which is as absent as 'cuda' without a GPU"),
        cli_case(35, "fit --device bogus", "new", fit("--device", "bogus"), mentions=("bogus",)),
        cli_case(36, "fit --strategy lissa --lissa-depth 0", "new", fit("--strategy", "lissa", "--lissa-depth", "0"), mentions=("lissa_depth",)),
        cli_case(37, "fit --strategy lissa --lissa-scale -1", "new", fit("--strategy", "lissa", "--lissa-scale", "-1"), mentions=("lissa_scale",)),
        cli_case(38, "fit --strategy lissa --fisher empirical", "new", fit("--strategy", "lissa", "--fisher", "empirical"), mentions=("fisher",)),
        cli_case(39, "fit --max-length abc", "new", [*FIT[:-4], "--max-length", "abc", "-o", "{run}"], mentions=("--max-length",)),
        cli_case(40, "fit --config y_unknown_key.yaml", "new", fit_config("y_unknown_key.yaml"), mentions=("bogus_key",)),
        cli_case(41, "score missing queries file", "fitted", ["score", "-o", "{run}", "--queries", "{in}/nope.jsonl"], mentions=("nope.jsonl",)),
        cli_case(42, "score empty queries file", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_empty.jsonl"], mentions=("q_empty.jsonl",)),
        cli_case(43, "score empty completion", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_emptycomp.jsonl"], mentions=("completion",)),
        cli_case(44, "score prompt longer than context (400 words)", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_longprompt.jsonl"], mentions=("context",)),
        cli_case(45, "score prompt ~140 tokens > context 128", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_140.jsonl"], mentions=("context",)),
        cli_case(46, "score duplicate query ids", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_dupids.jsonl"], mentions=("fact-00-trained",)),
        cli_case(47, "score wrong query field names", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_wrongfield.jsonl"], mentions=("prompt",)),
        cli_case(48, "score invalid JSON queries", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_invalid.jsonl"], mentions=("q_invalid.jsonl",)),
        cli_case(49, "score non-UTF-8 queries", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_nonutf8.jsonl"], mentions=("UTF-8",)),
        cli_case(50, "score ids 1 and '1' (duplicate after str)", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_numid.jsonl"], mentions=("q_numid.jsonl",)),
        cli_case(51, "score completion is a list", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_badtype.jsonl"], mentions=("completion",)),
        cli_case(52, "score whitespace-only completion", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_wscomp.jsonl"], expect="either", mentions=("completion",)),
        cli_case(53, "score empty prompt", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_emptyprompt.jsonl"], expect="either", mentions=("prompt",)),
        cli_case(54, "fit --config y_unknown_section.yaml", "new", fit_config("y_unknown_section.yaml"), mentions=("fitt",)),
        cli_case(55, "fit --config y_list.yaml", "new", fit_config("y_list.yaml"), mentions=("y_list.yaml",)),
        cli_case(56, "fit --config y_section_list.yaml", "new", fit_config("y_section_list.yaml"), mentions=("fit",)),
        cli_case(57, "fit --config y_wrong_value_type.yaml", "new", fit_config("y_wrong_value_type.yaml"), mentions=("batch_size",)),
        cli_case(58, "fit --config y_invalid.yaml", "new", fit_config("y_invalid.yaml"), mentions=("y_invalid.yaml",)),
        cli_case(59, "score unicode queries (emoji/CJK/RTL)", "fitted", ["score", "-o", "{run}", "--queries", "{in}/q_unicode.jsonl", "--candidates", "20"],
                 expect="succeeds", check=_queries_are("q_unicode.jsonl")),
        cli_case(60, "score queries is a folder", "fitted", ["score", "-o", "{run}", "--queries", "{in}/c_emptydir"], mentions=("c_emptydir",)),
        *[
            cli_case(n, f"score {' '.join(flags)} (fitted run)", "fitted", [*SCORE, *flags], mentions=(word,))
            for n, flags, word in (
                (61, ("--damping-scale", "-1"), "damping_scale"),
                (62, ("--damping-scale", "nan"), "damping_scale"),
                (63, ("--damping-scale", "inf"), "damping_scale"),
                (64, ("--damping", "-1"), "damping"),
                (65, ("--damping", "nan"), "damping"),
                (66, ("--rank", "0"), "rank"),
                (67, ("--rank", "-3"), "rank"),
                (68, ("--candidates", "-5"), "candidates"),
                (69, ("--candidates", "0"), "candidates"),
                (70, ("--rank", "8", "--rescore-top", "0"), "rescore_top"),
                (71, ("--rank", "8", "--rescore-top", "5", "--top", "10"), "rescore"),
                (72, ("--rescore-top", "20"), "rank"),
                (73, ("--top", "0"), "top"),
                (74, ("--score-batch-size", "0"), "batch_size"),
                (75, ("--query-batch-size", "0"), "query_batch_size"),
                (76, ("--chunk-size", "0"), "chunk_size"),
                (77, ("--rank", "abc"), "--rank"),
            )
        ],
        *[
            cli_case(n, f"score {' '.join(flags)} --overwrite (scored run: earlier scores kept?)", "scored", [*SCORE, *flags, "--overwrite"], mentions=(word,))
            for n, flags, word in (
                (78, ("--damping-scale", "-1"), "damping_scale"),
                (79, ("--rank", "0"), "rank"),
                (80, ("--candidates", "-5"), "candidates"),
                (81, ("--damping-scale", "nan"), "damping_scale"),
                (82, ("--score-batch-size", "0"), "batch_size"),
            )
        ],
        cli_case(83, "score --damping-scale -1 (scored run, no --overwrite)", "scored", [*SCORE, "--damping-scale", "-1"], mentions=("damping_scale",), avoid=("--overwrite",),
                 adapted="the review failed this by hand: the message must say the value is invalid, not suggest --overwrite"),
        cli_case(84, "fit --config y_float_max_length.yaml (max_length: 64.5)", "new", # no --max-length flag: it would override the file
                 ["fit", "--model", "{A}", "--corpus", "{corpus}", "-o", "{run}", "--config", "{in}/y_float_max_length.yaml"], mentions=("max_length",)),
        cli_case(85, "fit --config y_modules_int.yaml", "new", fit_config("y_modules_int.yaml"), mentions=("fit",)),
        cli_case(86, "fit --config y_cache_str.yaml", "new", fit_config("y_cache_str.yaml"), mentions=("cache_gib",)),
        cli_case(87, "score --candidates 10**12 (K > N)", "fitted", [*SCORE, "--candidates", str(10**12)], expect="succeeds"),
        cli_case(88, "fit --config y_seed_str.yaml", "new", fit_config("y_seed_str.yaml"), mentions=("seed",)),
        cli_case(89, "fit --config y_empty.yaml", "new", ["fit", "--config", "{in}/y_empty.yaml", "-o", "{run}"], mentions=("model",)),
        cli_case(90, "score --rank 100000", "fitted", [*SCORE, "--rank", "100000", "--candidates", "8"], expect="succeeds"),
        cli_case(91, "score --config y_wrong_value_type2.yaml", "fitted", ["score", "-o", "{run}", "--config", "{in}/y_wrong_value_type2.yaml"], mentions=("rank",)),
        cli_case(92, "score --config y_damping_str.yaml", "fitted", ["score", "-o", "{run}", "--config", "{in}/y_damping_str.yaml"], mentions=("damping",)),
        cli_case(93, "score --config y_damping_scale_str.yaml", "fitted", ["score", "-o", "{run}", "--config", "{in}/y_damping_scale_str.yaml"], mentions=("damping_scale",)),
        cli_case(94, "fit --config y_model_path_int.yaml (model.path: 5)", "new",  # no --model flag: it would override the file
                 ["fit", "--corpus", "{corpus}", "--max-length", "128", "-o", "{run}", "--config", "{in}/y_model_path_int.yaml"], mentions=("model",)),
        cli_case(95, "fit --config y_python_tag.yaml (!!python/object)", "new", fit_config("y_python_tag.yaml"), mentions=("y_python_tag.yaml",)),
        cli_case(96, "fit --config missing file", "new", fit_config("nope.yaml"), mentions=("nope.yaml",)),
        cli_case(97, "fit run dir is a file", "new", FIT, setup=_file_at_run, mentions=("file",)),
        cli_case(98, "fit into non-empty non-run dir", "new", FIT, setup=_foreign_dir, mentions=("not empty",)),
        cli_case(99, "fit different model into existing run", "fitted", fit(model="{B}"), mentions=("model",)),
        cli_case(100, "fit different corpus into existing run", "fitted", fit(corpus="{in}/c_unicode.jsonl"), mentions=("corpus",)),
        cli_case(101, "fit different max-length into existing run", "fitted", [*FIT[:-4], "--max-length", "64", "-o", "{run}"], mentions=("max_length",)),
        cli_case(108, "score --config y_save_matrix_str.yaml", "fitted", ["score", "-o", "{run}", "--config", "{in}/y_save_matrix_str.yaml"], mentions=("save_matrix",)),
        cli_case(109, "score on a missing run dir", "new", ["score", "-o", "{case}/nonexist", "--queries", "{in}/q.jsonl"], watch=("{case}/nonexist",), mentions=("nonexist",)),
        cli_case(110, "score on a non-run dir", "new", SCORE, setup=_foreign_dir, mentions=("run",)),
        cli_case(111, "score with truncated factors/factors.safetensors", "fitted", SCORE, setup=_damage("factors/factors.safetensors"), mentions=("factors",)),
        cli_case(112, "score with truncated factors/manifest.json", "fitted", SCORE, setup=_damage("factors/manifest.json"), mentions=("factors",), avoid=("model changed",),
                 adapted="the review failed this by hand for blaming a model change; the message must name the damaged factors"),
        cli_case(113, "score with truncated corpus/tokens.safetensors", "fitted", SCORE, setup=_damage("corpus/tokens.safetensors"), mentions=("corpus",)),
        cli_case(114, "score with truncated corpus/sequences.parquet", "fitted", SCORE, setup=_damage("corpus/sequences.parquet"), mentions=("corpus",)),
        cli_case(115, "score with truncated run.json", "fitted", SCORE, setup=_damage("run.json"), mentions=("run.json",)),
        cli_case(120, "score with factors/ copied from a run of another model", "fitted", SCORE, setup=_replace_dir("factors", "fitted_B"), mentions=("factors",)),
        cli_case(122, "score with corpus/ copied from a run of another corpus", "fitted", SCORE, setup=_replace_dir("corpus", "fitted_small"), mentions=("corpus",)),
        cli_case(123, "report on a missing dir", "new", ["report", "-o", "{case}/nonexist"], watch=("{case}/nonexist",), mentions=("nonexist",)),
        cli_case(124, "report on a fitted, unscored run", "fitted", REPORT, mentions=("score",)),
        cli_case(125, "report --top 0", "scored", [*REPORT, "--top", "0"], mentions=("--top",)),
        cli_case(126, "report --top -1", "scored", [*REPORT, "--top", "-1"], mentions=("--top",)),
        cli_case(127, "report with truncated scores/top.parquet", "scored", REPORT, setup=_damage("scores/top.parquet"), mentions=("top.parquet",)),
        cli_case(128, "report with scores/queries.parquet missing", "scored", REPORT, setup=_damage("scores/queries.parquet", "delete"), mentions=("queries.parquet",)),
        cli_case(129, "report --output under a file", "scored", [*REPORT, "--output", "{file}/x.html"], setup=_a_file, watch=("{file}",), mentions=("q.jsonl",)),
        cli_case(130, "report --output is a directory", "scored", [*REPORT, "--output", "{adir}"], setup=_a_dir, watch=("{adir}",), mentions=("adir",)),
        cli_case(131, "run with missing --queries", "new", ["run", *FIT[1:]], mentions=("queries",)),
        cli_case(132, "run --config a missing file", "new", ["run", "--config", "{in}/nope.yaml", "-o", "{run}"], mentions=("nope.yaml",)),
        cli_case(133, "run with bad --rank before anything written", "new", ["run", *FIT[1:], "--queries", "{in}/q.jsonl", "--rank", "0"], mentions=("rank",)),
        cli_case(134, "model folder with only an unloadable pytorch_model.bin (unloadable)", "new", fit("--strategy", "identity", model="{evil_pickle}"),
                 mentions=("evil_pickle",), expected="exit 2, one line"),
        cli_case(135, "run with bad queries (empty completion)", "new", ["run", *FIT[1:], "--queries", "{in}/q_emptycomp.jsonl"], mentions=("completion",),
                 expected="exit 2 before fitting (queries checked first), nothing written"),
        cli_case(136, "demo --workdir is a file", "new", ["demo", "--workdir", "{file}", "--scale", "tiny", "-q"], setup=_a_file, watch=("{file}",), mentions=("q.jsonl",)),
    ]


__all__ = ["cases"]
