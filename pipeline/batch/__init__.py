"""Provider batch APIs behind the same job: half-price requests, answered within 24 h.

`support` says which providers have a batch API (from their presets); `store` keeps
each batch's durable state in the job's checkpoint; `apis` speaks OpenAI-style
Files + Batches and Anthropic Message Batches; `planner` writes the pending rows
into request files within the provider's limits; `engine` runs the state machine
(plan, upload, create, poll, collect) and turns results into ordinary row results.

Submodules are imported explicitly (`from pipeline.batch.engine import ...`), so the
resolver can ask `support` without importing the engine.
"""
