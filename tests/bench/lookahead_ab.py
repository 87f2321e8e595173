"""Lookahead on and off, alternated, on one artifact: ms per generated token, I/O wait, bytes read
per token, and how many layers still guess at the end (FlashConfig.lookahead's switches).

    python tests/bench/lookahead_ab.py REF [--registry R] [--dram-budget 1000MB] [--rounds 2]
        [--tokens 128] [--max-context 256] [--prompt TEXT]

REF is an artifact directory or a registry reference (name@version with --registry).
"""

from __future__ import annotations

import argparse
import statistics

import flashio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref")
    p.add_argument("--registry", default=None)
    p.add_argument("--dram-budget", default=None, help="e.g. 1000MB (default: none)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-context", type=int, default=256)
    p.add_argument("--prompt", default="The history of the city begins")
    args = p.parse_args()
    for _ in range(args.rounds):
        for lookahead in (False, True):
            with flashio.open(args.ref, registry=args.registry, mode="sparse", dram_budget=args.dram_budget,
                              lookahead=lookahead, max_context=args.max_context) as model:
                gen = model.generate(args.prompt, max_new_tokens=args.tokens, stop_at_eos=False)
                steps = gen.decode[1:]  # the first decode step follows the prompt's
                ms = statistics.mean(s.total_ms for s in steps)
                io = statistics.mean(s.io_ms for s in steps)
                mb = statistics.mean(s.bytes_read for s in steps) / 1e6
                state = model.engine.lookahead_state() if hasattr(model.engine, "lookahead_state") else None
                guessing = "-" if state is None else str(sum(state["guessing"]))
                print(f"lookahead {'on ' if lookahead else 'off'}  {ms:7.1f} ms/token  I/O {io:6.2f} ms  "
                      f"{mb:7.2f} MB/token  layers guessing {guessing:>3}  {gen.text[:40]!r}", flush=True)


if __name__ == "__main__":
    main()
