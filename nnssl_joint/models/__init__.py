"""Plain-torch model pieces: deformable slice attention, slice Transformer (f_inter), slice embedding
and projection heads, masked slice-embedding prediction. No nnU-Net import here."""

from nnssl_joint.models.deformable_attention import (
    ContinuousPositionBias,
    DeformableSliceAttention,
    signed_log_distance,
)
from nnssl_joint.models.masked_prediction import MaskedSliceModeling, masked_embedding_loss, sample_slice_mask
from nnssl_joint.models.slice_embedding import ProjectionHead, SliceEmbeddingHead, encoder_stage_channels
from nnssl_joint.models.slice_transformer import SliceTransformer, SliceTransformerLayer

__all__ = [
    "ContinuousPositionBias",
    "DeformableSliceAttention",
    "MaskedSliceModeling",
    "ProjectionHead",
    "SliceEmbeddingHead",
    "SliceTransformer",
    "SliceTransformerLayer",
    "encoder_stage_channels",
    "masked_embedding_loss",
    "sample_slice_mask",
    "signed_log_distance",
]
