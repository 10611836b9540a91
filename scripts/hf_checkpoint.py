#!/usr/bin/env python3
"""Build Hugging Face format checkpoints for inferd's tests, without Hugging Face access.

  hf_checkpoint.py gguf --arch llama|qwen2 GGUF OUT_DIR [--dtype bf16]
      Dequantize a GGUF file (via the `gguf` PyPI package + numpy) into model.safetensors
      with HF tensor names. Config and tokenizer files are copied by the caller from
      tests/fixtures/models/ (they were taken from the same GGUF metadata).
  hf_checkpoint.py tiny NAME OUT_DIR
      Write one of the seeded random-weight checkpoints (pure stdlib: no numpy, no torch),
      byte-identical on every machine. `tiny --list` prints the names.

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
# Seeded random-weight checkpoints with awkward shapes

# vocab 384 keeps files small; every config exercises something the real models do not.
TINY = {
    # Llama, GQA 3:1, head_dim (16) != hidden/heads (72/6), llama3 rope scaling, untied, bf16.
    "tiny-llama": {
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 72, "intermediate_size": 112, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
            "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False,
            "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
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
}


def tiny_tensors(cfg):
    """[(name, shape, kind)] with kind 'norm' (around 1), 'bias' or 'weight'."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
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
        out.append((p + "post_attention_layernorm.weight", [h], "norm"))
        out.append((p + "mlp.gate_proj.weight", [i, h], "weight"))
        out.append((p + "mlp.up_proj.weight", [i, h], "weight"))
        out.append((p + "mlp.down_proj.weight", [h, i], "weight"))
    out.append(("model.norm.weight", [h], "norm"))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", [cfg["vocab_size"], h], "weight"))
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
        writer.write(name, pack(tiny_values(rng, n, kind, shape[-1]), spec["dtype"]))
    writer.close()
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    with open(os.path.join(args.out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")
    say(f"{args.name}: {len(tensors)} tensors, {spec['dtype']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("--arch", choices=["llama", "qwen2"], required=True)
    g.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    g.add_argument("--untied", dest="tied", action="store_false")
    g.add_argument("gguf")
    g.add_argument("out_dir")
    t = sub.add_parser("tiny")
    t.add_argument("--list", action="store_true")
    t.add_argument("name", nargs="?")
    t.add_argument("out_dir", nargs="?")
    args = ap.parse_args()
    if args.cmd == "gguf":
        os.makedirs(args.out_dir, exist_ok=True)
        gguf_main(args)
    else:
        tiny_main(args)


if __name__ == "__main__":
    sys.dont_write_bytecode = True
    main()
