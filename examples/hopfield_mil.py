"""Multiple-instance learning with HopfieldPooling: classify synthetic bags of vectors (CPU, seconds).

A bag is a set of 8-32 instance vectors in R^16, all drawn from N(0, I), except that a positive bag hides
one or two "witness" instances whose first four coordinates are near a fixed sign pattern (scale 2.0). The
bag label is 1 iff it holds a witness. Averaging a bag dilutes the witness 8-32 times, so mean pooling
struggles; a learnable Hopfield query can retrieve the witness. With softmax1, a bag without a witness can
send the query's mass to the no-op pattern: the example prints the no-op mass for both classes.

    python -m examples.hopfield_mil [--separation softmax1|softmax|sparsemax] [--pooling hopfield|mean]
    python examples/hopfield_mil.py --epochs 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from model.hopfield import HopfieldPooling

DIM, MIN_BAG, MAX_BAG = 16, 8, 32


def make_bags(num: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bags [num, MAX_BAG, DIM] zero-padded, mask [num, MAX_BAG] True = real instance, labels [num])."""
    witness = torch.tensor([1.0, -1.0, 1.0, -1.0]) * 2.0
    bags = torch.randn(num, MAX_BAG, DIM, generator=gen)
    sizes = torch.randint(MIN_BAG, MAX_BAG + 1, (num,), generator=gen)
    mask = torch.arange(MAX_BAG)[None, :] < sizes[:, None]
    labels = torch.randint(0, 2, (num,), generator=gen)
    for i in torch.nonzero(labels).flatten().tolist():
        count = int(torch.randint(1, 3, (1,), generator=gen))
        where = torch.randperm(int(sizes[i]), generator=gen)[:count]
        bags[i, where, :4] = witness + 0.5 * torch.randn(count, 4, generator=gen)
    return bags * mask[..., None], mask, labels.float()


class BagClassifier(nn.Module):
    """Instance encoder -> set pooling (HopfieldPooling or masked mean) -> linear head."""

    def __init__(self, pooling: str, separation: str, hidden: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.pool = (HopfieldPooling(hidden, quantity=1, num_heads=heads, separation=separation)
                     if pooling == "hopfield" else None)
        self.head = nn.Linear(hidden, 1)

    def forward(self, bags: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [B], retrieval weights [B, heads, 1, N] or None for mean pooling)."""
        h = self.encoder(bags)
        if self.pool is None:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return self.head(pooled).squeeze(-1), None
        pooled, weights = self.pool(h, stored_mask=mask, return_association=True)
        return self.head(pooled[:, 0]).squeeze(-1), weights


def accuracy(model: BagClassifier, bags: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = model(bags, mask)
    return float(((logits > 0).float() == labels).float().mean())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--separation", default="softmax1", choices=("softmax1", "softmax", "sparsemax"))
    p.add_argument("--pooling", default="hopfield", choices=("hopfield", "mean"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-bags", type=int, default=2000)
    p.add_argument("--test-bags", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for these tiny tensors (threading overhead dominates)")
    args = p.parse_args(argv)
    if min(args.epochs, args.train_bags, args.test_bags, args.batch_size, args.threads) < 1:
        p.error("--epochs, --train-bags, --test-bags, --batch-size and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return train_and_evaluate(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's (e.g. a test session's) setting alone


def train_and_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train, test = make_bags(args.train_bags, gen), make_bags(args.test_bags, gen)
    model = BagClassifier(args.pooling, args.separation)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    name = f"{args.pooling}" + (f"/{args.separation}" if args.pooling == "hopfield" else "")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(args.train_bags, generator=gen)
        for i in range(0, args.train_bags, args.batch_size):
            idx = order[i:i + args.batch_size]
            logits, _ = model(train[0][idx], train[1][idx])
            loss = F.binary_cross_entropy_with_logits(logits, train[2][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 5 == 0 or epoch == args.epochs:
            model.eval()
            print(f"epoch {epoch:3d}  loss {loss.item():.4f}  test accuracy {accuracy(model, *test):.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    result: dict[str, Any] = {"model": name, "train_accuracy": accuracy(model, *train),
                              "test_accuracy": accuracy(model, *test), "seconds": round(seconds, 1)}
    if model.pool is not None and args.separation == "softmax1":  # softmax/sparsemax have no no-op
        with torch.no_grad():
            _, weights = model(test[0], test[1])
        noop = 1.0 - weights.sum(-1).mean(dim=(1, 2))  # per bag, averaged over heads
        labels = test[2].bool()
        result["noop_mass_positive"] = float(noop[labels].mean())
        result["noop_mass_negative"] = float(noop[~labels].mean())
    print(f"MIL with {name} pooling: test accuracy {result['test_accuracy']:.3f} "
          f"(train {result['train_accuracy']:.3f}), trained in {seconds:.1f} s on {torch.get_num_threads()} threads")
    if "noop_mass_positive" in result:
        print(f"no-op mass of the pooling query: positive bags {result['noop_mass_positive']:.3f}, "
              f"negative bags {result['noop_mass_negative']:.3f}")
    return result


if __name__ == "__main__":
    main()
