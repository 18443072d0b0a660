"""``python -m lorax_zoo build [names...]`` builds zoo checkpoints (all by default) and prints paths and timings;
``python -m lorax_zoo lora PATH [--rank R] [--seed S] [--cover full|attention]`` writes a synthetic SD1.5 LoRA."""
import argparse
import resource
import sys

from . import zoo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorax_zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    models = "\n".join(f"  {name:<22} {spec.description}" for name, spec in zoo.SPECS.items())
    b = sub.add_parser("build", help="build zoo checkpoints into the cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"checkpoints (the *_trained ones have trained-looking spectra, METHOD.md §2b):\n"
                              f"{models}")
    b.add_argument("names", nargs="*", help="checkpoint names (default: all)")
    lo = sub.add_parser("lora", help="write a synthetic SD1.5 kohya LoRA")
    lo.add_argument("path")
    lo.add_argument("--rank", type=int, default=32)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--cover", choices=("full", "attention"), default="full")
    args = parser.parse_args(argv)
    if args.command == "build":
        unknown = [n for n in args.names if n not in zoo.CHECKPOINTS]
        if unknown:
            parser.error(f"unknown checkpoint(s) {', '.join(unknown)}; known: {', '.join(zoo.CHECKPOINTS)}")
        print(f"cache: {zoo.cache_dir()}")
        zoo.build(args.names)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS: {peak_mb:.0f} MB")
    else:
        print(zoo.make_sd15_lora(args.path, rank=args.rank, seed=args.seed, cover=args.cover))
    return 0


if __name__ == "__main__":
    sys.exit(main())
