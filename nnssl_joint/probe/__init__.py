"""Frozen-encoder read-outs of pretrained weights: a dense linear probe and kNN label transfer on a
labeled nnU-Net dataset, label-free diagnostics, and a random-initialisation baseline
(``nnssl_joint probe``, docs/probe.md)."""
