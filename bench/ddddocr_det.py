"""ddddocr's character detector (`common_det.onnx`, a YOLOX-style model) as an accuracy benchmark.

    pip install ddddocr==1.6.1 --no-deps Pillow captcha==0.7.1    # model, renderer, font

Nothing of ddddocr is imported (it needs OpenCV): the model file is read from the installed
package. Images: 416 x 416 click-captcha-like scenes, a smooth random background with 3-6
characters (digits and ASCII letters, DroidSansMono from `captcha`, 28-64 px, random colour
and rotation), fed as ddddocr feeds them (BGR, 0-255 floats, ``[1, 3, 416, 416]``).

Metric: **box F1 at IoU 0.5 against the original model's boxes** on the same images (agreement,
not accuracy: a rewritten model should find what the original finds). Decoding follows the
YOLOX head the model exports: grid offsets and strides 8/16/32, score = objectness x class,
threshold 0.1, class-agnostic NMS at IoU 0.45, as ddddocr's own detection does.
"""

from __future__ import annotations

import os
import string

import numpy as np

import ddddocr_ocr  # bench/: the package lookup and the font

SIZE = 416
INPUT = "images"
ALPHABET = string.digits + string.ascii_letters


def model_path() -> str:
    return os.path.join(ddddocr_ocr.package_dir(), "common_det.onnx")


def render(count: int, seed: int) -> np.ndarray:
    """``count`` scenes ``[count, 3, 416, 416]`` float32 (BGR, 0-255)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, SIZE, SIZE), np.float32)
    for index in range(count):
        low = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        background = Image.fromarray(low).resize((SIZE, SIZE), Image.BICUBIC)
        image = background.filter(ImageFilter.GaussianBlur(8))
        for _ in range(int(rng.integers(3, 7))):
            size = int(rng.integers(28, 65))
            glyph = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
            draw = ImageDraw.Draw(glyph)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,)
            draw.text((size // 2, size // 3), ALPHABET[rng.integers(len(ALPHABET))],
                      font=ddddocr_ocr.text_font(size), fill=colour)
            glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BICUBIC)
            x, y = (int(v) for v in rng.integers(0, SIZE - 2 * size, 2))
            image.paste(glyph, (x, y), glyph)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        out[index] = rgb[:, :, ::-1].transpose(2, 0, 1)  # BGR, CHW
    return out


def decode(prediction: np.ndarray, score_threshold: float = 0.1,
           nms_threshold: float = 0.45) -> np.ndarray:
    """One image's raw head output ``[anchors, 5 + classes]`` -> boxes ``[k, 4]`` (x1 y1 x2 y2)."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = SIZE // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centre = (prediction[:, :2] + grid) * stride
    extent = np.exp(prediction[:, 2:4]) * stride
    scores = (prediction[:, 4:5] * prediction[:, 5:]).max(axis=1)
    keep = scores > score_threshold
    boxes = np.concatenate([centre - extent / 2, centre + extent / 2], axis=1)[keep]
    scores = scores[keep]
    chosen = []
    order = np.argsort(-scores)
    while order.size:
        best = order[0]
        chosen.append(best)
        order = order[1:][iou(boxes[best][None], boxes[order[1:]])[0] <= nms_threshold]
    return boxes[chosen]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of x1 y1 x2 y2 boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area = lambda boxes: np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def f1(found: list[np.ndarray], reference: list[np.ndarray], threshold: float = 0.5) -> float:
    """Box F1 over all images: greedy one-to-one matching at IoU >= ``threshold``."""
    matched = total_found = total_reference = 0
    for mine, theirs in zip(found, reference):
        total_found += len(mine)
        total_reference += len(theirs)
        if not len(mine) or not len(theirs):
            continue
        overlap = iou(mine, theirs)
        while True:
            i, j = np.unravel_index(np.argmax(overlap), overlap.shape)
            if overlap[i, j] < threshold:
                break
            matched += 1
            overlap[i, :] = -1
            overlap[:, j] = -1
    if total_found + total_reference == 0:
        return 1.0
    return 2 * matched / (total_found + total_reference)


def boxes_of(path_or_model, images: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [decode(session.run(None, {INPUT: image[None]})[0][0]) for image in images]
