"""The command line: every command runs and reports what it promises."""

import json

import pytest

from miniattn.benchmarks.harness import crossover
from miniattn.cli import main
from miniattn.methods import METHODS, make_method


def test_no_command_prints_usage(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_list_shows_every_method_in_year_order(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(method.name) for method in METHODS]
    assert positions == sorted(positions)
    assert "implemented" in out


def test_gradcheck_transformer_passes(capsys):
    assert main(["gradcheck", "transformer"]) == 0
    out = capsys.readouterr().out
    assert "transformer: causal, N=5, M=7: max rel error" in out
    assert "FAILED" not in out


def test_gradcheck_unknown_method_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gradcheck", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown attention method 'nope'" in err
    assert "transformer" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--methods", "flash"], "unknown attention method 'flash'"),
        (["bench", "--repeat", "0", "--n", "64"], "argument --repeat: 0 is invalid"),
        (["bench", "--n", "abc"], "argument --n: 'abc' is not an integer"),
        (["bench", "--n", "64,0"], "argument --n: 0 is invalid"),
        (["bench", "--n", "64,,128"], "has an empty entry"),
        (["ring", "-P", "abc"], "argument --workers/-P: 'abc' is not an integer"),
        (["bench", "--suite", "performer", "--qkv", "/nonexistent.npz"], "is not a readable .npz file"),
        (["bench", "--d", "0", "--n", "64"], "argument --d: 0 is invalid"),
        (["bench", "--suite", "dense", "--n", "0"], "argument --n: 0 is invalid"),
        (["bench", "--suite", "dense", "--quick", "--n", "64"], "leave out --n and --repeat"),
        (["bench", "--suite", "performer", "--width", "0"], "argument --width: 0 is invalid"),
        (["gradcheck", "--tol", "-1"], "--tol=-1.0 is invalid"),
        (["ring", "--timeout", "0"], "--timeout=0.0 is invalid"),
    ],
)
def test_bad_options_give_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_sweep_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--methods", "transformer", "--n", "32,64", "--d", "8", "--repeat", "1", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert [row["N"] for row in payload["rows"]] == [32, 64]
    assert all(row["forward_backward_s"] > 0 for row in payload["rows"])
    assert "time exponent" in capsys.readouterr().out


def test_bench_dense_suite_reports_matmul_fraction(tmp_path, capsys):
    path = tmp_path / "dense.json"
    assert main(["bench", "--suite", "dense", "--n", "64", "--d", "8", "--repeat", "1", "--json", str(path)]) == 0
    row = json.loads(path.read_text())["rows"][0]
    assert 0 < row["matmul_fraction"]
    assert "matmul fraction" in capsys.readouterr().out


def test_bench_unknown_suite_fails(capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_tour_runs_and_ends_with_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIATTN_CACHE", str(tmp_path))
    argv = ["tour", "--n", "64", "--d", "8", "--repeat", "1", "--methods", "transformer", "--train-steps", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "keys seen" in out
    assert out.strip().splitlines()[-1].startswith("2017")


@pytest.mark.parametrize(
    "method, baseline, expected",
    [
        ([1.0, 3.0, 3.0], [2.0, 2.0, 4.0], 4),  # a win at the smallest N followed by a loss does not count
        ([3.0, 1.0, 1.0], [2.0, 2.0, 2.0], 2),
        ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 1),
        ([3.0, 3.0, 1.0], [2.0, 2.0, 2.0], 4),
        ([3.0, 1.0, 3.0], [2.0, 2.0, 2.0], None),
    ],
)
def test_crossover_needs_every_larger_size(method, baseline, expected):
    assert crossover([1, 2, 4], method, baseline) == expected


def test_unknown_method_option_lists_the_options():
    with pytest.raises(ValueError, match="'longformer' has no option 'nosuch'; its options are window, dilation"):
        make_method("longformer", nosuch=1)
