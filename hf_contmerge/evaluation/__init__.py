"""Evaluation across the stream: task definitions, scoring, the accuracy matrix and its summaries
(ACC, BWT, normalised accuracy), the files a step carries (FusionBench-style reports, plots), and the
step hook that runs it all before a step is published."""
