"""Goldens for the Qwen2-VL image processor (tests/goldens/images.json), made with
transformers' Qwen2VLImageProcessor (its torchvision backend, the default) on the images
in tests/fixtures/images/, as transformers loads them (PIL). Also writes the synthetic
images it tests (tiny, very wide, odd sizes, grey with alpha, a GIF, a WebP) into that
folder. Run by scripts/gen-goldens."""

import hashlib
import json
import pathlib

import numpy as np
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
SAMPLES = 500


def synthetic():
    """Small generated images for the edge cases (deterministic)."""
    ys, xs = np.mgrid[0:7, 0:5]
    tiny = np.stack([(xs * 50) % 256, (ys * 36) % 256, ((xs + ys) * 23) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(tiny).save(IMAGES / "synthetic-tiny-5x7.png")
    ys, xs = np.mgrid[0:24, 0:1900]
    wide = np.stack([(xs * 7) % 256, (ys * 11) % 256, (xs // 13 + ys * 5) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(wide).save(IMAGES / "synthetic-wide-1900x24.png")
    ys, xs = np.mgrid[0:333, 0:97]
    la = np.stack([(xs * 3 + ys) % 256, (ys * 2) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(la, mode="LA").save(IMAGES / "synthetic-grey-alpha-97x333.png")
    ys, xs = np.mgrid[0:61, 0:83]
    rgb = np.stack([(xs * 3) % 256, (ys * 4) % 256, ((xs * ys) // 7) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(IMAGES / "synthetic-83x61.gif")
    Image.fromarray(rgb).save(IMAGES / "synthetic-83x61.webp", lossless=True)


def main():
    synthetic()
    processor = Qwen2VLImageProcessor()
    out = {"processor": "transformers Qwen2VLImageProcessor (torchvision backend), default settings", "images": {}}
    for path in sorted(IMAGES.iterdir()):
        image = Image.open(path)
        image.load()
        rgb = np.asarray(convert_to_rgb(image))
        result = processor(images=[image], return_tensors="np")
        values = result["pixel_values"].astype(np.float32)
        grid = result["image_grid_thw"][0].tolist()
        flat = values.reshape(-1)
        stride = max(1, flat.size // SAMPLES)
        decoded = rgb.reshape(-1)
        decoded_stride = max(1, decoded.size // SAMPLES)
        out["images"][path.name] = {
            "mode": image.mode,
            "size": [image.width, image.height],
            "decoded_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
            "decoded_stride": decoded_stride,
            "decoded_samples": decoded[::decoded_stride].tolist(),
            "grid": grid,
            "shape": list(values.shape),
            "stride": stride,
            "samples": [round(float(v), 6) for v in flat[::stride]],
            "sum": float(flat.astype(np.float64).sum()),
            "abs_sum": float(np.abs(flat.astype(np.float64)).sum()),
        }
        print(path.name, image.mode, image.size, grid, values.shape)
    (ROOT / "tests" / "goldens" / "images.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
