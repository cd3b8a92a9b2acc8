"""`--factor-placement` on the command line: layer-owned factors for the fit of `fit` and `run`, an execution setting only."""

from __future__ import annotations

import json

import pytest

from lminfluence.cli.main import build_parser, main
from lminfluence.cli.options import given
from lminfluence.storage import layout


def fit_args(inputs, run) -> list[str]:
    """A `fit` of the tiny on-disk GPT-2 on its corpus."""
    return ["fit", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--max-length", "32", "-o", str(run), "-q"]


def test_the_flag_belongs_to_the_fit_and_a_bad_value_exits_2(inputs, tmp_path, capsys):
    """`fit` and `run` take --factor-placement into their fit section (never into the score section); `score`, whose
    two-stage scoring loads the saved factors on every rank, refuses it as an unknown option (argparse's exit 2);
    a value that is no placement exits 2 naming the choices, before anything is written."""
    parser = build_parser()
    for command in ("fit", "run"):
        args = parser.parse_args([command, "-o", "r", "--factor-placement", "by_layer"])
        assert given(args, "fit") == {"factor_placement": "by_layer"}
        if command == "run":
            assert given(args, "score") == {}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["score", "-o", "r", "--factor-placement", "by_layer"])
    assert exit_info.value.code == 2 and "--factor-placement" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main([*fit_args(inputs, run), "--factor-placement", "everywhere"]) == 2
    assert "'replicated', 'by_layer'" in capsys.readouterr().err and not run.exists()


def test_the_placement_changes_no_result_so_a_finished_fit_is_reused(inputs, tmp_path, capsys):
    """The placement is an execution setting (like the batch size): a finished fit run again with another placement
    is reused as it is (its factors untouched), not refused as another run nor refitted; a fit that does differ
    (another strategy) is refused with exit 2 naming what differs, and the placement is not among it."""
    run = tmp_path / "run"
    assert main(fit_args(inputs, run)) == 0
    factors = run / layout.FACTORS_DIR / "factors.safetensors"
    before = factors.stat().st_mtime_ns
    assert main([*fit_args(inputs, run), "--factor-placement", "by_layer"]) == 0
    assert factors.stat().st_mtime_ns == before
    capsys.readouterr()
    assert main([*fit_args(inputs, run), "--strategy", "kfac", "--factor-placement", "by_layer"]) == 2
    err = capsys.readouterr().err
    assert "fit.strategy" in err and "factor_placement" not in err, err


@pytest.mark.slow
def test_run_under_torchrun_with_layer_owned_factors_writes_the_single_process_tables(inputs, tmp_path):
    """`torchrun --nproc-per-node 2 -m lminfluence run --factor-placement by_layer`: the fit's layers are spread over
    the two ranks, rank 0 saves the usual factor files, and the tables equal one process's (floats within 1e-5
    relative: a float32 model under other batch compositions; the shown sequences the same). With LiSSA, which
    couples the layers, the fit is refused with an error that names the placement."""
    from test_torchrun import RUN, assert_close_tables, tables, torchrun

    single = tmp_path / "single"
    base = ["run", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--queries", str(inputs["queries"])]
    assert main([*base, "-o", str(single), "-q", *RUN]) == 0
    owned = tmp_path / "owned"
    done = torchrun(*base, "-o", str(owned), *RUN, "--factor-placement", "by_layer")
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((owned / layout.FACTORS_DIR / layout.MANIFEST_FILE).read_text())["meta"]
    assert meta["factor_placement"] == "by_layer" and meta["processes"] == 2, meta
    assert_close_tables(tables(single), tables(owned))
    lissa = torchrun(*fit_args(inputs, tmp_path / "lissa"), "--strategy", "lissa", "--factor-placement", "by_layer")
    assert lissa.returncode != 0 and "factor_placement='by_layer'" in lissa.stderr, lissa.stderr[-3000:]
