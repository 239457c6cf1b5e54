"""The experiment harness behind the command line and the benchmarks (not needed to quantize a model).

* :mod:`~cora.experiments.paths` -- finds the read-only shared folder (data and pretrained weights);
* :mod:`~cora.experiments.data` -- the CIFAR-10 arrays, ImageNet-style image folders, top-1 evaluation;
* :mod:`~cora.experiments.cifar_resnet` -- the CIFAR ResNet family (depth 6n+2, option-A shortcuts);
* :mod:`~cora.experiments.models` -- the model zoo by name (CIFAR ResNets, the CIFAR ShuffleNetV2 x0.5
  ``cifar_shufflenetv2_x0_5``, torchvision classifiers), each with its input spec (size, mean, std);
* :mod:`~cora.experiments.pipeline` -- load -> calibrate -> convert -> evaluate, as the CLI runs it (the
  CIFAR-10 arrays normalised with the model's own mean / std).

Submodules are imported on use (torchvision and numpy are only needed here).
"""
