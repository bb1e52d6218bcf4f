"""The demo's learning task: scikit-learn's bundled digits, a small PyTorch MLP.

Nothing is downloaded: ``load_digits`` ships with scikit-learn. This module imports torch;
the core library never imports it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

torch.set_num_threads(1)  # many clients share few cores; one thread each avoids oversubscription

NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _dataset(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split into a pool for the clients and a server test set (20 %)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    pool, test = order[:cut], order[cut:]
    return x[pool], y[pool], x[test], y[test]


def partition(labels: np.ndarray, num_partitions: int, kind: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Indices of each client's share: ``iid`` (shuffled equal parts) or ``dirichlet`` (label skew)."""
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return list(np.array_split(rng.permutation(len(labels)), num_partitions))
    minimum = max(10, len(labels) // (num_partitions * 20))
    for _ in range(100):  # redraw until every client has enough examples to split and train on
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in range(NUM_CLASSES):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet([alpha] * num_partitions)
            bounds = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, bounds)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= minimum:
            return [np.array(sorted(p)) for p in parts]
    raise ValueError(f"could not split the data for {num_partitions} clients with alpha={alpha}; raise alpha")


def client_data(
    partition_id: int, num_partitions: int, kind: str = "dirichlet", alpha: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One client's train and validation arrays (80 / 20 of its share)."""
    x, y, _, _ = _dataset(seed)
    mine = partition(y, num_partitions, kind, alpha, seed)[partition_id]
    mine = np.random.default_rng(seed + partition_id).permutation(mine)
    cut = max(1, int(0.8 * len(mine)))
    return x[mine[:cut]], y[mine[:cut]], x[mine[cut:]], y[mine[cut:]]


def server_test_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    _, _, x, y = _dataset(seed)
    return x, y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, lr: float = 0.05, momentum: float = 0.9,
    seed: int = 0,
) -> float:
    """Local SGD with momentum; returns the mean loss of the last epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(epochs):
        total, batches = 0.0, 0
        for batch in torch.randperm(len(ys), generator=generator).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        last = total / max(1, batches)
    return last


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) on the given arrays."""
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
        target = torch.from_numpy(y)
        loss = nn.functional.cross_entropy(out, target).item()
        accuracy = (out.argmax(1) == target).float().mean().item()
    return loss, accuracy
