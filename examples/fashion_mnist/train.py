"""Train the bundled example model: a small VGG-style CNN on Fashion-MNIST, exported to ONNX.

    pip install torch==2.13.0          # CPU build; onnx and onnxruntime come with the project
    apt-get install -y dataset-fashion-mnist
    python examples/fashion_mnist/train.py            # writes fashion_cnn.onnx/.json, calibration.npz

The network is six standard 3x3 convolutions (groups=1, each followed by BatchNorm and ReLU) in
three stages of 32, 64 and 128 channels with 2x2 max pooling between stages, one 1x1
convolution (which the dwsep rewrite leaves alone: nothing to separate), global average pooling
and a linear classifier. Input: float32 [N, 1, 28, 28], uint8 pixels / 255, no other
normalization (see data.preprocess). Output: logits [N, 10].

Everything is seeded; on one CPU thread the run is reproducible to the bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CLASSES, evaluate_onnx, load_fashion_mnist, preprocess  # noqa: E402

HERE = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 refuses IR versions newer than 10
CALIBRATION_SIZE = 64


# --------------------------------------------------------------------------------------- model

def conv_bn_relu(name: str, cin: int, cout: int, kernel: int = 3) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{name}", nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)),
        (f"bn{name}", nn.BatchNorm2d(cout)),
        (f"relu{name}", nn.ReLU(inplace=True)),
    ]


class FashionCNN(nn.Module):
    """VGG-style: [3x3 conv-BN-ReLU] x2 per stage, 32/64/128 channels, 28 -> 14 -> 7 pixels."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10):
        super().__init__()
        a, b, c = widths
        layers = (
            conv_bn_relu("1_1", 1, a) + conv_bn_relu("1_2", a, a) + [("pool1", nn.MaxPool2d(2))]
            + conv_bn_relu("2_1", a, b) + conv_bn_relu("2_2", b, b) + [("pool2", nn.MaxPool2d(2))]
            + conv_bn_relu("3_1", b, c) + conv_bn_relu("3_2", c, c)
            + conv_bn_relu("4_1x1", c, c, kernel=1)
        )
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(image)), 1))


# ------------------------------------------------------------------------------------ training

def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 2) -> np.ndarray:
    """Random crop (zero padding ``pad``) and random horizontal flip of a uint8 batch [B, 28, 28]."""
    b, h, w = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    flip = rng.random(b) < 0.5
    out = np.empty_like(images)
    for i in range(b):
        crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(preprocess(images)).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_tensor(images[start:start + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int,
          lr: float, weight_decay: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(images) // batch_size  # drop the ragged last batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25)
    targets = torch.from_numpy(labels)
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(images))
        start_time, loss_sum, correct = time.time(), 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = to_tensor(augment(images[idx], rng))
            y = targets[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == y).sum())
        seen = steps_per_epoch * batch_size
        print(f"epoch {epoch}/{epochs}: loss {loss_sum / steps_per_epoch:.4f}, "
              f"train acc {correct / seen:.4f}, {time.time() - start_time:.0f} s", flush=True)


# -------------------------------------------------------------------------------------- export

def export_onnx(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Legacy (TorchScript) exporter: BatchNorm folded into the convs, plain Conv/Relu/MaxPool."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(path),
        dynamo=False, opset_version=OPSET, do_constant_folding=True,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    proto.producer_name = "dwsep-compiler examples/fashion_mnist/train.py"
    proto.doc_string = ("VGG-style CNN for Fashion-MNIST. Input 'image': float32 [batch, 1, 28, 28], "
                        "uint8 pixels / 255 (no mean/std normalization). Output 'logits': [batch, 10].")
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    initializers = {t.name for t in proto.graph.initializer}
    assert not initializers & {i.name for i in proto.graph.input}, "initializer listed as graph input"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def write_calibration(train_images: np.ndarray, seed: int, path: Path) -> None:
    """64 training images drawn with ``seed``, preprocessed exactly as the model expects.

    The only key is the model's input name, ``image``: dwsep-compile --calibration rejects
    arrays that are not model inputs.
    """
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(train_images), CALIBRATION_SIZE, replace=False))
    np.savez_compressed(path, image=preprocess(train_images[pick]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "fashion_cnn.onnx",
                        help="ONNX file to write; the .json report and calibration.npz go beside it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke test)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]

    model = FashionCNN().to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), seed {args.seed}, "
          f"{params} parameters, {len(train_x)} training images", flush=True)

    start = time.time()
    train(model, train_x, train_y, args.epochs, args.batch_size, args.lr, args.weight_decay, args.seed)
    train_seconds = time.time() - start
    torch_acc = evaluate(model, test_x, test_y)
    print(f"test accuracy (torch): {torch_acc:.4f}, training {train_seconds:.0f} s", flush=True)

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, {
        "preprocessing": "float32 = uint8 pixel / 255, shape [N, 1, 28, 28]; no mean/std normalization",
        "classes": ",".join(CLASSES),
        "test_accuracy": f"{torch_acc:.4f}",
        "seed": str(args.seed),
    })
    onnx_acc = evaluate_onnx(out, threads=args.threads)
    print(f"test accuracy (onnxruntime): {onnx_acc:.4f}, {out.stat().st_size} bytes", flush=True)
    if abs(onnx_acc - torch_acc) > 0.001:
        raise SystemExit(f"ONNX accuracy {onnx_acc:.4f} differs from torch {torch_acc:.4f}")

    write_calibration(train_x, args.seed, out.parent / "calibration.npz")

    report = {
        "model": out.name,
        "architecture": "VGG-style: 6x conv3x3-BN-ReLU (32,32 | 64,64 | 128,128), 2x maxpool, "
                        "conv1x1-BN-ReLU 128, global avg pool, linear 10",
        "parameters": params,
        "input": {"name": "image", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                  "preprocessing": "uint8 pixel / 255 in [0, 1]; no mean/std normalization"},
        "output": {"name": "logits", "shape": ["batch", 10], "classes": list(CLASSES)},
        "test_accuracy_torch": round(torch_acc, 4),
        "test_accuracy_onnxruntime": round(onnx_acc, 4),
        "test_images": len(test_x),
        "train_images": len(train_x),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW, one-cycle lr peak {args.lr}, weight decay {args.weight_decay}",
        "augmentation": "random crop (zero pad 2), random horizontal flip",
        "train_seconds": round(train_seconds, 1),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "onnx_opset": OPSET,
        "onnx_ir_version": IR_VERSION,
        "onnx_bytes": out.stat().st_size,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
