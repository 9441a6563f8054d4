"""Running one job sharded over a Ray cluster (`pipeline run --ray`).

`driver.py` shards the input, starts the cluster-wide limiter and assembles the
output; `worker.py` runs one shard with the ordinary engine; `limiter.py` is the one
rate limit every worker leases from; `segments.py` is the exactly-once record of
finished rows on shared storage; `shards.py` cuts the input. Ray is imported only
when a cluster run starts: without the `ray` extra everything else works.
"""

from pipeline.cluster.driver import ClusterOptions, require_ray, run_on_ray

__all__ = ["ClusterOptions", "require_ray", "run_on_ray"]
