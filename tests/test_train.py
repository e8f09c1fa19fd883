"""Training the language model: the loop, checkpoints, the train/sample/tour commands, plots."""

import json

import numpy as np
import pytest

from miniattn import plots, training
from miniattn.cli import main
from miniattn.methods import is_implemented
from miniattn.nn import DecoderLM

# A tiny model: every command runs in about a second.
TINY = ["--context", "16", "--width", "16", "--heads", "2", "--layers", "1", "--batch-size", "4"]
TINY_SETTINGS = dict(context=16, width=16, n_heads=2, n_layers=1)
TEXT = "def add(a, b):\n    return a + b\n\n" * 40  # 1,360 characters of Python


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Keep default checkpoints (train-*.npz, tour-lm.npz) out of the user's cache."""
    monkeypatch.setenv("MINIATTN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.py"
    path.write_text(TEXT, encoding="utf-8")
    return path


def tiny_model(corpus, seed=0, **settings):
    config = training.model_config(len(corpus.vocabulary), **dict(TINY_SETTINGS, **settings))
    return training.build_model(config, seed=seed), config


# --- the training loop -------------------------------------------------------------------


def test_training_lowers_validation_loss(text_file):
    corpus = training.load_corpus(text_file, 16)
    model, _ = tiny_model(corpus)
    inputs, targets = training.validation_windows(corpus.validation_ids, 16, 16)
    before = training.evaluate(model, inputs, targets, 8)
    history, _ = training.train(model, corpus, 16, steps=40, batch_size=8, lr=1e-2, eval_every=20)
    after = history[-1]["validation_loss"]
    assert history[-1]["kind"] == "eval"
    assert after < 0.8 * before


def test_training_reports_speed_and_memory(text_file):
    corpus = training.load_corpus(text_file, 16)
    model, _ = tiny_model(corpus)
    events = []
    training.train(model, corpus, 16, steps=3, batch_size=2, callback=events.append, eval_every=2)
    kinds = [event["kind"] for event in events]
    assert kinds == ["step", "step", "eval", "step", "eval"]
    assert all(event["tokens_per_s"] > 0 for event in events)
    assert all(event["peak_bytes"] > 0 for event in events)
    assert events[-1]["unigram_loss"] == pytest.approx(corpus.unigram_loss)


def test_training_time_budget_stops(text_file):
    corpus = training.load_corpus(text_file, 16)
    model, _ = tiny_model(corpus)
    history, _ = training.train(model, corpus, 16, time_budget=1e-9, batch_size=2)
    assert [event["step"] for event in history] == [1, 1]


@pytest.mark.parametrize("budget", [dict(steps=0), dict(steps=-3), dict(time_budget=0.0), dict(time_budget=-1.0), {}])
def test_training_rejects_bad_budget(text_file, budget):
    corpus = training.load_corpus(text_file, 16)
    model, _ = tiny_model(corpus)
    with pytest.raises(ValueError, match="budget|steps"):
        training.train(model, corpus, 16, **budget)


def test_position_offset_trains_later_rows(text_file):
    corpus = training.load_corpus(text_file, 8)
    model = DecoderLM(len(corpus.vocabulary), 32, width=8, n_heads=2, n_layers=1)
    ids = corpus.train_ids[:16].reshape(2, 8)
    logits, cache = model.forward(ids, start=20)
    model.backward(np.ones_like(logits), cache)
    touched = np.flatnonzero(np.abs(model.position_embedding.grads["weight"]).sum(axis=1))
    assert touched.tolist() == list(range(20, 28))
    with pytest.raises(ValueError, match="start \\+ N <= max_length=32"):
        model.forward(ids, start=25)


def test_short_context_options_shrink_patterns():
    assert training.context_options("longformer", 64, {})["window"] == 16
    assert training.context_options("longformer", 64, {"window": 3})["window"] == 3
    assert training.context_options("transformer", 64, {}) == {}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("window=32", ("window", 32)),
        ("eps=1e-3", ("eps", 1e-3)),
        ("dedup=true", ("dedup", True)),
        ("orthogonal=False", ("orthogonal", False)),
        ("n_clusters=none", ("n_clusters", None)),
        ("pattern=fixed", ("pattern", "fixed")),
        ("global_blocks=0,-1", ("global_blocks", (0, -1))),
    ],
)
def test_parse_option_values(text, expected):
    assert training.parse_option(text) == expected


@pytest.mark.parametrize("text", ["window", "=3", "two words=1"])
def test_parse_option_rejects_bad_format(text):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        training.parse_option(text)


# --- every implemented method in the language model ---------------------------------------


def test_every_causal_method_takes_a_training_step(text_file):
    corpus = training.load_corpus(text_file, 16)
    for name in [method for method in training.method_names() if is_implemented(method)]:
        options = training.context_options(name, 16, {}, heads=2)
        model, _ = tiny_model(corpus, attention=name, attention_options=options)
        history, _ = training.train(model, corpus, 16, steps=1, batch_size=2)
        assert np.isfinite(history[-1]["validation_loss"]), name


@pytest.mark.skipif(not is_implemented("routing_transformer"), reason="the Routing Transformer is not merged")
def test_training_moves_routing_centroids(text_file):
    corpus = training.load_corpus(text_file, 16)
    options = training.context_options("routing_transformer", 16, {}, heads=2)
    model, _ = tiny_model(corpus, attention="routing_transformer", attention_options=options)
    attention = model.blocks[0].self_attention.attention
    training.train(model, corpus, 16, steps=1, batch_size=2)
    first = attention.centroids.copy()
    training.train(model, corpus, 16, steps=2, batch_size=2)
    assert options["local_heads"] == 1
    assert not np.allclose(first, attention.centroids)


def test_training_learns_relative_position_weights(text_file):
    corpus = training.load_corpus(text_file, 16)
    model, _ = tiny_model(corpus, attention="transformer_xl")
    training.train(model, corpus, 16, steps=1, batch_size=2)
    params, grads = training.attention_parameters(model)
    assert sorted(name.rsplit(".", 1)[1] for name in params) == ["W_r", "u", "v_bias"]  # one block
    assert grads.keys() == params.keys()
    before = {name: value.copy() for name, value in params.items()}
    training.train(model, corpus, 16, steps=2, batch_size=2)
    for name, value in training.attention_parameters(model)[0].items():
        assert not np.array_equal(before[name], value), name


def test_generate_text_with_every_method(text_file):
    corpus = training.load_corpus(text_file, 16)
    for name in [method for method in training.method_names() if is_implemented(method)]:
        options = training.context_options(name, 16, {}, heads=2)
        try:
            model, _ = tiny_model(corpus, attention=name, attention_options=options)
        except ValueError:
            continue  # a bidirectional-only method
        text = training.generate_text(model, corpus.vocabulary, "d", 5, 16, rng=np.random.default_rng(0))
        assert text.startswith("d"), name
        assert len(text) == 6, name
        assert set(text) <= set(corpus.vocabulary.characters), name


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, text_file):
    corpus = training.load_corpus(text_file, 16)
    model, config = tiny_model(corpus)
    _, optimizer = training.train(model, corpus, 16, steps=2, batch_size=2)
    path = training.save_checkpoint(tmp_path / "lm.npz", model, config, corpus.vocabulary, optimizer)
    loaded, loaded_config, vocabulary, loaded_optimizer, _ = training.load_checkpoint(path)
    ids = corpus.validation_ids[:32].reshape(2, 16)
    assert loaded_config == config
    assert vocabulary.characters == corpus.vocabulary.characters
    assert loaded_optimizer.step_count == 2
    np.testing.assert_array_equal(model.forward(ids)[0], loaded.forward(ids)[0])


def test_checkpoint_keeps_attention_state(tmp_path, text_file):
    corpus = training.load_corpus(text_file, 16)
    for name in [method for method in training.method_names() if is_implemented(method)]:
        options = training.context_options(name, 16, {}, heads=2)
        try:
            # Seed 5, not the seed 0 of loading, so that random state is only equal if it was saved.
            model, config = tiny_model(corpus, seed=5, attention=name, attention_options=options)
        except ValueError:
            continue  # a bidirectional-only method
        training.train(model, corpus, 16, steps=2, batch_size=2)
        path = training.save_checkpoint(tmp_path / f"{name}.npz", model, config, corpus.vocabulary)
        loaded = training.load_checkpoint(path)[0]
        ids = corpus.validation_ids[:32].reshape(2, 16)
        np.testing.assert_array_equal(model.forward(ids)[0], loaded.forward(ids)[0], err_msg=name)
        saved_state, loaded_state = training.attention_state(model), training.attention_state(loaded)
        assert saved_state.keys() == loaded_state.keys(), name
        for key, value in saved_state.items():
            np.testing.assert_array_equal(value, loaded_state[key], err_msg=f"{name} {key}")


def test_checkpoint_other_configuration_fails(tmp_path, text_file):
    corpus = training.load_corpus(text_file, 16)
    model, config = tiny_model(corpus)
    path = training.save_checkpoint(tmp_path / "lm.npz", model, config, corpus.vocabulary)
    with pytest.raises(ValueError, match="width: checkpoint 16, requested 32") as raised:
        training.load_checkpoint(path, {"width": 32, "n_layers": 1})
    assert "n_layers" not in str(raised.value)


def test_checkpoint_missing_or_not_npz_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with"):
        training.load_checkpoint(tmp_path / "absent.npz")
    broken = tmp_path / "broken.npz"
    broken.write_text("not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        training.load_checkpoint(broken)


# --- the train and sample commands -----------------------------------------------------------


def test_train_command_saves_and_samples(tmp_path, text_file, capsys):
    path = tmp_path / "lm.npz"
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "4", "--eval-every", "2", "--save", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "validation loss" in out.out
    assert "unigram baseline" in out.out
    assert "tok/s" in out.err
    assert path.is_file()

    assert main(["sample", "--checkpoint", str(path), "--prompt", "def ", "--length", "20"]) == 0
    sampled = capsys.readouterr().out.splitlines()
    assert sampled[1].startswith("def ")
    assert set("".join(sampled[1:])) <= set(TEXT) | {"\n"}


def test_train_command_resume_checks_configuration(tmp_path, text_file, capsys):
    path = tmp_path / "lm.npz"
    base = ["train", *TINY, "--text", str(text_file), "--steps", "2", "--save", str(path)]
    assert main(base) == 0
    assert main(["train", "--text", str(text_file), "--steps", "2", "--resume", str(path), "--no-save"]) == 0
    capsys.readouterr()
    assert main(["train", "--text", str(text_file), "--steps", "2", "--resume", str(path), "--width", "32"]) == 2
    error = capsys.readouterr().err
    assert "another configuration" in error
    assert "width: checkpoint 16, requested 32" in error


def test_train_command_with_method_option(text_file, capsys):
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "2", "--no-save",
            "--attention", "transformer_xl", "--option", "clamp_len=8"]
    assert main(argv) == 0
    assert "'clamp_len': 8" in capsys.readouterr().out


def test_train_command_writes_json(tmp_path, text_file):
    path = tmp_path / "history.json"
    assert main(["train", *TINY, "--text", str(text_file), "--steps", "2", "--no-save", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["config"]["width"] == 16
    assert payload["history"][-1]["kind"] == "eval"


def test_compare_prints_table(text_file, capsys):
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "2", "--compare", "transformer,transformer_xl"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("method"):]
    assert "validation loss" in table
    assert "peak memory" in table
    assert "transformer_xl" in table
    assert "unigram baseline" in out


def test_compare_rejects_unknown_method(text_file, capsys):
    assert main(["train", *TINY, "--text", str(text_file), "--steps", "2", "--compare", "transformer,nope"]) == 2
    assert "unknown attention method 'nope'" in capsys.readouterr().err


# --- bad input ---------------------------------------------------------------------------------


def test_train_missing_text_fails(tmp_path, capsys):
    assert main(["train", *TINY, "--text", str(tmp_path / "absent.txt"), "--steps", "1"]) == 2
    assert "not found; pass an existing UTF-8 file" in capsys.readouterr().err


def test_train_empty_text_fails(tmp_path, capsys):
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert main(["train", *TINY, "--text", str(path), "--steps", "1"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_train_non_utf8_text_fails(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    assert main(["train", *TINY, "--text", str(path), "--steps", "1"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_train_too_short_text_fails(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("x = 1\n" * 10)
    assert main(["train", *TINY, "--text", str(path), "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "shorter than one sequence" in error
    assert "--context" in error


def test_train_unknown_method_lists_known(capsys):
    assert main(["train", *TINY, "--attention", "nope", "--steps", "1"]) == 2
    error = capsys.readouterr().err
    assert "unknown attention method 'nope'" in error
    assert "transformer" in error


@pytest.mark.parametrize("budget", [["--steps", "0"], ["--steps", "-2"], ["--time-budget", "0"], ["--time-budget", "-5"]])
def test_train_non_positive_budget_fails(budget, capsys):
    with pytest.raises(SystemExit):
        main(["train", *TINY, *budget])
    assert "expected a positive number" in capsys.readouterr().err


def test_train_bad_option_fails(text_file, capsys):
    assert main(["train", *TINY, "--text", str(text_file), "--steps", "1", "--option", "window"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_train_invalid_method_option_fails(text_file, capsys):
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "1", "--option", "no_such_option=1"]
    assert main(argv) == 2
    assert "has no option 'no_such_option'" in capsys.readouterr().err


class EncoderOnlyAttention:
    """A stand-in for an attention method defined only bidirectionally."""

    name = "encoder_only"

    def forward(self, q, k, v, *, mask=None, causal=False):
        if causal:
            raise ValueError("causal=True is not supported by this encoder-only method")
        return q, None

    def backward(self, dout, cache):
        return dout, np.zeros_like(dout), np.zeros_like(dout)

    def keys_seen(self, cache):
        return None


@pytest.fixture
def encoder_only_bigbird(monkeypatch):
    """Make 'bigbird' build an encoder-only method, to exercise the causal check."""
    import miniattn.bigbird

    monkeypatch.setattr(miniattn.bigbird, "make_method", lambda rng=None, **options: EncoderOnlyAttention())


def test_train_bidirectional_method_fails(text_file, capsys, encoder_only_bigbird):
    assert main(["train", *TINY, "--text", str(text_file), "--steps", "1", "--attention", "bigbird"]) == 2
    assert "cannot run the causal language model" in capsys.readouterr().err


def test_compare_skips_bidirectional_method(text_file, capsys, encoder_only_bigbird):
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "1", "--compare", "bigbird,transformer"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bigbird: skipped" in out
    assert "skipped (cannot run causally)" in out
    assert "transformer " in out[out.index("validation loss"):]


def test_sample_text_outside_vocabulary_fails(tmp_path, text_file, capsys):
    path = tmp_path / "lm.npz"
    assert main(["train", *TINY, "--text", str(text_file), "--steps", "1", "--save", str(path)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(path), "--prompt", "\u00e9t\u00e9"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_sample_missing_checkpoint_fails(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "absent.npz")]) == 2
    assert "python -m miniattn train --save" in capsys.readouterr().err


# --- the tour on the trained model --------------------------------------------------------------


def test_tour_trains_then_reuses_model(tmp_path, text_file, capsys):
    checkpoint = tmp_path / "tour.npz"
    argv = ["tour", "--n", "48", "--repeat", "1", "--methods", "transformer", "--text", str(text_file),
            "--checkpoint", str(checkpoint), "--train-steps", "3", "--heads", "2", "--d", "4"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "training the tour's language model" in first
    assert "shape (1, 2, 48, 4)" in first
    assert "on passage" in first
    assert "(last 32 positions of the passage)" in first
    assert first.strip().splitlines()[-1].startswith("2017")
    assert checkpoint.is_file()

    assert main(argv) == 0
    assert "reusing the language model" in capsys.readouterr().out

    assert main(argv + ["--retrain"]) == 0
    assert "training the tour's language model" in capsys.readouterr().out


def test_tour_checkpoint_other_configuration_fails(tmp_path, text_file, capsys):
    checkpoint = tmp_path / "tour.npz"
    argv = ["tour", "--n", "48", "--repeat", "1", "--methods", "transformer", "--text", str(text_file),
            "--checkpoint", str(checkpoint), "--train-steps", "2", "--heads", "2", "--d", "4"]
    assert main(argv) == 0
    capsys.readouterr()
    argv[argv.index("--heads") + 1] = "4"
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "heads: checkpoint 2, requested 4" in error
    assert "--retrain" in error


def test_tour_slice_gradcheck_is_small(tmp_path, text_file):
    from miniattn.commands import tour

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 40, 4)) for _ in range(3))
    assert tour.slice_gradcheck("transformer", q, k, v, True, 0) < 1e-6
    if is_implemented("ring_attention"):  # two ring workers need at least two positions
        one = q[:, :, :1]
        assert np.isnan(tour.slice_gradcheck("ring_attention", one, one, one, True, 0))


def test_tour_unknown_method_fails(capsys):
    with pytest.raises(SystemExit):
        main(["tour", "--methods", "transformer,nope"])
    assert "unknown attention method 'nope'" in capsys.readouterr().err


def test_tour_passage_longer_than_text_fails(tmp_path, text_file, capsys):
    argv = ["tour", "--n", "5000", "--repeat", "1", "--methods", "transformer", "--text", str(text_file),
            "--checkpoint", str(tmp_path / "tour.npz"), "--train-steps", "1", "--heads", "2", "--d", "4"]
    assert main(argv) == 2
    assert "fewer than --n 5000" in capsys.readouterr().err


# --- plots ----------------------------------------------------------------------------------------


def needs_matplotlib():
    return pytest.importorskip("matplotlib")


def test_train_plot_writes_png(tmp_path, text_file, capsys):
    needs_matplotlib()
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "2", "--no-save", "--plot", str(tmp_path / "figures")]
    assert main(argv) == 0
    figure = tmp_path / "figures" / "loss_curves.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert str(figure) in capsys.readouterr().out


def test_tour_plot_writes_png(tmp_path, text_file):
    needs_matplotlib()
    argv = ["tour", "--n", "48", "--repeat", "1", "--methods", "transformer,transformer_xl", "--text", str(text_file),
            "--train-steps", "1", "--heads", "2", "--d", "4", "--plot", str(tmp_path / "figures")]
    assert main(argv) == 0
    for name in ("patterns.png", "tour_cost.png", "loss_curves.png"):
        assert (tmp_path / "figures" / name).read_bytes().startswith(b"\x89PNG")


def test_bench_plot_writes_png(tmp_path):
    needs_matplotlib()
    argv = ["bench", "--methods", "transformer", "--n", "16,32", "--d", "4", "--repeat", "1",
            "--plot", str(tmp_path / "figures")]
    assert main(argv) == 0
    assert (tmp_path / "figures" / "scaling.png").read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_says_how(tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.setattr(plots, "load_pyplot", lambda: None)
    argv = ["train", *TINY, "--text", str(text_file), "--steps", "2", "--no-save", "--plot", str(tmp_path / "figures")]
    assert main(argv) == 0
    assert 'pip install "miniattn[plot]"' in capsys.readouterr().out
    assert not (tmp_path / "figures").exists()


def test_checkpoint_keeps_non_ascii_vocabulary(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("caf\u00e9 na\u00efve \u65e5\u672c\n" * 20, encoding="utf-8")
    corpus = training.load_corpus(path, 16)
    model, config = tiny_model(corpus)
    saved = training.save_checkpoint(tmp_path / "lm.npz", model, config, corpus.vocabulary)
    _, _, vocabulary, _, _ = training.load_checkpoint(saved)
    assert vocabulary.characters == corpus.vocabulary.characters
    assert "\u65e5" in vocabulary.characters
