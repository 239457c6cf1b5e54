"""The experiment harness behind the command line and the benchmarks (not needed to quantize a model).

* :mod:`~cora.experiments.data` -- the CIFAR-10 arrays, ImageNet-style image folders, top-1 evaluation;
* :mod:`~cora.experiments.pipeline` -- load -> calibrate -> convert -> evaluate, as the CLI runs it (the
  CIFAR-10 arrays normalised with the model's own mean / std).

The model registry, the CIFAR ResNets and the shared-folder lookup are core (:mod:`cora.zoo`); the
old names ``cora.experiments.models`` / ``.cifar_resnet`` / ``.paths`` are those same modules.

Submodules are imported on use (torchvision and numpy are only needed here).
"""
