"""The memory estimate of nnU-Net's planners, without a dependency on the augmentation worker count.

nnU-Net's ``ExperimentPlanner.static_estimate_VRAM_usage`` instantiates the candidate network with
``torch.set_num_threads(get_allowed_n_proc_DA())`` around it. With ``nnUNet_n_proc_DA=0`` (augmentation
in the training process, the setting for repeatable runs) that is ``set_num_threads(0)``, which torch
refuses, so planning crashed. Counting feature-map sizes needs no thread setting at all: the plugin's
planners compute the same estimate with the threads left as they are.
"""

from __future__ import annotations

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


class ThreadIndependentEstimateMixin:
    """Put before nnU-Net's ``ExperimentPlanner`` in a planner's bases."""

    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import) -> int:
        net = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                     output_channels, allow_init=False)
        return net.compute_conv_feature_map_size(patch_size)
