"""Training-time data of nnssl_joint: view augmentations (:mod:`.augment`) and the pretraining data
loaders over nnU-Net preprocessed data (:mod:`.loaders`). Writers of raw datasets live in
:mod:`nnssl_joint.datasets`."""
