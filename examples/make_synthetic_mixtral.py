#!/usr/bin/env python3
"""Writes a synthetic checkpoint shaped like Mixtral-8x7B (hidden 4096, 8 experts of d_ff 14336,
top-2, 32 heads / 8 KV heads, vocab 32000) with a few layers, every tensor BF16, in Hugging
Face's layout (config.json, model-0000k-of-0000n.safetensors shards of one layer each plus the
embeddings, model.safetensors.index.json). With --layers 2 the experts are 5.64 GB (2 x 8 x 3 x
4096 x 14336 x 2 bytes), the whole checkpoint about 6.3 GB. For the loading / decode benchmarks
of issue 14 (docs/io.md); the weights are random, not a trained model.

    python3 examples/make_synthetic_mixtral.py --out /tmp/mixtral_synth --layers 2
    build/examples/mixtral_forward --checkpoint /tmp/mixtral_synth --weights as-stored \\
        --tokens 1 --threads 2
    rm -r /tmp/mixtral_synth

Python standard library only (numpy is not needed): the bytes come from a seeded
random.Random and are shaped into bf16 values with bytes.translate, so a GB takes seconds.
Values: random sign, magnitude in [2^-9, 2^-5) (|w| ~ 0.002 to 0.03, the scale of a trained
layer of this width), and 1.0 for the norm weights.
"""
import argparse
import json
import os
import random
import struct
import sys

HIDDEN, FF, EXPERTS, TOP_K = 4096, 14336, 8, 2
HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 8, 128, 32000

# High byte of a bf16: sign bit + the top 7 exponent bits. Exponents 118..122 (2^-9 .. 2^-5):
# the top 7 bits are 59, 60 or 61 (the exponent's low bit comes from the low byte's top bit).
_HIGH = bytes(((b & 0x80) | (59 + (b & 0x7F) % 3)) for b in range(256))


def random_bf16(rng, count):
    """count random bf16 values (little-endian bytes) of magnitude in [2^-9, 2^-5)."""
    low = rng.randbytes(count)
    high = rng.randbytes(count).translate(_HIGH)
    out = bytearray(2 * count)
    out[0::2] = low
    out[1::2] = high
    return out


def ones_bf16(count):
    return bytes([0x80, 0x3F]) * count  # 1.0 = 0x3F80


def write_shard(path, tensors):
    """tensors: list of (name, shape, producer) with producer() -> bytes; written in order."""
    header, offset = {}, 0
    for name, shape, _ in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, produce in tensors:
            f.write(produce())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory to create")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)

    def rnd(*shape):
        n = 1
        for d in shape:
            n *= d
        return (shape, lambda: random_bf16(rng, n))

    shards = []
    top = [("model.embed_tokens.weight",) + rnd(VOCAB, HIDDEN),
           ("lm_head.weight",) + rnd(VOCAB, HIDDEN),
           ("model.norm.weight", (HIDDEN,), lambda: ones_bf16(HIDDEN))]
    shards.append(top)
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        t = [(p + "input_layernorm.weight", (HIDDEN,), lambda: ones_bf16(HIDDEN)),
             (p + "post_attention_layernorm.weight", (HIDDEN,), lambda: ones_bf16(HIDDEN)),
             (p + "self_attn.q_proj.weight",) + rnd(HEADS * HEAD_DIM, HIDDEN),
             (p + "self_attn.k_proj.weight",) + rnd(KV_HEADS * HEAD_DIM, HIDDEN),
             (p + "self_attn.v_proj.weight",) + rnd(KV_HEADS * HEAD_DIM, HIDDEN),
             (p + "self_attn.o_proj.weight",) + rnd(HIDDEN, HEADS * HEAD_DIM),
             (p + "block_sparse_moe.gate.weight",) + rnd(EXPERTS, HIDDEN)]
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            t += [(q + "w1.weight",) + rnd(FF, HIDDEN),
                  (q + "w2.weight",) + rnd(HIDDEN, FF),
                  (q + "w3.weight",) + rnd(FF, HIDDEN)]
        shards.append(t)

    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(args.out, name), tensors)
        total += os.path.getsize(os.path.join(args.out, name))
        for t in tensors:
            weight_map[t[0]] = name
        print(f"wrote {name}", file=sys.stderr)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": HIDDEN, "intermediate_size": FF, "num_hidden_layers": args.layers,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K,
              "vocab_size": VOCAB, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "rope_theta": 1e6, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{args.out}: {total} bytes in {len(shards)} shards", file=sys.stderr)


if __name__ == "__main__":
    main()
