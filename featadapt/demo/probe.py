"""The forgetting probe: how well the encoder's embeddings still rank WordSim353 pairs."""

import torch
import torch.nn.functional as F

from .data import encode


def average_ranks(values):
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    # Runs of equal values: each gets the average of the positions it spans.
    _, run_ids, run_lengths = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    run_ends = torch.cumsum(run_lengths, 0).to(torch.float64)  # 1-based position of each run's last element
    run_average = run_ends - (run_lengths.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = run_average[run_ids]
    return ranks


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.numel() != ry.numel() or rx.numel() < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {rx.numel()} and {ry.numel()}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = rx.norm() * ry.norm()
    if denominator == 0:
        return float("nan")  # a constant sequence has no ranking to correlate
    return float((rx @ ry) / denominator)


@torch.no_grad()
def embed_words(model, tokenizer, words, device, batch_size=128):
    """{word: mean-pooled encoder embedding} — the head plays no part."""
    was_training = model.training
    model.eval()
    vectors = {}
    for start in range(0, len(words), batch_size):
        chunk = words[start:start + batch_size]
        inputs = encode(tokenizer, chunk, max_length=16, device=device)
        for word, vector in zip(chunk, model.embed(**inputs).float().cpu()):
            vectors[word] = vector
    model.train(was_training)
    return vectors


def wordsim_spearman(model, tokenizer, pairs, device):
    """Spearman correlation between human scores and the cosine of the two words' embeddings."""
    words = sorted({word for first, second, _ in pairs for word in (first, second)})
    vectors = embed_words(model, tokenizer, words, device)
    cosines = [F.cosine_similarity(vectors[a], vectors[b], dim=0).item() for a, b, _ in pairs]
    return spearman(cosines, [score for _, _, score in pairs])


def single_token_questions(tokenizer, questions):
    """The analogy questions whose four words the tokenizer keeps whole (one token each):
    a word split into pieces is embedded from pieces, which says less about what the model knows of it."""
    whole = {}
    for word in {word for question in questions for word in question}:
        whole[word] = len(tokenizer.tokenize(word)) == 1
    return [question for question in questions if all(whole[word] for word in question)]


@torch.no_grad()
def analogy_accuracy(model, tokenizer, questions, device, chunk=4096):
    """Share of "a : b :: c : ?" questions whose answer d is the nearest word to b − a + c
    (cosine, 3CosAdd, as gensim's evaluate_word_analogies), among every word of the
    questions except a, b and c themselves."""
    words = sorted({word for question in questions for word in question})
    vectors = embed_words(model, tokenizer, words, device)
    matrix = F.normalize(torch.stack([vectors[word] for word in words]).double(), dim=1)
    index = {word: i for i, word in enumerate(words)}
    ids = torch.tensor([[index[word] for word in question] for question in questions])
    correct = 0
    for start in range(0, len(ids), chunk):
        a, b, c, d = ids[start:start + chunk].unbind(dim=1)
        scores = F.normalize(matrix[b] - matrix[a] + matrix[c], dim=1) @ matrix.T
        rows = torch.arange(len(a))
        for excluded in (a, b, c):
            scores[rows, excluded] = -float("inf")
        correct += int((scores.argmax(dim=1) == d).sum())
    return correct / len(questions)
