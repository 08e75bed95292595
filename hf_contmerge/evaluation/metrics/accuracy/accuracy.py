"""Accuracy: the fraction of predictions equal to their references, ``(1/N) * sum_i [p_i == r_i]``.

Shipped with hf-contmerge and loaded by path (``evaluate.load("accuracy")`` needs the network). It
computes what the Hub's ``evaluate-metric/accuracy`` computes without sample weights or
normalisation flags, in plain Python (that script needs scikit-learn).
"""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their references.",
            citation="",
            inputs_description="predictions, references: lists of class indices",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of no examples")
        return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}
