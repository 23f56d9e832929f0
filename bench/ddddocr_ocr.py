"""ddddocr's OCR model (`common.onnx`) as an accuracy benchmark: rendered text, CTC decoding.

    pip install ddddocr==1.6.1 --no-deps Pillow captcha==0.7.1    # model, renderer, font

Nothing of ddddocr is imported (it needs OpenCV): the model file and the charset are read from
the installed package's files. Images: black text (4-7 characters from digits and ASCII letters,
DroidSansMono from `captcha`) on a white ``WIDTH x 64`` canvas, grayscale, pixels / 255: the
model input ``[1, 1, 64, WIDTH]``. Accuracy: exact string match after greedy CTC decoding
(blank 0), compared case-insensitively (the charset folds many letters' cases).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import string

import numpy as np

WIDTH = 192
HEIGHT = 64
INPUT = "input1"
ALPHABET = string.digits + string.ascii_letters


def package_dir() -> str:
    spec = importlib.util.find_spec("ddddocr")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ddddocr is not installed: pip install ddddocr==1.6.1 --no-deps")
    return list(spec.submodule_search_locations)[0]


def model_path() -> str:
    return os.path.join(package_dir(), "common.onnx")


def charset() -> list[str]:
    """The beta charset (`CharsetManager().load_default_charset(False, True)`), read by AST."""
    source = open(os.path.join(package_dir(), "models", "charset_manager.py"),
                  encoding="utf-8").read()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_beta_charset":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return):
                    return ast.literal_eval(inner.value)
    raise SystemExit("charset not found in ddddocr's charset_manager.py")


def text_font(size: int):
    import captcha
    from PIL import ImageFont
    return ImageFont.truetype(os.path.join(os.path.dirname(captcha.__file__), "data",
                                           "DroidSansMono.ttf"), size)


def render(texts: list[str]) -> np.ndarray:
    """float32 ``[len(texts), 1, 64, WIDTH]`` in [0, 1]."""
    from PIL import Image, ImageDraw
    font = text_font(40)
    out = np.empty((len(texts), 1, HEIGHT, WIDTH), np.float32)
    for i, text in enumerate(texts):
        image = Image.new("L", (WIDTH, HEIGHT), 255)
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((WIDTH - (right - left)) / 2 - left, (HEIGHT - (bottom - top)) / 2 - top),
                  text, fill=0, font=font)
        out[i, 0] = np.asarray(image, np.float32) / 255.0
    return out


def random_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(4, 8))))
            for _ in range(count)]


def decode(logits: np.ndarray, chars: list[str]) -> str:
    """Greedy CTC: argmax per step, merge repeats, drop blank 0."""
    steps = logits.reshape(logits.shape[0], -1) if logits.ndim == 3 else logits
    best = steps.argmax(axis=-1)
    out, previous = [], -1
    for index in best:
        if index != previous and index != 0:
            out.append(chars[index])
        previous = index
    return "".join(out)


def accuracy(model, texts: list[str], images: np.ndarray) -> float:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    chars = charset()
    correct = 0
    for text, image in zip(texts, images):
        logits = session.run(None, {INPUT: image[None]})[0]
        correct += decode(logits, chars).lower() == text.lower()
    return correct / len(texts)


if __name__ == "__main__":
    texts = random_texts(200, seed=1)
    print(f"{model_path()}: {accuracy(model_path(), texts, render(texts)):.3f} exact")
