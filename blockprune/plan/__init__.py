"""``blockprune plan``: per-layer block shapes, ratios and forms that meet a latency budget on a
target with the least predicted accuracy cost (``search``: numpy only; ``plan_api``: the flow;
``plan_file``: the YAML that ``prune``/``compress``/``train`` read)."""
