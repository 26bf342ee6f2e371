"""Experiments built on the plugin: training budgets, the resumable pipeline of nnU-Net steps, the demo,
the label-efficiency benchmark, evaluation and reports."""
