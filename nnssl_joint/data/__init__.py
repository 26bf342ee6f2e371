"""Data for nnssl_joint: synthetic nnU-Net raw datasets (:mod:`nnssl_joint.data.synthetic`)."""
