"""Answers kept when only the generation parameters changed (opt-in:
`reuse_across_params: true`).

A row's request hash covers `model.params`, so raising `max_tokens` makes every row a
new request. With the opt-in, before a run plans anything, a row without an answer
to its current request keeps the answer it was given under earlier params, unless
that answer was cut short (`finish_reason: length`) or failed: only those rows, and
rows never answered, are sent. The params of each run are remembered in the
checkpoint (the last `PARAMS_REMEMBERED`, whether or not the opt-in is on, so it can
be switched on after the fact), and the checkpoint's `carried` table says which
params produced each kept answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from pipeline.checkpoint import Checkpoint
from pipeline.job import ResolvedJob
from pipeline.output import READ_BATCH_ROWS
from pipeline.plan import WorkPlan

PARAMS_HISTORY = "params_history"
PARAMS_REMEMBERED = 20
CUT_SHORT = "length"


def carry_answers(job: ResolvedJob, checkpoint: Checkpoint) -> list[str]:
    """Keep the answers earlier params gave where the opt-in asks for it, remember this
    run's params; returns a note for the operator when answers were kept."""
    history: list[dict[str, Any]] = orjson.loads(checkpoint.get_meta(PARAMS_HISTORY) or "[]")
    current = job.settings.params
    earlier = [params for params in reversed(history) if params != current]  # newest first
    kept = _carry(job, checkpoint, earlier) if job.spec.reuse_across_params and earlier else 0
    remembered = [params for params in history if params != current] + [current]
    checkpoint.set_meta(PARAMS_HISTORY, orjson.dumps(remembered[-PARAMS_REMEMBERED:]).decode())
    if not kept:
        return []
    return [
        f"reuse_across_params: {kept:,} answer(s) given under earlier model.params are kept "
        "(answers cut short by max_tokens, failed rows and new rows are sent)"
    ]


def _carry(job: ResolvedJob, checkpoint: Checkpoint, earlier: list[dict[str, Any]]) -> int:
    plan = job.plan(checkpoint)
    others = [(params, _plan_with(job, checkpoint, params)) for params in earlier]
    kept, offset = 0, 0
    for batch in job.table.batches(READ_BATCH_ROWS, job.limit):
        hashes = plan.hashes_for(batch)
        keys = plan.keys_for(batch, offset, hashes)
        offset += batch.height
        finished = checkpoint.finished(keys)
        missing = [
            i
            for i, key in enumerate(keys)
            if (found := finished.get(key)) is None or found.request_hash != hashes[i]
        ]
        moves: dict[str, tuple[str, str, str, str]] = {}
        for params, other in others:
            if not missing:
                break
            old_hashes = other.hashes_for(batch)
            old_keys = other.keys_for(batch, offset - batch.height, old_hashes)
            stored = checkpoint.fetch(
                [old_keys[i] for i in missing],
                ["finish_reason", "error"],
                [old_hashes[i] for i in missing],
            )
            given_for = orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode()
            still = []
            for n, i in enumerate(missing):
                good = stored.found[n] and stored.values["error"][n] is None
                if good and stored.values["finish_reason"][n] != CUT_SHORT:
                    moves.setdefault(keys[i], (old_keys[i], keys[i], hashes[i], given_for))
                else:
                    still.append(i)
            missing = still
        checkpoint.carry(list(moves.values()))
        kept += len(moves)
    return kept


def _plan_with(job: ResolvedJob, checkpoint: Checkpoint, params: dict[str, Any]) -> WorkPlan:
    settings = dataclasses.replace(job.settings, params=params)
    return dataclasses.replace(job, settings=settings).plan(checkpoint)
