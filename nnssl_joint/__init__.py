"""nnssl_joint: joint 2D/3D self-supervised pretraining for nnU-Net v2."""

__version__ = "0.1.0"
