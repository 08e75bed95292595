"""Exact match: the fraction of predicted strings equal to their references after stripping
surrounding whitespace, ``(1/N) * sum_i [strip(p_i) == strip(r_i)]``.

Shipped with hf-contmerge and loaded by path (``evaluate.load("exact_match")`` needs the network).
Unlike the Hub's script it has no regex or case options: a task that wants them normalises its
references itself.
"""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their references after stripping whitespace.",
            citation="",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("exact match of no examples")
        return {"exact_match": sum(int(p.strip() == r.strip()) for p, r in zip(predictions, references)) / len(references)}
