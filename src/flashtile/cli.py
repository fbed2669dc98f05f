"""Command line: `flashtile demo` (also `python -m flashtile`) and `flashtile bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashtile", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="forward + backward against the float64 reference")
    demo.add_argument("--batch", type=int)
    demo.add_argument("--seqlen", type=int)
    demo.add_argument("--heads", type=int)
    demo.add_argument("--head-dim", type=int)
    demo.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    sub.add_parser("bench", add_help=False,
                   help="benchmark against the other attention kernels (GPU); "
                        "`flashtile bench --help` for its options")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        from flashtile.bench.run import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)

    if args.command in (None, "demo"):
        from flashtile.demo import run_demo

        if args.command is None:
            args = demo.parse_args([])
        return run_demo(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
