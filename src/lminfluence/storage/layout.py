"""The on-disk layout, in one place (docs/run-directory.md describes every file and column)."""

# Factors (a directory of its own; inside a run it is RUN/factors/)
FACTORS_FILE = "factors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 3  # 2: the fingerprint covers the whole model; 3: factors may share A (gate/up), come in blocks, be float32

# A run directory, as the CLI writes it
RUN_CONFIG = "config.yaml"  # the resolved configuration of every command run here
RUN_MANIFEST = "run.json"  # what was run: versions, model fingerprint, corpus hash, stages finished
LOG_DIR = "logs"  # one <command>.log per command
CORPUS_DIR = "corpus"
SEQUENCES_FILE = "corpus/sequences.parquet"  # one row per training sequence, with provenance
TOKENS_FILE = "corpus/tokens.safetensors"  # token ids of every sequence, flat, with offsets
TFIDF_FILE = "corpus/tfidf.npz"  # the TF-IDF index over the sequences (docs/method.md §6)
FACTORS_DIR = "factors"
SCORES_DIR = "scores"
QUERIES_TABLE = "scores/queries.parquet"  # one row per query
TOP_TABLE = "scores/top.parquet"  # one row per (query, top sequence)
LAYERS_TABLE = "scores/layers.parquet"  # one row per (query, top sequence, tracked layer)
TOKENS_TABLE = "scores/tokens.parquet"  # one row per (query, top sequence, token)
MATRIX_TABLE = "scores/matrix.parquet"  # every scored (query, sequence) pair
INDEX_DIR = "index"  # the gradient index of the corpus (lminfluence index; docs/index.md)
ANALYSIS_DIR = "analysis"  # the analyses of a scored run: <name>.parquet per analysis (lminfluence.analysis)
REPORT_DIR = "report"
REPORT_FILE = "report/index.html"
STAGING_DIR = "staging"  # a stage's outputs while it runs, moved into place when it finishes
PARTIAL_DIR = "staging/score/partial"  # finished chunks of an unfinished scoring pass (resume)
LOCK_FILE = ".lock"  # held by the command writing into the run directory

__all__ = [name for name in dir() if name.isupper()]
