"""Experiments of neural-inhibition MoE on real data: ``python -m inhibmoe_fast.reproduce``.

``mixed-numbers`` trains the network of :mod:`inhibmoe_fast.mixed_numbers`
in five configurations over several seeds and prints the test accuracy as
mean and standard deviation beside the figures that Zou and Zhang report
("Neural Inhibition Improves Dynamic Routing and Mixture of Experts",
arXiv:2507.03221). It then checks the mechanism on trained models:

- each hidden unit's mean inhibition against the absolute correlation of its
  activation with the data kind (digit or squares), as a scatter plot with
  Spearman's rank correlation, for local and global inhibition;
- the entropy of the experts' utilisation per data kind, with and without the
  load-balancing loss.

``language`` trains a small transformer whose feed-forward layers are
inhibited MoE layers on the help topics that ship with CPython, plain routing
against global inhibition, and prints the held-out next-word negative
log-likelihood and perplexity.

Tables are printed; CSV files and PNG plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List

from . import language, mixed_numbers


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, file=sys.stderr)


def _write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _scatter(path: str, analyses: Dict[str, Dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(analyses), figsize=(5 * len(analyses), 4.2), squeeze=False)
    for axis, (configuration, analysis) in zip(axes[0], analyses.items()):
        axis.scatter(analysis["kind_correlation"], analysis["inhibition"], s=18)
        axis.set_xlabel("|Pearson r| of activation with data kind")
        axis.set_ylabel("mean inhibition (1 - gate)")
        axis.set_title(f"{configuration}: Spearman {analysis['spearman']:+.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_mixed_numbers(args) -> int:
    from .bench import print_table

    os.makedirs(args.out, exist_ok=True)
    cases = [(c, seed) for c in args.configurations for seed in range(args.seeds)]
    results = [mixed_numbers.train_run(c, seed, epochs=args.epochs) for c, seed in _progress(cases, "train", args.progress)]
    summary = mixed_numbers.summarize(results)
    for row in summary:
        row["accuracy"] = f"{row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f}"
    print_table(f"Mixed numbers: test accuracy (%) over {args.seeds} seeds, {args.epochs} epochs",
                summary, ["configuration", "seeds", "accuracy", "paper_accuracy"])
    _write_csv(os.path.join(args.out, "mixed_numbers_accuracy.csv"), summary)
    _write_csv(os.path.join(args.out, "mixed_numbers_runs.csv"),
               [{"configuration": r.configuration, "seed": r.seed, "accuracy": r.accuracy, "seconds": r.seconds}
                for r in results])

    analyses = {}
    for configuration in ("local", "global"):
        result = next((r for r in results if r.configuration == configuration and r.seed == 0), None)
        if result is None:
            continue
        analysis = mixed_numbers.inhibition_analysis(result)
        analysis["spearman"] = mixed_numbers.spearman(analysis["inhibition"], analysis["kind_correlation"])
        analyses[configuration] = analysis
    if analyses:
        print_table("Inhibition against data-kind correlation (seed 0)",
                    [{"configuration": c, "spearman": a["spearman"]} for c, a in analyses.items()],
                    ["configuration", "spearman"])
        _scatter(os.path.join(args.out, "mixed_numbers_inhibition.png"), analyses)

    entropy_rows = []
    for coefficient in (0.0, args.load_balance_coef):
        result = mixed_numbers.train_run("local", 0, epochs=args.epochs, load_balance_coef=coefficient)
        entropy = mixed_numbers.routing_entropy(result)
        entropy_rows.append({"load_balance_coef": coefficient, "digits_bits": entropy["digits"],
                             "squares_bits": entropy["squares"], "accuracy": result.accuracy})
    print_table("Expert utilisation entropy per data kind, local inhibition (bits, 2 = uniform over 4 experts)",
                entropy_rows, ["load_balance_coef", "digits_bits", "squares_bits", "accuracy"])
    _write_csv(os.path.join(args.out, "mixed_numbers_entropy.csv"), entropy_rows)
    print(f"\nWrote CSV files and plots to {os.path.abspath(args.out)}")
    return 0


def _plot_curves(path: str, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    colors = {"none": "tab:blue", "global": "tab:orange"}
    for result in results:
        steps, losses = zip(*result.curve)
        axis.plot(steps, losses, color=colors.get(result.inhibition), alpha=0.8,
                  label=f"{result.inhibition}, seed {result.seed}: held-out NLL {result.nll:.3f}")
    axis.set_xlabel("training step")
    axis.set_ylabel("training loss (nats per token)")
    axis.set_title("next-word prediction on CPython help topics")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_language(args) -> int:
    from .bench import print_table

    os.makedirs(args.out, exist_ok=True)
    cases = [(inhibition, seed) for inhibition in ("none", "global") for seed in range(args.seeds)]
    results = [language.train_language_model(inhibition, seed, steps=args.steps)
               for inhibition, seed in _progress(cases, "train", args.progress)]
    rows = language.summarize(results)
    print_table(f"Language: held-out next-word loss, {args.steps} steps, {args.seeds} seed(s)", rows,
                ["inhibition", "seeds", "heldout_nll", "perplexity", "nll_by_seed", "seconds_per_run"])
    _write_csv(os.path.join(args.out, "language.csv"), rows)
    _plot_curves(os.path.join(args.out, "language_training.png"), results)
    print(f"\nWrote the CSV file and the plot to {os.path.abspath(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inhibmoe_fast.reproduce", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mixed = commands.add_parser("mixed-numbers", help="digits mixed with images of squares (vision task)")
    mixed.add_argument("--seeds", type=int, default=5, help="seeds per configuration; default 5")
    mixed.add_argument("--epochs", type=int, default=30, help="training epochs per run; default 30")
    mixed.add_argument("--configurations", type=lambda s: s.split(","), default=list(mixed_numbers.CONFIGURATIONS),
                       help=f"comma-separated subset of {','.join(mixed_numbers.CONFIGURATIONS)}; default all")
    mixed.add_argument("--load-balance-coef", type=float, default=0.01,
                       help="load-balancing loss weight of the entropy comparison; default 0.01")
    mixed.add_argument("--out", default="results/reproduce", help="folder for CSV files and plots")
    mixed.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    mixed.set_defaults(run=run_mixed_numbers)

    text = commands.add_parser("language", help="next-word prediction on CPython's help topics")
    text.add_argument("--steps", type=int, default=1200, help="training steps per run; default 1200")
    text.add_argument("--seeds", type=int, default=2, help="seeds per configuration; default 2")
    text.add_argument("--out", default="results/reproduce", help="folder for the CSV file and the plot")
    text.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    text.set_defaults(run=run_language)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [c for c in getattr(args, "configurations", []) if c not in mixed_numbers.CONFIGURATIONS]
    if unknown:
        raise SystemExit(f"--configurations: unknown {', '.join(unknown)}; expected {', '.join(mixed_numbers.CONFIGURATIONS)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
