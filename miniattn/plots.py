"""PNG figures for the tour, the benchmark sweep and training, drawn with matplotlib.

matplotlib is optional (the ``plot`` extra): it is imported only when a
figure is drawn, with the non-interactive Agg backend, so no display is
needed. Every function returns the list of written paths, or None when
matplotlib is not installed; the commands then print MISSING_MESSAGE and
keep their terminal drawings.
"""

import pathlib

import numpy as np

MISSING_MESSAGE = 'matplotlib is not installed, so no figures were written; enable them with: pip install "miniattn[plot]"'


def load_pyplot():
    """Return matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def output_dir(directory):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def save(pyplot, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def loss_curves(histories, directory, unigram_loss=None):
    """Draw training and validation loss against step and time for each method: loss_curves.png."""
    pyplot = load_pyplot()
    if pyplot is None:
        return None
    figure, (by_step, by_time) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for name, history in histories.items():
        steps = [event for event in history if event["kind"] == "step"]
        evals = [event for event in history if event["kind"] == "eval"]
        line = by_step.plot([e["step"] for e in steps], [e["loss"] for e in steps], alpha=0.35, linewidth=0.8)[0]
        by_step.plot([e["step"] for e in evals], [e["validation_loss"] for e in evals], "o-",
                     color=line.get_color(), label=f"{name} validation")
        by_time.plot([e["time_s"] for e in evals], [e["validation_loss"] for e in evals], "o-",
                     color=line.get_color(), label=name)
    for axes, label in ((by_step, "step"), (by_time, "training time (s)")):
        if unigram_loss is not None:
            axes.axhline(unigram_loss, color="grey", linestyle="--", label="unigram baseline")
        axes.set_xlabel(label)
        axes.set_ylabel("cross-entropy (nats per character)")
        axes.grid(alpha=0.3)
    by_step.set_title("training (faint) and validation loss")
    by_time.set_title("validation loss against time")
    by_time.legend(fontsize=8)
    return [save(pyplot, figure, output_dir(directory) / "loss_curves.png")]


def keys_seen_patterns(patterns, directory):
    """Draw each method's keys_seen matrix (N, M) of one head as an image: patterns.png.

    patterns maps a method name to a boolean (N, M) array or to the attention
    mass kept per query-key cell (floats in [0, 1]).
    """
    pyplot = load_pyplot()
    if pyplot is None:
        return None
    count = len(patterns)
    columns = min(count, 4)
    rows = (count + columns - 1) // columns
    figure, axes = pyplot.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for cell, (name, pattern) in zip(axes.flat, patterns.items()):
        cell.imshow(np.asarray(pattern, dtype=float), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        cell.set_title(name, fontsize=9)
        cell.set_xlabel("key j", fontsize=8)
        cell.set_ylabel("query i", fontsize=8)
        cell.tick_params(labelsize=7)
    for cell in list(axes.flat)[count:]:
        cell.axis("off")
    figure.suptitle("keys each query attends (black), head 0")
    return [save(pyplot, figure, output_dir(directory) / "patterns.png")]


def scaling(rows, directory, *, key="forward_backward_s"):
    """Draw forward+backward time and peak memory against N on log-log axes: scaling.png.

    rows are the sweep rows of ``python -m miniattn bench`` (method, N,
    forward_backward_s, peak_bytes); rows with an "error" are left out.
    """
    pyplot = load_pyplot()
    if pyplot is None:
        return None
    figure, (time_axes, memory_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(row["method"] for row in rows))
    for name in names:
        measured = sorted((row for row in rows if row["method"] == name and "error" not in row), key=lambda r: r["N"])
        if not measured:
            continue
        sizes = [row["N"] for row in measured]
        time_axes.loglog(sizes, [row[key] for row in measured], "o-", label=name)
        memory_axes.loglog(sizes, [max(row["peak_bytes"], 1) for row in measured], "o-", label=name)
    time_axes.set_ylabel("forward + backward time (s)")
    memory_axes.set_ylabel("peak memory (bytes, tracemalloc)")
    for axes in (time_axes, memory_axes):
        axes.set_xlabel("sequence length N")
        axes.grid(alpha=0.3, which="both")
    memory_axes.legend(fontsize=8)
    return [save(pyplot, figure, output_dir(directory) / "scaling.png")]


def tour_summary(rows, directory):
    """Draw output error against forward+backward time for every method of the tour: tour_cost.png."""
    pyplot = load_pyplot()
    if pyplot is None:
        return None
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5))
    for row in rows:
        error = max(row["error"], 1e-17)  # exact methods sit at round-off; keep them on the log axis
        axes.loglog(row["forward_backward_s"], error, "o")
        axes.annotate(row["name"], (row["forward_backward_s"], error), fontsize=8,
                      xytext=(4, 3), textcoords="offset points")
    axes.set_xlabel("forward + backward time (s)")
    axes.set_ylabel("relative output error vs exact attention")
    axes.grid(alpha=0.3, which="both")
    return [save(pyplot, figure, output_dir(directory) / "tour_cost.png")]
