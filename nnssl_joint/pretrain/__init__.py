"""Pretraining wiring: typed run configuration, self-configuration, the joint model, logging and
checkpoint helpers used by ``JointSSLPretrainTrainer`` (trainers/nnssl_joint_pretrain.py)."""
