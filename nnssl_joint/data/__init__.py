"""Data for nnssl_joint: synthetic nnU-Net raw datasets (:mod:`.synthetic`), view augmentations
(:mod:`.augment`) and the pretraining data loaders over nnU-Net preprocessed data (:mod:`.loaders`)."""
