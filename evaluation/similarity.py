"""The paper's inter-instance similarity picture: a query image and a row of key images (same
class, similar classes, unrelated) with the cosine similarity of their embeddings under each."""
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.weights import load_encoder
from loaders.shards import ShardSamples, open_converted
from loaders.eval_view import eval_view

MAX_CANDIDATES = 2000  # keys are chosen among this many samples of the split (plus the query)


@torch.no_grad()
def embed(encoder: torch.nn.Module, samples: ShardSamples, indices: list[int], size: int,
          batch: int = 64) -> torch.Tensor:
    """L2-normalised class-token embeddings of `indices` with the evaluation transform."""
    encoder.eval()
    out = []
    for start in range(0, len(indices), batch):
        views = torch.stack([eval_view(samples.decode(i)[0], size) for i in indices[start:start + batch]])
        out.append(encoder.forward_head(encoder.forward_features(views), pre_logits=True))
    return F.normalize(torch.cat(out), dim=1)


def choose_keys(similarity: torch.Tensor, labels: torch.Tensor, query_label: int, count: int) -> list[int]:
    """Positions of the keys: the most similar of the query's class, the most similar of other
    classes, then the least similar (unrelated), about a third each."""
    same = (labels == query_label).nonzero().flatten()
    other = (labels != query_label).nonzero().flatten()
    n_same = min(len(same), max(1, count // 3))
    n_unrelated = min(len(other), max(1, count // 4))
    n_similar = min(len(other) - n_unrelated, count - n_same - n_unrelated)
    by_same = same[similarity[same].argsort(descending=True)]
    by_other = other[similarity[other].argsort(descending=True)]
    picks = by_same[:n_same].tolist() + by_other[:n_similar].tolist()
    return picks + by_other[len(by_other) - n_unrelated:].tolist()


def similarity_picture(weights: str, data: str, query: int, out: str, split: str = "val", keys: int = 8) -> list[dict]:
    """Draw the picture into `out` (PNG); returns the keys as `{index, label, similarity}`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder, spec, _ = load_encoder(weights)
    dataset = open_converted(data)
    samples = ShardSamples(dataset, split)
    if not 0 <= query < len(samples):
        raise ValueError(f"--query must be an index of the {split} split, in [0, {len(samples)}); got {query}")
    candidates = [i for i in range(min(len(samples), MAX_CANDIDATES)) if i != query]
    embeddings = embed(encoder, samples, [query] + candidates, spec.img_size)
    similarity = embeddings[1:] @ embeddings[0]
    labels = torch.tensor([samples.read(i)[1] for i in candidates])
    query_label = samples.read(query)[1]
    chosen = choose_keys(similarity, labels, query_label, keys)

    rows = [{"index": candidates[p], "label": int(labels[p]), "similarity": float(similarity[p])} for p in chosen]
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(1.6 * (len(rows) + 1), 2.3))
    panels = [(query, f"query\n{dataset.classes[query_label]}")] + [
        (r["index"], f"{r['similarity']:.3f}\n{dataset.classes[r['label']]}") for r in rows]
    for ax, (index, caption) in zip(axes, panels):
        ax.imshow(samples.decode(index)[0])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=8)
    fig.suptitle("cosine similarity of embeddings to the query", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return rows
