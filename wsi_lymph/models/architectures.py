"""The one registry of networks: adding a network is one entry in :data:`ARCHITECTURES`.

A checkpoint names its network in ``meta["arch"]`` (:attr:`Architecture.arch_id`);
training and ``--arch`` name it by :attr:`Architecture.option`.  Loading
(:func:`wsi_lymph.models.checkpoints.load_checkpoint`), training
(:func:`wsi_lymph.training.train.train_model`), Caffe import and inference
(:func:`wsi_lymph.detection.inference.window_probabilities`) all look the network
up here, so none of them switches on a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from wsi_lymph.models.networks import DensePatchNet, PatchNet, SubpixelStudentNet

#: ``meta["arch"]`` of the paper's patch network (checkpoints imported from Caffe or trained with ``--arch paper``).
PAPER_ARCH = "janowczyk2016-patch32"
#: ``meta["arch"]`` of the dense-exact network (``--arch dense``).
DENSE_ARCH = "wsi-lymph-dense32"
#: ``meta["arch"]`` of the fast student network distilled from the paper's ensemble (``wsi-lymph distill``).
STUDENT_ARCH = "wsi-lymph-student-subpixel4"

#: How a network's map is computed (:func:`wsi_lymph.detection.inference.window_probabilities`):
#: the 32x32 patch of every ``stride``-th model-frame pixel is classified and the rest interpolated ...
PATCHES = "patches"
#: ... the patch of every model-frame pixel, fully convolutionally (exactly equal to patch by patch) ...
EVERY_PIXEL = "every-pixel"
#: ... or from 0.5 µm/px input pixels, each emitting the 4 x 4 model-frame pixels inside it (pixel shuffle).
SUBPIXEL = "subpixel"


@dataclass(frozen=True)
class Architecture:
    """How to build, train, import and evaluate one network.

    Attributes
    ----------
    arch_id : str
        Name stored in checkpoints (``meta["arch"]``).
    option : str
        Name on the command line (``--arch``) and in training settings.
    network : type of torch.nn.Module
        The network class; constructed with keyword arguments from :meth:`build`.
    evaluation : str
        How a map is computed: :data:`PATCHES` (the stride applies), :data:`EVERY_PIXEL`
        or :data:`SUBPIXEL` (both fully convolutional: the stride does not apply).
    per_channel_mean : bool
        Whether the mean subtracted from inputs must be constant per channel
        (a mean image that varies over the patch cannot be used fully convolutionally).
    takes_input_std : bool
        Whether the network divides inputs by a per-channel standard deviation it
        stores (``input_std``), measured on the training patches.
    caffe_layers : tuple of str
        Caffe layer names that map onto equally named modules (blob 0 = weight,
        blob 1 = bias); empty if the network cannot be imported from Caffe.
    """

    arch_id: str
    option: str
    network: type[nn.Module]
    evaluation: str = PATCHES
    per_channel_mean: bool = False
    takes_input_std: bool = False
    caffe_layers: tuple[str, ...] = ()

    def build(self, input_std: Sequence[float] | None = None, **shape: Any) -> nn.Module:
        """An untrained network (``input_std``: (3,) B, G, R on the 0-255 scale, for networks that take it;
        ``shape``: keyword arguments of the network's shape, e.g. a student's ``width`` and ``dilations``)."""
        if self.takes_input_std:
            std = tuple(float(s) for s in (input_std if input_std is not None else (1.0, 1.0, 1.0)))
            return self.network(std, **shape)
        return self.network(**shape)


ARCHITECTURES: dict[str, Architecture] = {
    a.arch_id: a
    for a in (
        Architecture(PAPER_ARCH, "paper", PatchNet, caffe_layers=("conv1", "conv2", "conv3", "ip1", "ip2")),
        Architecture(DENSE_ARCH, "dense", DensePatchNet, evaluation=EVERY_PIXEL, per_channel_mean=True,
                     takes_input_std=True),
        Architecture(STUDENT_ARCH, "student", SubpixelStudentNet, evaluation=SUBPIXEL, per_channel_mean=True,
                     takes_input_std=True),
    )
}
#: ``--arch`` names of the networks trained on patches (train, cv), in registry order; the student is distilled.
ARCH_OPTIONS = tuple(a.option for a in ARCHITECTURES.values() if a.evaluation != SUBPIXEL)


def architecture(name: str) -> Architecture:
    """The registry entry of a checkpoint ``arch_id`` or an ``--arch`` option name.

    Raises
    ------
    KeyError
        ``name`` is neither; the message lists what is known.
    """
    for entry in ARCHITECTURES.values():
        if name in (entry.arch_id, entry.option):
            return entry
    known = ", ".join(f"{a.option!r} ({a.arch_id})" for a in ARCHITECTURES.values())
    raise KeyError(f"unknown network architecture {name!r}; known: {known}")


def architecture_of(net: nn.Module) -> Architecture:
    """The registry entry of a network instance."""
    for entry in ARCHITECTURES.values():
        if type(net) is entry.network:
            return entry
    raise KeyError(f"{type(net).__name__} is not a registered network architecture")
