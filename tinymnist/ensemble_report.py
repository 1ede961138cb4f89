"""What N models print: one summary line per evaluation, the final line, eval's lines.

Results over seeds are reported as mean ± standard deviation (n-1) with the range, as
papers report MNIST accuracy; the ensemble is the prediction of the models' averaged
probabilities. The records come from ensemble_fit.evaluation_records.
"""

from __future__ import annotations

import sys

from tinymnist.report import test_line


def summary_line(ensemble: dict) -> str:
    """One evaluation of N models: 'Test set (8 models): accuracy 97.31% ± 0.12 (97.10-97.52%), ensemble ...'."""
    return (
        f"Test set ({ensemble['models']} models): accuracy {100 * ensemble['mean_accuracy']:.2f}% "
        f"± {100 * ensemble['std_accuracy']:.2f} ({100 * ensemble['min_accuracy']:.2f}-"
        f"{100 * ensemble['max_accuracy']:.2f}%), ensemble {100 * ensemble['test_accuracy']:.2f}% "
        f"({ensemble['correct']}/{ensemble['total']})"
    )


def final_line(ensemble: dict, epochs: int, device, train_seconds: float, first_step_seconds: float, compiled: bool,
               images_per_second: float) -> str:  # fmt: skip
    """run.train's last line for N models: the summary, the best (seed, lr), the speed summed over models."""
    return (
        f"Final test accuracy over {ensemble['models']} models: {100 * ensemble['mean_accuracy']:.2f}% "
        f"± {100 * ensemble['std_accuracy']:.2f} (min {100 * ensemble['min_accuracy']:.2f}%, "
        f"max {100 * ensemble['max_accuracy']:.2f}% with seed {ensemble['best_seed']}, lr {ensemble['best_lr']:g}); "
        f"ensemble {100 * ensemble['test_accuracy']:.2f}% ({ensemble['correct']}/{ensemble['total']}) "
        f"after {epochs} epoch{'' if epochs == 1 else 's'} on {device}; training {train_seconds:.1f} s "
        f"(+ {first_step_seconds:.1f} s {'compiling' if compiled else 'first step'}), "
        f"{images_per_second:,.0f} images/s over all models"
    )


def model_test_line(record: dict) -> str:
    """`tinymnist eval`'s line for one model of a checkpoint (or for the ensemble)."""
    who = "ensemble" if record.get("ensemble") else f"seed {record['seed']}, lr {record['initial_lr']:g}"
    return f"{who}: {test_line(record)}"


class EnsembleDisplay:
    """A train.Reporter that shows N models' evaluations as one summary line.

    Training events go to the single-run display (`inner`: log lines or a progress bar);
    per-model records are held back and the ensemble's record prints the summary."""

    def __init__(self, inner, out=None):
        self.inner, self.out = inner, out or sys.stdout

    def epoch_started(self, *args, **kwargs) -> None:
        self.inner.epoch_started(*args, **kwargs)

    def logged(self, *args) -> None:
        self.inner.logged(*args)

    def evaluated(self, record: dict) -> None:
        if record.get("ensemble"):
            self.inner.close()  # a progress bar stops before the line prints under it
            print(f"\n{summary_line(record)}\n", file=self.out, flush=True)

    def close(self) -> None:
        self.inner.close()
