"""Reconstruction MSE (per pixel, pixels in [0, 1]) that a constant image reaches on each dataset: the
per-pixel mean of the training images, which is the best constant prediction under squared error.

    python results/replication/constant_image_mse.py      # N = 10,000 first training images, as the grids
"""

from __future__ import annotations

import argparse

from amortized_bayes.data import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    print("| dataset | split | constant image (train mean) MSE | all-zero image MSE |")
    print("|---|---|---|---|")
    for dataset in ("mnist", "fashion-mnist"):
        train = load_split(dataset, "train", n=args.n).images
        mean = train.mean(0, keepdim=True)
        for split, x in (("train", train), ("test", load_split(dataset, "test").images)):
            print(f"| {dataset} | {split} | {float(((x - mean) ** 2).mean()):.4f} | {float((x ** 2).mean()):.4f} |")


if __name__ == "__main__":
    main()
