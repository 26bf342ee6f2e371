"""nnU-Net trainer modules of nnssl_joint.

This folder is what ``nnUNet_extTrainer`` points at (``nnssl_joint trainer-path`` prints it). nnU-Net
imports every module in it while searching for a trainer class, so it holds trainer modules only; the
logic they wire together lives in the ``nnssl_joint`` package. Installed wheels ship this folder as the
``nnssl_joint.trainers`` package.
"""
