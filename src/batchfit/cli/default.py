"""``batchfit`` with no arguments: the seed lesson's answer key for the MNIST MLP."""

from __future__ import annotations


def run_default() -> None:
    from ..summary import summary

    print(summary("mlp", dataset="mnist", style="classic"))
