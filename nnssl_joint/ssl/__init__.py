"""Self-supervised objectives of the joint 2D/3D pretraining (plain torch, no nnU-Net import).

SwAV / DeepCluster-v2 clustering losses (Caron et al. 2020) and the combined intra/inter/mask
objective of Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with
Intra-Inter Contrastive Clustering" (AAAI 2023).
"""

from nnssl_joint.ssl.deepcluster import DeepClusterV2Loss, GlobalIndex, MemoryBank, spherical_kmeans
from nnssl_joint.ssl.objective import (
    LOSS_TERMS,
    TERM_INTER,
    TERM_INTRA,
    TERM_INTRA_3D,
    TERM_MASK,
    ObjectiveConfig,
    StagePlan,
    combine_losses,
)
from nnssl_joint.ssl.prototypes import Prototypes, cancel_prototype_gradients
from nnssl_joint.ssl.queue import FeatureQueue
from nnssl_joint.ssl.sinkhorn import sinkhorn
from nnssl_joint.ssl.swav import SwAVLoss, prototype_usage_entropy, swapped_prediction_loss

__all__ = [
    "LOSS_TERMS",
    "TERM_INTER",
    "TERM_INTRA",
    "TERM_INTRA_3D",
    "TERM_MASK",
    "DeepClusterV2Loss",
    "FeatureQueue",
    "GlobalIndex",
    "MemoryBank",
    "ObjectiveConfig",
    "Prototypes",
    "StagePlan",
    "SwAVLoss",
    "cancel_prototype_gradients",
    "combine_losses",
    "prototype_usage_entropy",
    "sinkhorn",
    "spherical_kmeans",
    "swapped_prediction_loss",
]
