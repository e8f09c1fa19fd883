"""Ring Attention: the per-worker schedule, both transports, work balance and clean failure."""

import multiprocessing
import os

import numpy as np
import pytest

from miniattn import gradcheck, make_method
from miniattn.commands import ring as ring_command
from miniattn.core.masks import padding_mask
from miniattn.core.online_softmax import blockwise_attention_backward, blockwise_attention_forward
from miniattn.core.softmax import logsumexp
from miniattn.ring import (
    SHM_PREFIX,
    RingFault,
    RingTimeoutError,
    RingWorkerError,
    send_compute_overlaps,
    simulate,
)
from miniattn.ring_attention import (
    InlineRing,
    RingConfig,
    check_shards,
    gradcheck_cases,
    make_shards,
    ring_attention_backward,
    ring_attention_forward,
    run_lockstep,
    shard_indices,
    worker_forward,
)
from miniattn.transformer import attention_backward, attention_forward

TOL = 1e-12


def random_qkv(rng, n_queries, n_keys, batch=(2, 1), width=4, value_width=3):
    q = rng.standard_normal(batch + (n_queries, width))
    k = rng.standard_normal(batch + (n_keys, width))
    v = rng.standard_normal(batch + (n_keys, value_width))
    return q, k, v


def assert_matches_dense(q, k, v, out, lse, grads, dout, *, causal, mask=None):
    expected, dense_cache = attention_forward(q, k, v, causal=causal, mask=mask)
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (..., N, M)
    allowed = dense_cache["allowed"]
    expected_lse = logsumexp(scores, None if allowed is None else np.broadcast_to(allowed, scores.shape))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=TOL, atol=TOL)
    for name, got, want in zip("qkv", grads, attention_backward(dout, dense_cache)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"d{name}")


# --- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
@pytest.mark.parametrize("length, n_workers", [(12, 4), (13, 4), (7, 7), (9, 2)])
def test_shards_hold_every_row_once(layout, length, n_workers):
    shards = shard_indices(length, n_workers, layout)
    assert shards.shape == (n_workers, -(-length // n_workers))
    rows = shards[shards >= 0]
    np.testing.assert_array_equal(np.sort(rows), np.arange(length))


def test_shard_layouts_place_rows():
    np.testing.assert_array_equal(shard_indices(7, 3, "contiguous"), [[0, 1, 2], [3, 4, -1], [5, 6, -1]])
    np.testing.assert_array_equal(shard_indices(7, 3, "striped"), [[0, 3, 6], [1, 4, -1], [2, 5, -1]])


# --- inline ring == dense attention -----------------------------------------------------------


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("layout", ["contiguous", "striped"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_queries, n_keys", [(14, 14), (13, 13), (11, 17)])
def test_inline_ring_matches_dense(rng, n_workers, layout, causal, n_queries, n_keys):
    q, k, v = random_qkv(rng, n_queries, n_keys)
    out, cache = ring_attention_forward(q, k, v, n_workers=n_workers, layout=layout, causal=causal, block_size=3)
    dout = rng.standard_normal(out.shape)
    grads = ring_attention_backward(dout, cache)
    assert_matches_dense(q, k, v, out, cache.lse, grads, dout, causal=causal)


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_inline_ring_with_key_padding_matches_dense(rng, layout):
    q, k, v = random_qkv(rng, 10, 10)
    mask = padding_mask(np.array([10, 3]), 10)
    out, cache = ring_attention_forward(q, k, v, n_workers=4, layout=layout, causal=True, mask=mask, block_size=2)
    dout = rng.standard_normal(out.shape)
    grads = ring_attention_backward(dout, cache)
    assert_matches_dense(q, k, v, out, cache.lse, grads, dout, causal=True, mask=mask)


def test_inline_ring_with_general_mask_matches_dense(rng):
    q, k, v = random_qkv(rng, 11, 8)
    mask = rng.random((2, 1, 11, 8)) < 0.6  # (B, 1, N, M): broadcast over heads
    mask[1, 0, 5] = False  # one fully masked row
    out, cache = ring_attention_forward(q, k, v, n_workers=3, layout="striped", causal=True, mask=mask, block_size=2)
    dout = rng.standard_normal(out.shape)
    grads = ring_attention_backward(dout, cache)
    assert_matches_dense(q, k, v, out, cache.lse, grads, dout, causal=True, mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_ring_with_one_worker_is_blockwise_exactly(rng, causal):
    q, k, v = random_qkv(rng, 9, 12)
    out, cache = ring_attention_forward(q, k, v, n_workers=1, causal=causal, block_size=4)
    expected, blockwise_cache = blockwise_attention_forward(q, k, v, causal=causal, query_block=4, key_block=4)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(cache.lse, blockwise_cache.lse)
    dout = rng.standard_normal(out.shape)
    for got, want in zip(ring_attention_backward(dout, cache), blockwise_attention_backward(dout, blockwise_cache)):
        np.testing.assert_array_equal(got, want)


# --- the schedule and the work --------------------------------------------------------------


def test_worker_holds_block_p_minus_t(rng):
    n_workers = 4
    q, k, v = random_qkv(rng, 8, 8)
    config = RingConfig(n_workers, 0.5, None, 2, 2)
    shards = make_shards(q, k, v, shard_indices(8, n_workers, "contiguous"), shard_indices(8, n_workers, "contiguous"))
    ring = InlineRing(n_workers)
    workers = [worker_forward(shard, config, ring.endpoint(shard.worker)) for shard in shards]
    for step in range(n_workers):
        for worker in range(n_workers):
            record = next(workers[worker])
            assert record.step == step
            assert record.source == (worker - step) % n_workers
    for worker in range(n_workers):
        with pytest.raises(StopIteration):
            next(workers[worker])


@pytest.mark.parametrize("n_workers", [2, 4, 7])
def test_causal_work_counts_per_layout(rng, n_workers):
    block = 16  # c rows per worker
    length = block * n_workers
    q, k, v = random_qkv(rng, length, length, batch=(1, 1))
    _, contiguous = ring_attention_forward(q, k, v, n_workers=n_workers, layout="contiguous", causal=True)
    _, striped = ring_attention_forward(q, k, v, n_workers=n_workers, layout="striped", causal=True)

    # Contiguous: worker p computes blocks 0..p, the last one causal.
    assert [work.blocks for work in contiguous.work] == list(range(1, n_workers + 1))
    expected = [block * block * worker + block * (block + 1) // 2 for worker in range(n_workers)]
    assert [work.pairs for work in contiguous.work] == expected

    # Striped: every worker computes every block; row a of worker r is global
    # position a P + r and attends a P + r + 1 keys.
    assert [work.blocks for work in striped.work] == [n_workers] * n_workers
    expected = [sum(a * n_workers + worker + 1 for a in range(block)) for worker in range(n_workers)]
    assert [work.pairs for work in striped.work] == expected
    assert max(expected) / min(expected) < 1.5


def test_bidirectional_work_is_balanced(rng):
    q, k, v = random_qkv(rng, 12, 12, batch=(1, 1))
    _, cache = ring_attention_forward(q, k, v, n_workers=3, layout="contiguous")
    assert [work.blocks for work in cache.work] == [3, 3, 3]
    assert [work.pairs for work in cache.work] == [48, 48, 48]


# --- gradients ---------------------------------------------------------------------------------


def test_ring_gradcheck_cases(rng):
    cases = gradcheck_cases(rng)
    assert len(cases) >= 3
    for label, forward, backward, inputs, names in cases:
        result = gradcheck(forward, backward, inputs, names=names, rng=rng)
        assert result.max_rel_error <= 1e-6, f"{label}\n{result}"


# --- the registry object -------------------------------------------------------------------------


def test_make_method_runs_inline_by_default(rng):
    method = make_method("ring_attention", P=3, layout="striped", block_size=2)
    assert method.name == "ring_attention"
    assert method.transport == "inline"
    q, k, v = random_qkv(rng, 7, 7)
    mask = padding_mask(np.array([7, 5]), 7)
    out, cache = method.forward(q, k, v, mask=mask, causal=True)
    dout = rng.standard_normal(out.shape)
    grads = method.backward(dout, cache)
    assert method.keys_seen(cache) is None
    assert_matches_dense(q, k, v, out, cache.lse, grads, dout, causal=True, mask=mask)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_workers": 0}, "n_workers=0"),
        ({"n_workers": 6}, "n_workers=6"),
        ({"n_workers": 2, "block_size": 0}, "block_size=0"),
        ({"n_workers": 2, "layout": "zigzag"}, "layout='zigzag'"),
        ({"n_workers": 2, "transport": "mpi"}, "transport='mpi'"),
        ({"n_workers": 2, "transport": "process", "start_method": "fork"}, "start_method='fork'"),
        ({"n_workers": 2, "transport": "process", "start_method": "threads"}, "start_method='threads'"),
    ],
)
def test_ring_rejects_bad_options(rng, options, message):
    q, k, v = random_qkv(rng, 5, 7)
    with pytest.raises(ValueError, match=message):
        ring_attention_forward(q, k, v, **options)
    assert multiprocessing.active_children() == []


def test_make_method_rejects_bad_options():
    with pytest.raises(ValueError, match="start_method='fork'"):
        make_method("ring_attention", transport="process", start_method="fork")
    with pytest.raises(ValueError, match="n_workers=0"):
        make_method("ring_attention", P=0)
    with pytest.raises(ValueError, match="layout='diagonal'"):
        make_method("ring_attention", layout="diagonal")


def test_ring_rejects_shards_of_different_shapes(rng):
    q, k, v = random_qkv(rng, 8, 8)
    shards = make_shards(q, k, v, shard_indices(8, 2, "contiguous"), shard_indices(8, 2, "contiguous"))
    shards[1] = shards[1]._replace(k=shards[1].k[..., :3, :])
    with pytest.raises(ValueError, match="worker 1 has k of shape"):
        check_shards(shards)


def test_ring_rejects_a_received_block_of_another_shape(rng):
    q, k, v = random_qkv(rng, 8, 8)
    config = RingConfig(2, 0.5, None, 2, 2)
    shards = make_shards(q, k, v, shard_indices(8, 2, "contiguous"), shard_indices(8, 2, "contiguous"))
    shards[1] = shards[1]._replace(k=shards[1].k[..., :3, :], v=shards[1].v[..., :3, :], key_index=shards[1].key_index[:3])
    ring = InlineRing(2)
    workers = [worker_forward(shard, config, ring.endpoint(shard.worker)) for shard in shards]
    with pytest.raises(ValueError, match="worker 0 received a block of shape"):
        run_lockstep(workers)


# --- the process transport (few and small: every run spawns P interpreters) -------------------------


def child_pids():
    """Return the pids of this process's children, except multiprocessing's helper servers."""
    helpers = set()
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    if tracker is not None and getattr(tracker, "_pid", None):
        helpers.add(tracker._pid)
    try:
        from multiprocessing import forkserver

        server_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if server_pid:
            helpers.add(server_pid)
    except ImportError:
        pass
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and int(entry) not in helpers:
            children.append(int(entry))
    return children


def our_segments():
    return [name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)] if os.path.isdir("/dev/shm") else []


@pytest.fixture
def no_leftovers():
    """Fail the test when a worker process or a shared-memory segment outlives it."""
    before = set(our_segments())
    yield
    assert multiprocessing.active_children() == []
    assert child_pids() == [] if os.path.isdir("/proc") else True
    assert set(our_segments()) - before == set()


def test_process_ring_matches_dense_and_overlaps(rng, no_leftovers):
    # Blocks of 667 x 32 float64 values (167 KiB) exceed the 64 KiB pipe buffer,
    # so a send lasts until the neighbour reads, after its own compute.
    q, k, v = random_qkv(rng, 2001, 2001, batch=(1, 1), width=32, value_width=32)
    mask = padding_mask(np.array([1950]), 2001)  # the last 51 keys are padding
    dout = rng.standard_normal(q.shape)
    result = simulate(
        q, k, v, n_workers=3, layout="striped", causal=True, mask=mask, block_size=128, dout=dout, timeout=120
    )
    assert_matches_dense(q, k, v, result.out, result.lse, result.grads, dout, causal=True, mask=mask)

    for report in (result.forward, result.backward):
        assert [worker.worker for worker in report.workers] == [0, 1, 2]
        for worker in report.workers:
            assert worker.blas_threads == "1"
            assert worker.peak_bytes > 0
            assert send_compute_overlaps(worker.events), f"worker {worker.worker}: no send overlapped a compute"
    assert [worker.blocks_computed for worker in result.forward.workers] == [3, 3, 3]


def test_process_ring_failing_worker_stops_ring(rng, no_leftovers):
    q, k, v = random_qkv(rng, 12, 12, batch=(1, 1))
    with pytest.raises(RingWorkerError, match="ring worker 1 failed during the forward") as raised:
        simulate(q, k, v, n_workers=3, fault=RingFault(worker=1, step=1, kind="raise"), timeout=60)
    assert raised.value.worker == 1
    assert "fault injected in worker 1 at step 1" in str(raised.value)


def test_process_ring_worker_exit_is_detected(rng, no_leftovers):
    q, k, v = random_qkv(rng, 12, 12, batch=(1, 1))
    with pytest.raises(RingWorkerError, match="ring worker 0 exited with code 3 during the backward"):
        simulate(q, k, v, n_workers=2, dout=rng.standard_normal(v.shape), fault=RingFault(0, 1, "exit", "backward"), timeout=60)


def test_process_ring_hanging_worker_times_out(rng, no_leftovers):
    q, k, v = random_qkv(rng, 12, 12, batch=(1, 1))
    with pytest.raises(RingTimeoutError, match="worker 2 computing at step 0") as raised:
        simulate(q, k, v, n_workers=3, fault=RingFault(2, 0, "hang"), timeout=2.0)
    assert raised.value.workers == [2]


def test_ring_command_draws_timeline(capsys, no_leftovers):
    assert ring_command.main(["--workers", "2", "--length", "256", "--width", "16", "--causal", "--backward"]) == 0
    printed = capsys.readouterr().out
    assert "worker 0  compute |" in printed
    assert "worker 1  compute |" in printed
    assert "max |ring - dense|" in printed


@pytest.mark.slow
def test_process_ring_gradcheck(rng, no_leftovers):
    # Every forward spawns P processes, so the check uses two random directions per input.
    q, k, v = random_qkv(rng, 7, 9, batch=(1, 1), width=3, value_width=2)

    def forward(q, k, v):
        return ring_attention_forward(
            q, k, v, n_workers=2, layout="striped", causal=True, block_size=2, transport="process", timeout=60
        )

    result = gradcheck(
        forward, ring_attention_backward, [q, k, v], names=["q", "k", "v"], rng=rng, max_elementwise=0, n_directions=2
    )
    result.assert_ok(1e-6)
