#!/usr/bin/env python3
"""The all-to-all time model of docs/scale-out.md for one DeepSeek-V3 MoE layer.

Per rank and layer, n tokens per rank, k slots per token, R ranks holding the 256 experts evenly:
  bytes out per direction  m = n * k * (R - 1) / R * row_bytes   (one row per remote slot, as
                                                                   ExpertParallelBlock sends)
  one all-to-all           t = alpha + (R - 1) * o + m / B       (B: the rank's link, full duplex)
  layer                    t_counts (m = 0) + t_dispatch + t_combine
Run: python3 benchmarks/scale_out_model.py  (prints the tables of docs/scale-out.md).
"""

D_MODEL, TOP_K, LAYERS = 7168, 8, 58           # DeepSeek-V3: hidden 7168, top-8, 58 MoE layers
FP8_ROW = D_MODEL + D_MODEL // 128 * 4         # e4m3 codes + one fp32 scale per 128 (DeepEP)
BF16_ROW = 2 * D_MODEL
ALPHA, PER_PEER = 2e-6, 0.3e-6                 # RDMA-class MPI: one round, per-peer message cost


def all_to_all(m, ranks, link_gbit):
    return ALPHA + (ranks - 1) * PER_PEER + m / (link_gbit * 1e9 / 8)


def layer(n, ranks, link_gbit, dispatch_row, combine_row):
    remote = n * TOP_K * (ranks - 1) / ranks
    return (all_to_all(0, ranks, link_gbit) + all_to_all(remote * dispatch_row, ranks, link_gbit)
            + all_to_all(remote * combine_row, ranks, link_gbit))


def table(n, title):
    print(f"\n{title}: n = {n} tokens per rank; ms per layer (fp8 dispatch + bf16 combine | "
          f"bf16 both)")
    print("| ranks | bytes out/rank/layer (fp8+bf16) | 25 Gb/s | 100 Gb/s | 400 Gb/s |")
    print("|---|---|---|---|---|")
    for ranks in (8, 64, 256):
        remote = n * TOP_K * (ranks - 1) / ranks
        cells = []
        for link in (25, 100, 400):
            a = layer(n, ranks, link, FP8_ROW, BF16_ROW) * 1e3
            b = layer(n, ranks, link, BF16_ROW, BF16_ROW) * 1e3
            cells.append(f"{a:.3g} / {b:.3g}")
        print(f"| {ranks} | {remote * (FP8_ROW + BF16_ROW) / 1e6:.3g} MB | " + " | ".join(cells)
              + " |")


if __name__ == "__main__":
    for n, title in ((1, "Decode, 1 token per rank"), (64, "Decode, 64 tokens per rank"),
                     (4096, "Prefill, 4096 tokens per rank")):
        table(n, title)
    # The local check: 2 ranks over shared memory, alpha and B fitted from two of the sizes.
    print("\nlocal fit (2 ranks, shared memory): alpha 0.7 us, B 12 GB/s")
    for per_pair, seen in ((4096, 2.8), (16384, 3.6), (65536, 7.6), (262144, 22.6)):
        model = 0.7 + per_pair / 12e9 * 1e6
        print(f"  {per_pair:7d} B/pair: model {model:5.1f} us, measured {seen:5.1f} us")
