"""Fashion-MNIST loading and ONNX evaluation with numpy only (no torch).

The data come from Debian's ``dataset-fashion-mnist`` package (``apt-get install -y
dataset-fashion-mnist``), which installs the original IDX files, gzipped, under
``/usr/share/datasets/fashion-mnist/``. Set ``FASHION_MNIST_DIR`` to read them from elsewhere.

Preprocessing (`preprocess`) is the only one the bundled model expects: uint8 pixels divided by
255 to float32 in [0, 1], shape [N, 1, 28, 28]. There is no mean/std normalization, neither here
nor inside the model (the first convolution's BatchNorm, folded into it, takes that role).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "fashion_cnn.onnx"
DEFAULT_CALIBRATION = HERE / "calibration.npz"

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# IDX magic: two zero bytes, the element type (0x08 = uint8), then the number of dimensions.
_IDX_UBYTE = 0x08


def data_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def _find(directory: Path, prefix: str, kind: str) -> Path:
    """The IDX file for ``prefix`` ('train' / 't10k') and ``kind`` ('images' / 'labels').

    Accepts the usual spellings: ``train-images-idx3-ubyte``, ``train-images.idx3-ubyte``,
    with or without ``.gz``.
    """
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist: install Debian's dataset-fashion-mnist package "
            "or set FASHION_MNIST_DIR")
    candidates = sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.name.startswith(f"{prefix}-{kind}") and "idx" in p.name
    )
    if not candidates:
        raise FileNotFoundError(f"no {prefix}-{kind}*idx* file in {directory}")
    # Prefer an uncompressed file when both exist (faster), else the .gz one.
    candidates.sort(key=lambda p: p.suffix == ".gz")
    return candidates[0]


def read_idx(path: Path) -> np.ndarray:
    """Read one uint8 IDX file (gzipped or not) into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE:
        raise ValueError(f"{path}: not a uint8 IDX file (header {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for shape {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: str, directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` ('train': 60k, 'test': 10k)."""
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    directory = Path(directory) if directory is not None else data_dir()
    images = read_idx(_find(directory, prefixes[split], "images"))
    labels = read_idx(_find(directory, prefixes[split], "labels")).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"unexpected shapes: images {images.shape}, labels {labels.shape}")
    return images, labels


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1]: the bundled model's input."""
    return (np.asarray(images, dtype=np.float32) / 255.0)[:, None, :, :]


def calibration_images(path: str | Path = DEFAULT_CALIBRATION) -> np.ndarray:
    """The 64 preprocessed training images shipped beside the model (float32 [64, 1, 28, 28])."""
    with np.load(path) as data:
        return data["image"]


def evaluate_onnx(model_path: str | Path = DEFAULT_MODEL, limit: int | None = None,
                  batch_size: int = 500, threads: int = 1,
                  directory: str | Path | None = None) -> float:
    """Top-1 accuracy (0..1) of an ONNX classifier on the first ``limit`` test images.

    The model takes one float32 input [N, 1, 28, 28] (preprocessed as `preprocess`) and returns
    logits [N, 10] as its first output. Works for the bundled model and its rewritten versions;
    a model with a fixed batch size is fed in batches of that size (the tail padded).
    """
    import onnxruntime as ort

    images, labels = load_fashion_mnist("test", directory)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = preprocess(images)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    step = fixed_batch or batch_size

    correct = 0
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        n = len(chunk)
        if fixed_batch and n < fixed_batch:
            chunk = np.concatenate([chunk, np.zeros((fixed_batch - n, *chunk.shape[1:]), np.float32)])
        logits = session.run(None, {model_input.name: chunk})[0][:n]
        correct += int((logits.argmax(axis=1) == labels[start:start + n]).sum())
    return correct / len(x)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Test accuracy of an ONNX Fashion-MNIST classifier.")
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    args = parser.parse_args()
    print(f"{evaluate_onnx(args.model, args.limit):.4f}")
