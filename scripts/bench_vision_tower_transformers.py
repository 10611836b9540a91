"""The Qwen2.5-VL-3B vision tower in transformers (random float32 weights, sdpa) on chelsea.png
at Qwen2.5-VL's pixel budget, CPU: the reference for `cargo bench --bench vision -- --tower`
(docs/perf.md). Run with the goldens venv: $(scripts/torch-venv) scripts/bench_vision_tower_transformers.py"""
import pathlib
import time

import torch
from PIL import Image
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
torch.manual_seed(0)
cfg = Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
    out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31])
cfg._attn_implementation = "sdpa"
m = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=torch.float32).eval()
p = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
b = p(images=[Image.open(str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images" / "chelsea.png"))], return_tensors="pt")
print(torch.get_num_threads(), b["image_grid_thw"])
with torch.no_grad():
    m(b["pixel_values"], grid_thw=b["image_grid_thw"])
    best = 1e9
    for _ in range(2):
        t = time.time(); m(b["pixel_values"], grid_thw=b["image_grid_thw"]); best = min(best, time.time() - t)
print("torch f32 sdpa seconds", best)
