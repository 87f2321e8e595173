"""Prefect flows: parameters, ordering, retries, caching. No tensor code (that is in tasks/).

- `flows.convert`: checkpoint -> checked, published artifact (`flashio convert`)
- `flows.config`: its pydantic parameters
- `flows.cli`: the `convert` subcommand contributed to the `flashio` CLI (entry point group
  `flashio.commands`); it imports nothing heavy until it runs.
"""
