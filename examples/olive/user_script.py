"""The Fashion example's calibration images as an Olive dataset (``fashion_calibration``)."""

import os

import numpy as np
from olive.data.registry import Registry

HERE = os.path.dirname(os.path.abspath(__file__))


@Registry.register_dataset()
def fashion_calibration(path=os.path.join(HERE, "..", "fashion_mnist", "calibration.npz")):
    """(inputs by name, label) pairs, one image each; Olive's default dataloader batches them."""
    images = np.load(path)["image"]
    return [({"image": image}, 0) for image in images]
