"""Goldens for the Qwen2.5-VL vision tower (tests/goldens/models/tiny-qwen2.5-vl-vision.json):
transformers' Qwen2_5_VLForConditionalGeneration (float32) on the seeded random checkpoint
inferd-test/tiny-qwen2.5-vl, its `visual` module run on two images at once (a photo and a
small generated image, so windows are padded and there are two attention segments),
preprocessed by transformers' Qwen2VLImageProcessor with a small pixel budget. Run by
scripts/gen-goldens (after scripts/fetch-test-models)."""

import json
import pathlib

import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMAGES = ["chelsea.png", "synthetic-83x61.webp"]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 64 * 28 * 28


def main():
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained("inferd-test/tiny-qwen2.5-vl", dtype=torch.float32)
    model.eval()
    processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    images = [Image.open(ROOT / "tests" / "fixtures" / "images" / name) for name in IMAGES]
    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    embeddings = out.pooler_output
    golden = {
        "model": "inferd-test/tiny-qwen2.5-vl",
        "images": IMAGES,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "grids": batch["image_grid_thw"].tolist(),
        "pixel_values_sum": float(batch["pixel_values"].double().sum()),
        "shape": list(embeddings.shape),
        "embeddings": [round(float(v), 7) for v in embeddings.reshape(-1)],
    }
    path = ROOT / "tests" / "goldens" / "models" / "tiny-qwen2.5-vl-vision.json"
    path.write_text(json.dumps(golden) + "\n")
    print(path, golden["grids"], golden["shape"], float(embeddings.abs().mean()))


if __name__ == "__main__":
    main()
