"""Ring Attention (Liu, Zaharia and Abbeel, ICLR 2024): exact attention over a ring of workers.

Letters: B batch, H heads, N queries, M keys, D head width, P ring workers,
c block length per worker (c = ceil(N / P) queries, ceil(M / P) keys),
p a worker, t a step.

Idea. The sequence is split into P blocks and worker p keeps its query block
Q_p for good. Key/value blocks travel around the ring p -> p + 1 (mod P): at
step t worker p holds the block of worker

    src = (p - t) mod P

attends Q_p to it with the online softmax of ``miniattn.core.online_softmax``
and merges the partial result into its running (O_p, lse_p). While it
computes, it already sends the block on to worker p + 1, so communication
overlaps compute. After P steps every worker has seen every block, and O_p
equals dense attention for its queries.

Forward, worker p:

    (O, lse) = (0, -inf)
    for t = 0 .. P-1:
        if t > 0:     receive block src = (p - t) mod P from worker p - 1
        if t < P-1:   send that block on to worker p + 1     (overlaps the compute)
        if the block is not wholly in the future of Q_p:
            (O, lse) = merge((O, lse), attention(Q_p, K_src, V_src))

Backward, worker p, with the GLOBAL lse_p and D_p = rowsum(dO_p * O_p) so
that every block's contribution is exact and the contributions simply add:

    dQ = 0;  the block (K_p, V_p) travels together with accumulators (dK, dV) = 0
    for t = 0 .. P-1:
        if t > 0:     receive (K_src, V_src) and then (dK_src, dV_src) from worker p - 1
        if t < P-1:   send (K_src, V_src) on to worker p + 1
        dQ += dQ_part;  dK_src += dK_part;  dV_src += dV_part   (recomputed from lse)
        send (dK_src, dV_src) on to worker p + 1
    receive (dK_p, dV_p): after P hops the accumulators are home

Keys and values need P - 1 hops; their gradient accumulators need P.

Causal work. Masks are built from global positions. With the contiguous
layout (worker p holds the p-th run of consecutive rows) a block from a later
worker lies wholly in the future and is skipped, so worker p computes p + 1
blocks: worker P - 1 computes P blocks while worker 0 computes one, and the
others wait for it. The
striped layout (worker r holds rows r, r + P, r + 2P, ...) gives every
worker a causal half of every block, so the work is balanced.

Lengths that P does not divide are padded to P c rows. A padding key is
never attended and a padding query row is dropped, so padding never reaches
the outputs or the gradients.

Complexity per worker: O(N M D / P) time, O((N + M) D / P) memory plus one
score tile and one key/value block in flight.

Two transports run the same per-worker code. ``worker_forward`` and
``worker_backward`` are generators: after each step they yield a RingStep
record. The inline transport runs all P workers in this process, one step
of every worker at a time, which a reader can follow in a debugger. The
process transport (``miniattn.ring``) runs each worker in its own process
and passes blocks through pipes.
"""

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .core.masks import CAUSAL_ALIGNMENTS
from .core.online_softmax import (
    DEFAULT_BLOCK_SIZE,
    BlockMask,
    blockwise_attention_backward,
    blockwise_attention_forward,
    causal_offset_for,
    empty_partial,
    mask_with_two_axes,
    merge_partials,
    output_delta,
    partial_attention_backward,
    partial_attention_forward,
)
from .core.validate import (
    check_attention_inputs,
    check_choice,
    check_float_array,
    check_int,
    check_mask,
    check_real,
)

LAYOUTS = ("contiguous", "striped")
TRANSPORTS = ("inline", "process")


# --- layouts: which rows each worker holds -------------------------------------------------


def shard_indices(length, n_workers, layout):
    """Return the global row index held by each worker, (P, c) with -1 for padding.

    contiguous: worker p holds a run of consecutive rows (runs differ in
    length by at most one). striped: worker r holds rows r, r + P, r + 2P, ...
    Every row appears exactly once; c = ceil(length / P).
    """
    check_int("length", length, minimum=1)
    check_int("n_workers", n_workers, minimum=1, maximum=length)
    check_choice("layout", layout, LAYOUTS)
    block = -(-length // n_workers)  # c = ceil(length / P)
    indices = np.full((n_workers, block), -1, dtype=np.int64)  # (P, c)
    if layout == "contiguous":
        for worker, rows in enumerate(np.array_split(np.arange(length), n_workers)):
            indices[worker, : rows.size] = rows
    else:
        for worker in range(n_workers):
            rows = np.arange(worker, length, n_workers)
            indices[worker, : rows.size] = rows
    return indices


def gather_rows_padded(x, index):
    """Return x[..., index, :] (..., c, D) with zero rows where index is -1."""
    rows = np.take(x, np.maximum(index, 0), axis=-2)  # (..., c, D)
    rows[..., index < 0, :] = 0
    return rows


def scatter_add_rows_padded(dest, index, rows):
    """Add rows (..., c, D) into dest[..., index, :], skipping padding (-1) rows."""
    valid = index >= 0
    np.add.at(np.moveaxis(dest, -2, 0), index[valid], np.moveaxis(rows[..., valid, :], -2, 0))


def pair_mask(mask, query_index, key_index):
    """Return the general mask for these local rows and columns (..., c_q or 1, c_k or 1), or None.

    mask is (..., N or 1, M or 1); a size-1 axis stays size 1. Padding
    indices read row/column 0, which BlockMask masks out anyway.
    NOTE: every worker can read the whole mask. That costs little for key
    padding (..., 1, 1, M), but a full (N, M) mask gives up the O(N / P)
    memory per worker; causal masks are built from positions instead.
    """
    if mask is None:
        return None
    if mask.shape[-2] > 1:
        mask = np.take(mask, np.maximum(query_index, 0), axis=-2)  # (..., c_q, M or 1)
    if mask.shape[-1] > 1:
        mask = np.take(mask, np.maximum(key_index, 0), axis=-1)  # (..., c_q or 1, c_k)
    return mask


# --- what travels and what each worker holds ----------------------------------------------


@dataclass(frozen=True)
class RingConfig:
    """Settings every worker shares: ring size, score scale, causality and tile sizes."""

    n_workers: int
    scale: float
    causal_offset: object  # None (bidirectional) or the int offset M - N / 0
    query_block: int
    key_block: int


class RingShard(NamedTuple):
    """The blocks worker p keeps for the whole run: its query block and its own key/value block."""

    worker: int
    query_index: np.ndarray  # (c_q,) global query rows, -1 = padding
    key_index: np.ndarray  # (c_k,) global key rows, -1 = padding
    q: np.ndarray  # (..., c_q, D)
    k: np.ndarray  # (..., c_k, D)
    v: np.ndarray  # (..., c_k, Dv)


class KVBlock(NamedTuple):
    """A key/value block travelling the ring, tagged with the worker that owns it."""

    source: int
    key_index: np.ndarray  # (c_k,)
    k: np.ndarray  # (..., c_k, D)
    v: np.ndarray  # (..., c_k, Dv)


class GradBlock(NamedTuple):
    """The gradient accumulators of one key/value block, travelling with it for P hops."""

    source: int
    dk: np.ndarray  # (..., c_k, D)
    dv: np.ndarray  # (..., c_k, Dv)


class RingStep(NamedTuple):
    """The record a worker generator yields after each step."""

    step: int
    worker: int
    source: int  # whose key/value block it held
    computed: bool  # False when the block was skipped (wholly in the future, or padding)
    out: object  # forward: the running output (..., c_q, Dv); backward: None
    lse: object  # forward: the running log-sum-exp (..., c_q); backward: None


@dataclass
class WorkCount:
    """Blocks a worker computed and the (query, key) pairs those blocks allowed."""

    blocks: int = 0
    pairs: int = 0


def worker_block_mask(shard, block, config, mask):
    """Return the BlockMask of a worker's queries against the key/value block it holds now.

    The mask is built from global positions, so the forward and the backward
    schedules see the same allowed pairs at every step.
    """
    return BlockMask(
        shard.query_index,
        block.key_index,
        causal_offset=config.causal_offset,
        mask=pair_mask(mask, shard.query_index, block.key_index),
    )


def expect_block(message, source, own, worker, step):
    """Raise when a received message is not the block the schedule expects at this step.

    The source must be worker (p - t) mod P, and its arrays must have the
    shapes of this worker's own key/value block: every worker holds blocks
    of one shape.
    """
    if message.source != source:
        raise RuntimeError(
            f"worker {worker} received the block of worker {message.source} at step {step}; "
            f"expected the block of worker {source} = (p - t) mod P"
        )
    for got, expected in zip(message[-2:], (own.k, own.v)):
        if got.shape != expected.shape:
            raise ValueError(
                f"worker {worker} received a block of shape {got.shape} from worker {source} at step {step}; "
                f"expected {expected.shape} like its own block (every worker must hold blocks of one shape)"
            )


# --- the per-worker schedule -----------------------------------------------------------------


def worker_forward(shard, config, transport, mask=None):
    """Run worker p's forward schedule; a generator yielding one RingStep per step.

    Inputs: the worker's RingShard, the shared RingConfig, a transport
    endpoint (send, receive, compute) and the global mask (..., N or 1, M or 1) or
    None. The generator returns (out (..., c_q, Dv), lse (..., c_q), WorkCount).
    """
    worker, n_workers = shard.worker, config.n_workers
    out, lse = empty_partial(shard.q, shard.v)  # the merge identity (0, -inf)
    block = KVBlock(worker, shard.key_index, shard.k, shard.v)
    work = WorkCount()

    for step in range(n_workers):
        source = (worker - step) % n_workers

        # 1. Take the block that worker p - 1 passed on at the previous step.
        if step > 0:
            block = transport.receive()
            expect_block(block, source, shard, worker, step)

        # 2. Pass it on to worker p + 1 before computing on it, so the send overlaps the compute.
        if step < n_workers - 1:
            transport.send(block)

        # 3. Attend the local queries to it and merge into the running result.
        block_mask = worker_block_mask(shard, block, config, mask)
        computed = not block_mask.is_empty(slice(None), slice(None))
        with transport.compute(step):
            if computed:
                block_out, block_lse = partial_attention_forward(
                    shard.q, block.k, block.v, block_mask,
                    scale=config.scale, query_block=config.query_block, key_block=config.key_block,
                )  # (..., c_q, Dv), (..., c_q)
                out, lse = merge_partials(out, lse, block_out, block_lse)
                work.blocks += 1
                work.pairs += block_mask.allowed_count()
        yield RingStep(step, worker, source, computed, out, lse)

    return out, lse, work


def worker_backward(shard, out, lse, dout, config, transport, mask=None):
    """Run worker p's backward schedule; a generator yielding one RingStep per step.

    Inputs: the worker's RingShard; its rows of the forward output out
    (..., c_q, Dv) and GLOBAL log-sum-exp lse (..., c_q); the upstream
    gradient dout (..., c_q, Dv); the RingConfig, transport and mask of the
    forward. The generator returns (dq, dk, dv) for the worker's own query
    block and key/value block.
    """
    worker, n_workers = shard.worker, config.n_workers
    delta = output_delta(dout, out)  # D_p = rowsum(dO_p * O_p): (..., c_q)
    dq = np.zeros_like(shard.q)  # (..., c_q, D), stays on this worker
    block = KVBlock(worker, shard.key_index, shard.k, shard.v)
    grads = GradBlock(worker, np.zeros_like(shard.k), np.zeros_like(shard.v))  # travel with the block

    for step in range(n_workers):
        source = (worker - step) % n_workers

        # 1. Take the block and its accumulators that worker p - 1 sent at the previous step.
        if step > 0:
            block = transport.receive()
            expect_block(block, source, shard, worker, step)
            grads = transport.receive()
            expect_block(grads, source, shard, worker, step)

        # 2. Pass keys and values on before computing (they need only P - 1 hops).
        if step < n_workers - 1:
            transport.send(block)

        # 3. Add this block's gradient contributions, recomputed from the global lse.
        block_mask = worker_block_mask(shard, block, config, mask)
        computed = not block_mask.is_empty(slice(None), slice(None))
        with transport.compute(step):
            if computed:
                dq_part, dk_part, dv_part = partial_attention_backward(
                    dout, shard.q, block.k, block.v, lse, delta, block_mask,
                    scale=config.scale, query_block=config.query_block, key_block=config.key_block,
                )
                dq += dq_part
                grads.dk[...] += dk_part
                grads.dv[...] += dv_part

        # 4. Send the accumulators on: hop t + 1 of P. The last hop brings them home.
        transport.send(grads)
        yield RingStep(step, worker, source, computed, None, None)

    # 5. After P hops the accumulators of this worker's own block have come back.
    grads = transport.receive()
    expect_block(grads, worker, shard, worker, n_workers)
    return dq, grads.dk, grads.dv


# --- the inline transport: every worker in this process --------------------------------------


class InlineRing:
    """A ring of P mailboxes in one process; ``endpoint(p)`` is worker p's transport.

    A send appends to the mailbox of worker p + 1 and returns at once; a
    receive pops the oldest message from worker p's own mailbox. Messages are
    passed by reference: a worker never changes a block after sending it.
    """

    def __init__(self, n_workers):
        self.n_workers = n_workers
        self.mailboxes = [deque() for _ in range(n_workers)]

    def endpoint(self, worker):
        return InlineEndpoint(self, worker)


class InlineEndpoint:
    """Worker p's view of an InlineRing: send to p + 1, receive from p - 1."""

    def __init__(self, ring, worker):
        self.ring = ring
        self.worker = worker

    def send(self, message):
        self.ring.mailboxes[(self.worker + 1) % self.ring.n_workers].append(message)

    def receive(self):
        mailbox = self.ring.mailboxes[self.worker]
        if not mailbox:
            raise RuntimeError(
                f"worker {self.worker} has no message to receive; a worker ran ahead of the lockstep schedule"
            )
        return mailbox.popleft()

    @contextmanager
    def compute(self, step):
        yield


def run_lockstep(workers):
    """Advance every worker generator one step at a time; return their return values.

    Round t runs step t of worker 0, then of worker 1, ...: each step only
    receives what the previous worker sent in round t - 1, so the mailboxes
    never run dry.
    """
    results = [None] * len(workers)
    active = list(range(len(workers)))
    while active:
        for worker in list(active):
            try:
                next(workers[worker])
            except StopIteration as finished:
                results[worker] = finished.value
                active.remove(worker)
    return results


def make_shards(q, k, v, query_shards, key_shards):
    """Cut q, k, v into the RingShard of every worker (padding rows are zeros)."""
    return [
        RingShard(
            worker,
            query_shards[worker],
            key_shards[worker],
            gather_rows_padded(q, query_shards[worker]),  # (..., c_q, D)
            gather_rows_padded(k, key_shards[worker]),  # (..., c_k, D)
            gather_rows_padded(v, key_shards[worker]),  # (..., c_k, Dv)
        )
        for worker in range(len(query_shards))
    ]


def check_shards(shards):
    """Check that every worker's shard has worker 0's shapes and dtype."""
    first = shards[0]
    for shard in shards[1:]:
        for name in ("query_index", "key_index", "q", "k", "v"):
            expected, got = getattr(first, name), getattr(shard, name)
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ValueError(
                    f"worker {shard.worker} has {name} of shape {got.shape} and dtype {got.dtype}; "
                    f"expected shape {expected.shape} and dtype {expected.dtype} like worker {first.worker}"
                )


def inline_forward(shards, config, mask=None):
    """Run the forward of every worker in this process; return their (out, lse, work)."""
    check_shards(shards)
    ring = InlineRing(config.n_workers)
    workers = [worker_forward(shard, config, ring.endpoint(shard.worker), mask) for shard in shards]
    return run_lockstep(workers)


def inline_backward(shards, outs, lses, douts, config, mask=None):
    """Run the backward of every worker in this process; return their (dq, dk, dv)."""
    check_shards(shards)
    ring = InlineRing(config.n_workers)
    workers = [
        worker_backward(shard, outs[p], lses[p], douts[p], config, ring.endpoint(shard.worker), mask)
        for p, shard in enumerate(shards)
    ]
    return run_lockstep(workers)


# --- the public pair ------------------------------------------------------------------------


class RingCache(NamedTuple):
    """The inputs ring_attention_backward needs, plus the run's records for inspection."""

    q: np.ndarray  # (..., N, D)
    k: np.ndarray  # (..., M, D)
    v: np.ndarray  # (..., M, Dv)
    out: np.ndarray  # (..., N, Dv)
    lse: np.ndarray  # (..., N)
    mask: object  # the mask as given (broadcastable to (..., N, M)) or None
    config: RingConfig
    query_shards: np.ndarray  # (P, c_q)
    key_shards: np.ndarray  # (P, c_k)
    transport: str
    process_options: dict  # start_method, timeout, fault (process transport)
    work: list  # WorkCount per worker
    reports: dict  # process transport: RingReport (timeline, memory) of "forward" and "backward"


def check_ring_options(n_queries, n_keys, n_workers, layout, block_size, transport):
    """Check the ring size, layout, tile size and transport against N and M."""
    check_int("n_workers", n_workers, minimum=1)
    if n_workers > min(n_queries, n_keys):
        raise ValueError(
            f"n_workers={n_workers} is invalid; expected 1 <= n_workers <= min(N, M) = "
            f"{min(n_queries, n_keys)} so that every worker holds at least one query and one key"
        )
    check_choice("layout", layout, LAYOUTS)
    check_int("block_size", block_size, minimum=1)
    check_choice("transport", transport, TRANSPORTS)


def ring_attention_forward(
    q,
    k,
    v,
    *,
    n_workers,
    layout="contiguous",
    mask=None,
    causal=False,
    scale=None,
    block_size=DEFAULT_BLOCK_SIZE,
    transport="inline",
    causal_alignment="bottom_right",
    start_method="spawn",
    timeout=300.0,
    fault=None,
):
    """Exact attention softmax(s q k^T) v computed by a ring of P workers.

    Inputs:
    - q: queries (..., N, D); k: keys (..., M, D); v: values (..., M, Dv)
    - n_workers: P, 1 <= P <= min(N, M)
    - layout: "contiguous" or "striped" (balances causal work)
    - mask: optional bool array broadcastable to (..., N, M), True = may attend
    - causal: forbid keys in each query's future (bottom-right aligned)
    - scale: score scale s, 1/sqrt(D) by default
    - block_size: tile size of the online softmax inside each worker
    - transport: "inline" (one process, step by step) or "process" (P processes)
    - causal_alignment: "bottom_right" (default) or "top_left"
    - start_method, timeout: for the process transport (see miniattn.ring)
    - fault: a miniattn.ring.RingFault testing hook for the process transport

    Returns (out, cache): out (..., N, Dv); cache is a RingCache with the
    global lse (..., N), each worker's WorkCount and, for the process
    transport, the RingReport (timeline and peak memory per worker) of each
    pass in cache.reports.
    """
    check_attention_inputs(q, k, v)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    check_ring_options(n_queries, n_keys, n_workers, layout, block_size, transport)
    check_choice("causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    if mask is not None:
        check_mask(mask, q.shape[:-2] + (n_queries, n_keys))
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    check_real("scale", scale)

    # 1. Decide which rows each worker holds.
    config = RingConfig(
        n_workers, float(scale), causal_offset_for(n_queries, n_keys, causal, causal_alignment), block_size, block_size
    )
    query_shards = shard_indices(n_queries, n_workers, layout)  # (P, c_q)
    key_shards = shard_indices(n_keys, n_workers, layout)  # (P, c_k)
    mask_2d = mask_with_two_axes(mask)  # (..., N or 1, M or 1) or None
    process_options = {"start_method": start_method, "timeout": timeout, "fault": fault}
    if transport == "process":
        from .ring import check_start_method

        check_start_method(start_method)

    # 2. Run the P workers.
    out = np.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)  # (..., N, Dv)
    lse = np.full(q.shape[:-1], -np.inf, dtype=q.dtype)  # (..., N)
    reports = {"forward": None, "backward": None}
    if transport == "inline":
        shards = make_shards(q, k, v, query_shards, key_shards)
        results = inline_forward(shards, config, mask_2d)

        # 3. Put every worker's rows back in global order, dropping padding rows.
        for worker, (worker_out, worker_lse, _) in enumerate(results):
            valid = query_shards[worker] >= 0
            out[..., query_shards[worker][valid], :] = worker_out[..., valid, :]
            lse[..., query_shards[worker][valid]] = worker_lse[..., valid]
        work = [result[2] for result in results]
    else:
        from .ring import run_ring_forward

        work, reports["forward"] = run_ring_forward(
            q, k, v, mask, out, lse, config, query_shards, key_shards, **process_options
        )

    cache = RingCache(
        q, k, v, out, lse, mask, config, query_shards, key_shards, transport, process_options, work, reports
    )
    return out, cache


def ring_attention_backward(dout, cache):
    """Backward of ring_attention_forward: returns (dq, dk, dv).

    The cache holds q, k, v, the output and the global lse; the same ring of
    workers (same transport) recomputes every block's probabilities, and the
    gradient accumulators of each key/value block travel with it.
    """
    q, k, v, out, lse, mask, config, query_shards, key_shards, transport, process_options, _, reports = cache
    check_float_array("dout", dout, min_ndim=2)
    if dout.shape != out.shape:
        raise ValueError(f"dout has shape {dout.shape}; expected {out.shape}, the shape of the output")

    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if transport == "inline":
        shards = make_shards(q, k, v, query_shards, key_shards)
        outs = [gather_rows_padded(out, rows) for rows in query_shards]  # (..., c_q, Dv) each
        douts = [gather_rows_padded(dout, rows) for rows in query_shards]
        lses = [np.take(lse, np.maximum(rows, 0), axis=-1) for rows in query_shards]  # (..., c_q) each
        results = inline_backward(shards, outs, lses, douts, config, mask_with_two_axes(mask))

        # The shard gathers are undone by scatter-adds (each row appears once, padding dropped).
        for worker, (worker_dq, worker_dk, worker_dv) in enumerate(results):
            scatter_add_rows_padded(dq, query_shards[worker], worker_dq)
            scatter_add_rows_padded(dk, key_shards[worker], worker_dk)
            scatter_add_rows_padded(dv, key_shards[worker], worker_dv)
    else:
        from .ring import run_ring_backward

        reports["backward"] = run_ring_backward(
            q, k, v, mask, out, lse, dout, dq, dk, dv, config, query_shards, key_shards, **process_options
        )
    return dq, dk, dv


# --- the registry object ----------------------------------------------------------------------


class RingAttention:
    """Ring Attention as an attention method object (forward, backward, keys_seen).

    Options: n_workers (P), layout ("contiguous" or "striped"), transport
    ("inline" by default so that the tour and benchmark stay in one process,
    or "process"), block_size, start_method and timeout for processes.
    """

    name = "ring_attention"

    def __init__(
        self,
        *,
        n_workers=2,
        layout="contiguous",
        transport="inline",
        block_size=DEFAULT_BLOCK_SIZE,
        scale=None,
        start_method="spawn",
        timeout=300.0,
    ):
        check_int("n_workers", n_workers, minimum=1)
        check_choice("layout", layout, LAYOUTS)
        check_choice("transport", transport, TRANSPORTS)
        check_int("block_size", block_size, minimum=1)
        if transport == "process":
            from .ring import check_start_method

            check_start_method(start_method)
        self.n_workers = n_workers
        self.layout = layout
        self.transport = transport
        self.block_size = block_size
        self.scale = scale
        self.start_method = start_method
        self.timeout = timeout

    def forward(self, q, k, v, *, mask=None, causal=False):
        return ring_attention_forward(
            q, k, v,
            n_workers=self.n_workers, layout=self.layout, mask=mask, causal=causal, scale=self.scale,
            block_size=self.block_size, transport=self.transport,
            start_method=self.start_method, timeout=self.timeout,
        )

    def backward(self, dout, cache):
        return ring_attention_backward(dout, cache)

    def keys_seen(self, cache):
        """Return None: the ring is exact, every allowed key takes part."""
        return None


def make_method(rng=None, **options):
    """Return RingAttention with the given options (rng is unused: nothing is random).

    Options: n_workers (alias P), layout, transport, block_size, scale,
    start_method, timeout.
    """
    if "P" in options:
        options["n_workers"] = options.pop("P")
    return RingAttention(**options)


def gradcheck_cases(rng):
    """Small float64 cases for ``python -m miniattn gradcheck ring_attention``."""
    cases = []
    for label, n_workers, layout, causal in (
        ("P=3 contiguous causal, N=7 M=9", 3, "contiguous", True),
        ("P=2 striped causal, N=7 M=9", 2, "striped", True),
        ("P=3 striped bidirectional, N=7 M=9", 3, "striped", False),
    ):
        q = rng.standard_normal((1, 2, 7, 3))
        k = rng.standard_normal((1, 2, 9, 3))
        v = rng.standard_normal((1, 2, 9, 3))

        def forward(q, k, v, n_workers=n_workers, layout=layout, causal=causal):
            return ring_attention_forward(q, k, v, n_workers=n_workers, layout=layout, causal=causal, block_size=2)

        cases.append((label, forward, ring_attention_backward, [q, k, v], ["q", "k", "v"]))

    # The single-process blockwise attention every worker runs, on its own.
    q, k, v = rng.standard_normal((1, 2, 6, 3)), rng.standard_normal((1, 2, 8, 3)), rng.standard_normal((1, 2, 8, 2))

    def blockwise_forward(q, k, v):
        return blockwise_attention_forward(q, k, v, causal=True, query_block=4, key_block=3)

    cases.append(("blockwise causal, N=6 M=8, tiles 4 x 3", blockwise_forward, blockwise_attention_backward,
                  [q, k, v], ["q", "k", "v"]))
    return cases
