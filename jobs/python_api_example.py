"""DataFrame in, DataFrame out: the Python API on the bundled simulator.

.venv/bin/python jobs/python_api_example.py
"""

import polars as pl

import pipeline

reviews = pl.DataFrame(
    {
        "review_id": ["a1", "a2", "a3"],
        "text": [
            "Arrived early, works perfectly, great value.",
            "Stopped working after two weeks; support never replied.",
            "Does the job, though the lid leaks a little.",
        ],
    }
)

job = pipeline.Job(
    name="api-example",
    input={"path": "(given below)", "id_column": "review_id"},
    model={"provider": "simulator", "model": "x-ai-grok-3-mini", "params": {"max_tokens": 100}},
    prompt={
        "system": "Answer with one word: positive, negative or neutral.",
        "template": "Review: {{ text }}",
    },
    limits={"concurrency": 8},
)

# A second call resumes: rows already answered are not sent (or paid for) again.
results = pipeline.run(job, data=reviews, progress=False)
print(results.select("review_id", "response", "prompt_tokens", "cost_usd", "error"))
