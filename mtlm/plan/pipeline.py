"""The planner's pipeline- and sequence-parallel terms: small pure functions, each pinned by a unit test.

Pipeline (Narayanan et al. 2021, SC'21 §2.2): a rank of stage-rank `r` of `P` holds `V` model chunks of
`l/(P·V)` layers; the first stage holds the embedding, the last the final norm and the tied output layer (mtlm's
split, mtlm/model/stages.py). The schedules are torch.distributed.pipelining's (what train.py runs), so the
micro-batches in flight are theirs. Sequence parallelism: Korthikanti et al. 2022 §4.2.2.
"""

from __future__ import annotations

from mtlm.parallel.pipeline import bubble_fraction

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def in_flight_chunks(schedule: str, pipeline: int, virtual: int, micro_batches: int, rank: int = 0) -> int:
    """Micro-batch x chunk activations stage-rank `rank` holds at its peak (a chunk: l/(P·V) layers).

    GPipe runs all m forwards before any backward: m. 1F1B (torch's Schedule1F1B) warms up with P - r forwards,
    then each forward follows a backward: min(P - r, m). Interleaved 1F1B (torch's ScheduleInterleaved1F1B,
    m a multiple of P): (V-1)·P + 2·(P-1-r) warm-up forwards plus the steady state's one, at most m·V: on the
    first stage that is P·V + P - 1 chunks, Korthikanti et al.'s factor 1 + (P-1)/(P·V) over 1F1B's P·V.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    if pipeline == 1:  # no schedule runs: one micro-batch at a time (gradient accumulation)
        return virtual
    if schedule == "gpipe":
        return micro_batches * virtual
    if schedule == "1f1b":
        return min(pipeline - rank, micro_batches) * virtual
    return min((virtual - 1) * pipeline + 2 * (pipeline - 1 - rank) + 1, micro_batches * virtual)


def step_factor(pipeline: int, virtual: int, micro_batches: int) -> float:
    """A step's time over its busy time: 1 + the bubble (P-1)/(V·m) (SC'21 §2.2)."""
    return 1.0 + bubble_fraction(pipeline, virtual, micro_batches)


def stage_params(layer_params: int, layers: int, pipeline: int, word_params: int, first_params: int,
                 last_params: int, stage: int) -> int:
    """Parameters of pipeline rank `stage` (all its chunks): its l/P layers, the word embedding and the rest of
    the input end (`first_params`: position table, embedding norm) on the first, the final norm (`last_params`)
    on the last, which with P > 1 also holds its own copy of the tied word embedding (kept equal by summing the
    two gradients, Megatron's embedding group; mtlm/model/stages.py)."""
    own = layers // pipeline * layer_params
    if stage == 0:
        own += word_params + first_params
    if stage == pipeline - 1:
        own += last_params + (word_params if pipeline > 1 else 0)
    return own


def p2p_bytes(micro_batch: int, seq: int, hidden: int, bytes_per_value: int, tensor: int,
              scatter_gather: bool, sequence_parallel: bool) -> float:
    """Bytes one tensor rank sends to the next stage per micro-batch and chunk, one way: b·s·h values. SC'21
    §4.1's scatter/gather (and sequence parallelism, whose stream is already split) sends 1/t of them per rank."""
    split = tensor if (scatter_gather or sequence_parallel) else 1
    return micro_batch * seq * hidden * bytes_per_value / split


def p2p_time(nbytes: float, bw_gbps: float, latency_us: float) -> float:
    """Seconds for one point-to-point send of `nbytes` over a link of `bw_gbps` (one hop)."""
    return latency_us * 1e-6 + nbytes / (bw_gbps * 1e9)


def p2p_exposed_time(hop_s: float, pipeline: int, virtual: int, micro_batches: int) -> float:
    """What the stage-to-stage sends add to a step. Sends are blocking in both torch's schedules and SC'21's
    code, so each of a stage's m·V forwards and m·V backwards waits for one hop, and the bubble's (P-1)/V slots
    stretch with them: 2·V·hop per micro-batch slot, (m + (P-1)/V) slots."""
    if pipeline == 1:
        return 0.0
    return 2 * virtual * hop_s * (micro_batches + (pipeline - 1) / virtual)


def tied_embedding_allreduce_bytes(padded_vocab: int, hidden: int, tensor: int, grad_bytes: int) -> float:
    """The word-embedding gradient the first and last stage sum after the schedule (P > 1): V/t·h values."""
    return padded_vocab // tensor * hidden * grad_bytes


# ---- sequence parallelism ---------------------------------------------------------------------------------


def sequence_parallel_activation_bytes_per_layer(full_per_layer_t1: int, tensor: int) -> int:
    """Korthikanti et al. 2022 §4.2.2: with sequence parallelism every activation of a layer is split t ways,
    the layer norms', dropouts' and residual's over the sequence, the rest over heads/columns as before:
    `sbh(34 + 5as/h)/t` at 16 bits with dropout, i.e. the whole one-rank count over t. Under full recompute
    the kept layer input is the sequence-split stream: `e·sbh/t`. Pass the t = 1 count of either."""
    return full_per_layer_t1 // tensor

