#!/usr/bin/env python3
"""Whisper goldens from transformers (CPU, float32): log-mel features of four inputs,
encoder output and decoder logits for jfk.wav, greedy ids with and without timestamps,
and the long-form (45 s) transcript with its segments. Writes tests/goldens/whisper.json.
Run through scripts/gen-goldens (pinned torch + transformers venv)."""
import json
import math
import os
import sys
import wave

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "openai/whisper-tiny.en"
FRAME_STRIDE = 50  # every 50th mel frame, all bins
TOP_K = 8


def jfk():
    with wave.open(os.path.join(ROOT, "tests", "fixtures", "audio", "jfk.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def sweep():
    # 10 s linear chirp 100 Hz -> 7000 Hz at amplitude 0.5, computed in float64.
    t = np.arange(160000, dtype=np.float64) / 16000.0
    phase = 2 * math.pi * (100.0 * t + (7000.0 - 100.0) * t * t / (2 * 10.0))
    return (0.5 * np.sin(phase)).astype(np.float32)


def long45(speech):
    # jfk four times, then silence up to 45 s.
    out = np.concatenate([speech] * 4)
    return np.concatenate([out, np.zeros(45 * 16000 - len(out), np.float32)])


def rounded(values):
    return [round(float(v), 5) for v in values]


def main():
    proc = WhisperProcessor.from_pretrained(REPO)
    model = WhisperForConditionalGeneration.from_pretrained(REPO, dtype=torch.float32)
    model.eval()
    speech = jfk()
    inputs = {"silence": np.zeros(5 * 16000, np.float32), "sweep": sweep(), "jfk": speech, "long45": long45(speech)}
    out = {"model": REPO, "frame_stride": FRAME_STRIDE, "mel": {}}
    feats = {}
    for name, audio in inputs.items():
        if len(audio) > 480000:
            f = proc(audio, sampling_rate=16000, truncation=False, padding="longest", return_tensors="pt").input_features
        else:
            f = proc(audio, sampling_rate=16000, return_tensors="pt").input_features
        feats[name] = f
        m = f[0].numpy()
        out["mel"][name] = {
            "samples": len(audio),
            "n_mels": m.shape[0],
            "frames": m.shape[1],
            "max": float(m.max()),
            "mean": float(m.mean()),
            "values": rounded(m[:, ::FRAME_STRIDE].T.reshape(-1)),
        }
    with torch.no_grad():
        enc = model.model.encoder(feats["jfk"]).last_hidden_state[0]
        rows = [0, 1, 100, 500, 749, 1499]
        out["encoder"] = {"rows": rows, "values": [rounded(enc[r]) for r in rows]}
        ids = model.generate(feats["jfk"], num_beams=1, do_sample=False)[0].tolist()
        prompt = [50257, 50362]
        full = prompt + ids + [50256]
        logits = model(input_features=feats["jfk"], decoder_input_ids=torch.tensor([full[:-1]])).logits[0]
        top = []
        for p in [0, 1, 5, len(full) - 2]:
            values, idx = torch.topk(logits[p], TOP_K)
            top.append({"position": p, "ids": idx.tolist(), "logits": rounded(values)})
        out["decoder"] = {"input_ids": full[:-1], "top_logits": top}
        out["greedy"] = {"ids": ids, "text": proc.batch_decode([ids], skip_special_tokens=True)[0]}
        ts = model.generate(feats["jfk"], num_beams=1, do_sample=False, return_timestamps=True)[0].tolist()
        out["greedy_timestamps"] = {
            "ids": ts,
            "offsets": proc.tokenizer.decode(ts, output_offsets=True)["offsets"],
        }
        lf = model.generate(feats["long45"], num_beams=1, do_sample=False, return_timestamps=True)[0].tolist()
        dec = proc.tokenizer.decode(lf, output_offsets=True, skip_special_tokens=True)
        out["long45"] = {"ids": lf, "text": dec["text"], "offsets": dec["offsets"]}
    # 128 mel bins (large-v3's feature extractor), on jfk.wav.
    from transformers import WhisperFeatureExtractor
    fe128 = WhisperFeatureExtractor(feature_size=128)
    m = fe128(speech, sampling_rate=16000, return_tensors="pt").input_features[0].numpy()
    out["mel128_jfk"] = {"n_mels": m.shape[0], "frames": m.shape[1], "values": rounded(m[:, ::FRAME_STRIDE].T.reshape(-1))}
    # The seeded random multilingual checkpoint (scripts/hf_checkpoint.py tiny-whisper):
    # language detection, and greedy ids for a given language, for translation, and with
    # the detected language.
    tiny = WhisperForConditionalGeneration.from_pretrained("inferd-test/tiny-whisper", dtype=torch.float32)
    tiny.eval()
    with torch.no_grad():
        detected = int(tiny.detect_language(input_features=feats["jfk"])[0])
        out["tiny_multilingual"] = {
            "detected_language_id": detected,
            "transcribe_fr": tiny.generate(feats["jfk"], language="fr", task="transcribe", do_sample=False, num_beams=1)[0].tolist(),
            "translate_de": tiny.generate(feats["jfk"], language="de", task="translate", do_sample=False, num_beams=1)[0].tolist(),
            # No language: detected (the task is given, as the transcriptions route does).
            "auto_transcribe": tiny.generate(feats["jfk"], task="transcribe", do_sample=False, num_beams=1)[0].tolist(),
        }
    path = os.path.join(ROOT, "tests", "goldens", "whisper.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=None, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)
    print(json.dumps(out["tiny_multilingual"]), file=sys.stderr)


if __name__ == "__main__":
    main()
