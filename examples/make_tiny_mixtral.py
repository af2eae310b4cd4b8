#!/usr/bin/env python3
"""Writes a small random Mixtral checkpoint as Hugging Face lays it out (config.json and
model.safetensors, or shards with model.safetensors.index.json; float32 or bfloat16), plus the
logits of a numpy forward for some token ids, to check examples/mixtral_forward on checkpoints
and ids other than the ones in tests/data. numpy only (no torch, no transformers).

    python3 examples/make_tiny_mixtral.py --out /tmp/tiny --seed 7 --shards 3 --dtype bf16
    build/examples/mixtral_forward --checkpoint /tmp/tiny --tokens "$(cat /tmp/tiny/tokens.txt)" \
        --logits-out /tmp/tiny/got.safetensors
    build/examples/compare_logits /tmp/tiny/got.safetensors /tmp/tiny/expected.safetensors

The numpy forward (float64, the formulas of FORMAT.md section 8) is not Hugging Face itself:
`--self-check DIR` runs it on tests/data/mixtral_tiny and compares with the logits transformers
stored there, so the reference is tied to HF before it is trusted on new checkpoints.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np


# ----------------------------------------------------------------------------------------------
# safetensors (the format is a u64 header length, a JSON header, then raw little-endian data)

def f32_to_bf16_bits(a):
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> (dtype string, numpy array of the stored bytes' type)."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, arr = tensors[name]
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    types = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "BF16": np.uint16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=types[info["dtype"]])
        if info["dtype"] == "BF16":
            arr = bf16_bits_to_f32(arr)
        out[name] = arr.reshape(info["shape"])
    return out


def read_checkpoint(directory):
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    weights = {}
    for s in shards:
        weights.update(read_safetensors(os.path.join(directory, s)))
    return weights


# ----------------------------------------------------------------------------------------------
# The forward: embeddings, per layer RMSNorm -> GQA attention with RoPE -> residual ->
# RMSNorm -> Mixtral MoE (softmax, top-k, renormalise, SwiGLU experts) -> residual; final
# RMSNorm; lm_head. float64 throughout.

def rms_norm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rope(x, num_heads, head_dim, theta):
    seq = x.shape[0]
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.outer(np.arange(seq, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    h = x.reshape(seq, num_heads, head_dim)
    half = head_dim // 2
    rotated = np.concatenate([-h[..., half:], h[..., :half]], axis=-1)
    return (h * cos + rotated * sin).reshape(seq, num_heads * head_dim)


def forward(cfg, w, ids):
    g = lambda name: w[name].astype(np.float64)
    eps = cfg["rms_norm_eps"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e6)
    k_top = cfg["num_experts_per_tok"]
    h = g("model.embed_tokens.weight")[ids]
    seq = len(ids)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms_norm(h, g(p + "input_layernorm.weight"), eps)
        q = rope(x @ g(p + "self_attn.q_proj.weight").T, nh, hd, theta)
        k = rope(x @ g(p + "self_attn.k_proj.weight").T, nkv, hd, theta)
        v = x @ g(p + "self_attn.v_proj.weight").T
        ctx = np.zeros((seq, nh * hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            qs, ks = q[:, head * hd:(head + 1) * hd], k[:, kvh * hd:(kvh + 1) * hd]
            s = qs @ ks.T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            ctx[:, head * hd:(head + 1) * hd] = (s / s.sum(axis=-1, keepdims=True)) @ \
                v[:, kvh * hd:(kvh + 1) * hd]
        h = h + ctx @ g(p + "self_attn.o_proj.weight").T
        x = rms_norm(h, g(p + "post_attention_layernorm.weight"), eps)
        m = p + "block_sparse_moe."
        z = x @ g(m + "gate.weight").T
        prob = np.exp(z - z.max(axis=-1, keepdims=True))
        prob /= prob.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(seq):
            top = np.argsort(-prob[t], kind="stable")[:k_top]
            weights = prob[t, top] / prob[t, top].sum()
            for e, we in zip(top, weights):
                ex = f"{m}experts.{e}."
                a = x[t] @ g(ex + "w1.weight").T
                u = x[t] @ g(ex + "w3.weight").T
                out[t] += we * (g(ex + "w2.weight") @ (a / (1 + np.exp(-a)) * u))
        h = h + out
    h = rms_norm(h, g("model.norm.weight"), eps)
    return h @ g("lm_head.weight").T


# ----------------------------------------------------------------------------------------------

def make(args):
    rng = np.random.default_rng(args.seed)
    H, I, E = args.hidden, args.intermediate, args.experts
    nh, nkv, hd, V = args.heads, args.kv_heads, args.head_dim, args.vocab
    cfg = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": V, "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": args.layers, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "num_local_experts": E, "num_experts_per_tok": args.top_k,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": None,
        "tie_word_embeddings": False, "dtype": "bfloat16" if args.dtype == "bf16" else "float32",
    }
    if args.rope_style == "top":
        cfg["rope_theta"] = args.rope_theta  # transformers 4.x
    else:
        cfg["rope_parameters"] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    n = lambda *shape, s=0.1: (rng.standard_normal(shape) * s).astype(np.float32)
    w = {"model.embed_tokens.weight": n(V, H, s=0.5), "lm_head.weight": n(V, H),
         "model.norm.weight": 1 + n(H)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = 1 + n(H)
        w[p + "post_attention_layernorm.weight"] = 1 + n(H)
        w[p + "self_attn.q_proj.weight"] = n(nh * hd, H)
        w[p + "self_attn.k_proj.weight"] = n(nkv * hd, H)
        w[p + "self_attn.v_proj.weight"] = n(nkv * hd, H)
        w[p + "self_attn.o_proj.weight"] = n(H, nh * hd)
        w[p + "block_sparse_moe.gate.weight"] = n(E, H, s=0.2)
        for e in range(E):
            ex = f"{p}block_sparse_moe.experts.{e}."
            w[ex + "w1.weight"], w[ex + "w3.weight"], w[ex + "w2.weight"] = \
                n(I, H), n(I, H), n(H, I)
    stored = {}
    for name, a in w.items():
        if args.dtype == "bf16":
            bits = f32_to_bf16_bits(a)
            stored[name] = ("BF16", bits)
            w[name] = bf16_bits_to_f32(bits)  # the forward sees what the file holds
        else:
            stored[name] = ("F32", a)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    names = sorted(stored)
    if args.shards <= 1:
        write_safetensors(os.path.join(args.out, "model.safetensors"), stored, {"format": "pt"})
    else:
        weight_map = {}
        for s in range(args.shards):
            file = f"model-{s + 1:05d}-of-{args.shards:05d}.safetensors"
            part = {k: stored[k] for k in names[s::args.shards]}
            write_safetensors(os.path.join(args.out, file), part, {"format": "pt"})
            weight_map.update({k: file for k in part})
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)

    ids = rng.integers(0, V, size=args.seq_len) if not args.tokens else \
        np.array([int(t) for t in args.tokens.split(",")])
    logits = forward(cfg, w, ids).astype(np.float32)
    write_safetensors(os.path.join(args.out, "expected.safetensors"),
                      {"logits": ("F32", logits), "input_ids": ("I64", ids.astype(np.int64))})
    with open(os.path.join(args.out, "tokens.txt"), "w") as f:
        f.write(",".join(str(int(t)) for t in ids))
    print(f"wrote {args.out}: {len(stored)} tensors ({args.dtype}, {max(args.shards, 1)} file(s)),"
          f" tokens {','.join(str(int(t)) for t in ids)}")


def self_check(directory):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    ref = read_safetensors(directory.rstrip("/") + "_expected.safetensors")
    logits = forward(cfg, read_checkpoint(directory), ref["input_ids"])
    err = float(np.abs(logits - ref["logits"]).max())
    print(f"numpy forward vs Hugging Face logits of {directory}: max |err| = {err:.3g}")
    return err < 1e-4 * (1 + float(np.abs(ref["logits"]).max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=48)
    ap.add_argument("--intermediate", type=int, default=40)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=10)
    ap.add_argument("--experts", type=int, default=7)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--rope-style", choices=["top", "parameters"], default="top")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=13)
    ap.add_argument("--tokens", help="comma-separated ids (default: random)")
    ap.add_argument("--self-check", metavar="DIR",
                    help="compare the numpy forward with DIR_expected.safetensors (HF) and exit")
    args = ap.parse_args()
    if args.self_check:
        sys.exit(0 if self_check(args.self_check) else 1)
    if not args.out:
        ap.error("--out is required")
    make(args)


if __name__ == "__main__":
    main()
