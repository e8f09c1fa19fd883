"""The sparse benchmark suite runs end to end on tiny sizes and writes its JSON record."""

import json

from miniattn.benchmarks import sparse as bench


def test_sparse_suite_small_run(tmp_path, capsys):
    path = tmp_path / "sparse.json"
    argv = [
        "--sizes", "64", "128", "--window", "4", "--stride", "8", "--width", "8", "--dense-max", "128",
        "--repeat", "1", "--twin-size", "128", "--twin-keys", "8", "--json", str(path),
    ]
    assert bench.main(argv) == 0
    record = json.loads(path.read_text())
    assert set(record["results"]) == {"longformer", "sparse_transformer local", "sparse_transformer merged", "dense"}
    assert [row["N"] for row in record["results"]["longformer"]] == [64, 128]
    assert all(row["seconds"] > 0 for row in record["results"]["longformer"])
    assert len(record["kernel_comparison"]["rows"]) >= 1
    assert "time exponent" in capsys.readouterr().out


def test_band_pattern_lists_w_keys_inside_sequence():
    indptr, indices = bench.band_pattern(10, 4)
    assert indptr[-1] == 40
    assert indices.min() == 0 and indices.max() == 9
    assert indices[:4].tolist() == [0, 1, 2, 3]
    assert indices[-4:].tolist() == [6, 7, 8, 9]
