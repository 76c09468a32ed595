"""``cifar10``: classification-loss discovery on CIFAR-10, the DiscoPOP paper's first case study.

Modules: :mod:`~fitness.cifar10.plugin` (the plug-in, :class:`Cifar10`),
:mod:`~fitness.cifar10.data` (reading the CIFAR-10 python batches and cutting the splits),
:mod:`~fitness.cifar10.recipes` (training recipes, presets, schedules and augmentation),
:mod:`~fitness.cifar10.networks` (ResNet-18, the airbench network and a small CNN, in plain
torch), :mod:`~fitness.cifar10.interface` (the ``loss(logits, targets)`` contract and the seed
losses) and :mod:`~fitness.cifar10.descriptors` (gradient-shape descriptors).
"""
from fitness.cifar10.data import (
    Cifar10Data, Cifar10DataError, Cifar10DataMalformed, Cifar10DataMissing, check_data_folder, find_data_folder,
    load_cifar10, read_batch,
)
from fitness.cifar10.descriptors import DESCRIPTOR_SPACE, classification_descriptors
from fitness.cifar10.interface import CLASSIFICATION_SEEDS, ClassificationInterface, classification_seeds
from fitness.cifar10.networks import ARCH_WIDTHS
from fitness.cifar10.plugin import Cifar10
from fitness.cifar10.recipes import PRESETS, RECIPE_FIELDS, Recipe

__all__ = [
    "ARCH_WIDTHS", "CLASSIFICATION_SEEDS", "Cifar10", "Cifar10Data", "Cifar10DataError", "Cifar10DataMalformed",
    "Cifar10DataMissing", "ClassificationInterface", "DESCRIPTOR_SPACE", "PRESETS", "RECIPE_FIELDS", "Recipe",
    "check_data_folder", "classification_descriptors", "classification_seeds", "find_data_folder", "load_cifar10",
    "read_batch",
]
