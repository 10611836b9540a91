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

    # The whole model: prompts with one and with two images (the image tokens expanded
    # as the processor expands <|image_pad|>), logits of the prompt rows that see the
    # images and 16 greedy tokens.
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    counts = [int(t * h * w) // (merge * merge) for t, h, w in batch["image_grid_thw"].tolist()]
    start, end, pad = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id

    def image(n):
        return [start] + [pad] * n + [end]

    cases = {
        "one_image": ([1, 17, 99, 5] + image(counts[0]) + [44, 250, 7], [0]),
        "two_images": ([1, 17] + image(counts[0]) + [60, 61] + image(counts[1]) + [200, 3], [0, 1]),
    }
    out = {"model": "inferd-test/tiny-qwen2.5-vl", "images": IMAGES, "min_pixels": MIN_PIXELS,
           "max_pixels": MAX_PIXELS, "cases": {}}
    for name, (ids, which) in cases.items():
        pixel_values = torch.cat([processor(images=[images[i]], return_tensors="pt")["pixel_values"] for i in which])
        grid = torch.cat([processor(images=[images[i]], return_tensors="pt")["image_grid_thw"] for i in which])
        input_ids = torch.tensor([ids])
        mm = (input_ids == pad).int()
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                           mm_token_type_ids=mm).logits[0]
            generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                                       mm_token_type_ids=mm, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        # Rows that see the images: the first and last token of each image, the token
        # after it, and the prompt's last three.
        rows = sorted({i for i, t in enumerate(ids) if t == pad and ids[i - 1] != pad}
                      | {i for i, t in enumerate(ids) if t == pad and ids[i + 1] != pad}
                      | {i + 1 for i, t in enumerate(ids) if t == end}
                      | set(range(len(ids) - 3, len(ids))))
        out["cases"][name] = {
            "images": [IMAGES[i] for i in which],
            "prompt": ids,
            "logit_rows": rows,
            "logits": [[round(float(v), 6) for v in logits[r]] for r in rows],
            "greedy": generated[0, len(ids):].tolist(),
        }
        print(name, len(ids), out["cases"][name]["greedy"])
    path = ROOT / "tests" / "goldens" / "models" / "tiny-qwen2.5-vl.json"
    path.write_text(json.dumps(out) + "\n")
    chat_goldens(model)


# Chat requests as a client sends them (OpenAI messages; an image_url names a fixture
# file, which the test sends as a data: URL), through transformers' own processor: the
# checkpoint's chat template, its tokenizer and image processor (preprocessor_config.json),
# `<|image_pad|>` expanded by the processor.
CHATS = {
    "one_image": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture? "},
            {"type": "image_url", "image_url": {"url": "chelsea.png"}},
        ]},
    ],
    "conversation": [
        {"role": "system", "content": "You describe images tersely."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "chelsea.png"}},
            {"type": "text", "text": "A cat?"},
        ]},
        {"role": "assistant", "content": "A tabby cat."},
        {"role": "user", "content": [
            {"type": "text", "text": "And this one, "},
            {"type": "image_url", "image_url": {"url": "synthetic-83x61.webp"}},
            {"type": "text", "text": " next to "},
            {"type": "image_url", "image_url": {"url": "synthetic-83x61.gif"}},
        ]},
    ],
}


def chat_goldens(model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained("inferd-test/tiny-qwen2.5-vl")
    tokenizer = processor.tokenizer
    out = {"model": "inferd-test/tiny-qwen2.5-vl", "max_tokens": 16, "cases": {}}
    for name, messages in CHATS.items():
        files = [part["image_url"]["url"] for m in messages if isinstance(m["content"], list)
                 for part in m["content"] if part["type"] == "image_url"]
        # transformers' templates see `{"type": "image"}` parts.
        template_messages = [
            {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            if isinstance(m["content"], list) else m
            for m in messages
        ]
        text = processor.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
        images = [Image.open(ROOT / "tests" / "fixtures" / "images" / f) for f in files]
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                       pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        ids = generated.sequences[0, prompt_len:].tolist()
        logprobs = [float(torch.log_softmax(score[0].double(), -1)[t]) for score, t in zip(generated.scores, ids)]
        out["cases"][name] = {
            "messages": messages,
            "prompt_tokens": prompt_len,
            "grids": inputs["image_grid_thw"].tolist(),
            "token_ids": ids,
            "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in ids],
            "logprobs": [round(v, 6) for v in logprobs],
        }
        print(name, prompt_len, ids)
    path = ROOT / "tests" / "goldens" / "models" / "tiny-qwen2.5-vl-chat.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
