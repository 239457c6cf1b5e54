"""The model zoo of cora's product side: which models a name means and how their inputs are made.

* :mod:`~cora.zoo.registry` -- names -> builders (the CIFAR ResNets and ShuffleNetV2 x0.5 with their
  pretrained weights from the shared folder, torchvision's classifiers), input specs, the
  preprocessing record a checkpoint carries, the one state-dict reader;
* :mod:`~cora.zoo.cifar_resnet` -- the CIFAR ResNet family (depth 6n+2, option-A shortcuts);
* :mod:`~cora.zoo.paths` -- finds the read-only shared folder (data and pretrained weights).

``cora.checkpoint``, ``cora.deploy``, ``cora.inference`` and the command line import these; the
experiment harness (:mod:`cora.experiments`) builds on them, never the other way round.
"""
from .registry import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    cifar_shufflenetv2_x0_5,
    load_cifar_resnet,
    load_float_model,
    model_input_spec,
    preprocessing_for,
    read_state_dict,
    torchvision_model_names,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_model",
    "cifar_shufflenetv2_x0_5",
    "load_cifar_resnet",
    "load_float_model",
    "model_input_spec",
    "preprocessing_for",
    "read_state_dict",
    "torchvision_model_names",
]
