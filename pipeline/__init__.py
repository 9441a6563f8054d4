"""pipeline: run an LLM prompt over every row of a table."""
