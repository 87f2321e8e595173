"""Prefect flows: parameters, ordering, retries, caching. No tensor code (that is in tasks/).

- `flows.convert`: checkpoint -> checked, published artifact (`flashio convert`)
- `flows.config`: its pydantic parameters
- `flows.cli`: the `convert` subcommand contributed to the `flashio` CLI (entry point group
  `flashio.commands`); it imports nothing heavy until it runs.
- `flows.scheduled`: keep a conversion plan's models converted (skips what is published)
- `flows.plan`: the conversion plan (YAML), validated
- `flows.schedule`: `flashio schedule`, the flows served with their schedules on one machine
- `flows.locks`: one conversion per model at a time (a Prefect global concurrency limit)
"""
