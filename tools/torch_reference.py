#!/usr/bin/env python3
"""A lean PyTorch implementation of MODEL.md, beside the C++ forwards.

  tools/torch_reference.py --check-fixtures [DIR]   relative errors against the float64 outputs
  tools/torch_reference.py --bench [--threads 2]    batch 1, 8, 32 at L=186, C=64, 12 layers

Reads safetensors with struct + json + numpy when the `safetensors` package is absent.
Runs with Debian's python3-torch (1.13, OpenBLAS through libblas.so.3): use /usr/bin/python3.
"""
import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

# Debian's torch runs its GEMMs through OpenBLAS, whose own threads on top of torch's OpenMP
# threads oversubscribe small machines: on 2 Zen 3 cores, batch 1 took 174 ms with OpenBLAS's
# default threads and 60 ms with one. Read when OpenBLAS loads, so set before importing torch.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LN_EPS = 1e-6
RMS_EPS = 1.1920929e-07  # float32 machine epsilon
ROPE_BASE = 10000.0

_NP_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "BOOL": np.bool_, "U8": np.uint8}


def read_safetensors(path):
    """Returns ({name: torch.Tensor}, metadata dict)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = data[base + start:base + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_NP_DTYPES[info["dtype"]])
        tensors[name] = torch.from_numpy(arr.copy().reshape(info["shape"]))
    return tensors, meta


def rms(v, w):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + RMS_EPS) * w


def modulated_ln(v, scale, shift):
    return F.layer_norm(v, v.shape[-1:], eps=LN_EPS) * (1 + scale[:, None]) + shift[:, None]


def rope(v, cos, sin):
    """v [B, T, H, Dh]; rotates adjacent pairs (2i, 2i+1) by cos/sin [B, T, 1, Dh/2]."""
    a, b = v[..., 0::2], v[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def joint_mask(attn_mask, context_len):
    """Additive [B, 1, T, T] mask from the bool [B, L, L] one (MODEL.md step 6), or None."""
    if attn_mask is None:
        return None
    m = attn_mask.bool()
    bsz, l, _ = m.shape
    t = l + context_len
    full = torch.ones(bsz, t, t, dtype=torch.bool)
    full[:, :l, :l] = m
    full[:, :l, l:] = m.any(dim=2, keepdim=True)
    full[:, l:, :l] = m.any(dim=1, keepdim=True)
    return torch.zeros(bsz, 1, t, t).masked_fill(~full[:, None], float("-inf"))


def forward(w, x, y, context, attn_mask=None, start_pos=None, num_heads=8):
    """w: state_dict (MODEL.md keys), all tensors of x's dtype. Returns (x_out, context_out)."""
    bsz, l, d = x.shape
    c_len = context.shape[1]
    dh = d // num_heads
    y = y.reshape(bsz, d)
    if start_pos is None:
        start_pos = torch.zeros(bsz, dtype=torch.int64)
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    pos = (start_pos[:, None] + torch.arange(l)[None]).to(torch.float32)
    angle = pos[..., None] * inv_freq  # float32, as the original
    cos = torch.cos(angle).to(x.dtype)[:, :, None]
    sin = torch.sin(angle).to(x.dtype)[:, :, None]
    mask = joint_mask(attn_mask, c_len)
    if mask is not None:
        mask = mask.to(x.dtype)
    sy = F.silu(y)
    n_layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    for i in range(n_layers):
        p = lambda name: w[f"blocks.{i}.{name}"]
        mod = F.linear(sy, p("adaLN_modulation.1.weight"), p("adaLN_modulation.1.bias"))
        cmod = F.linear(sy, p("context_layers.adaLN_modulation.1.weight"),
                        p("context_layers.adaLN_modulation.1.bias"))
        sa, ha, ga, sm, hm, gm = mod.chunk(6, dim=-1)
        csa, cha, cga, csm, chm, cgm = cmod.chunk(6, dim=-1)

        q, k, v = F.linear(modulated_ln(x, sa, ha), p("cross_attn.to_qkv.weight"),
                           p("cross_attn.to_qkv.bias")).chunk(3, dim=-1)
        q = rope(rms(q, p("cross_attn.rms_norm_q.weight")).view(bsz, l, num_heads, dh), cos, sin)
        k = rope(rms(k, p("cross_attn.rms_norm_k.weight")).view(bsz, l, num_heads, dh), cos, sin)
        v = v.reshape(bsz, l, num_heads, dh)
        cq, ck, cv = F.linear(modulated_ln(context, csa, cha), p("cross_attn.c_to_qkv.weight"),
                              p("cross_attn.c_to_qkv.bias")).chunk(3, dim=-1)
        cq = rms(cq, p("cross_attn.c_rms_norm_q.weight")).view(bsz, c_len, num_heads, dh)
        ck = rms(ck, p("cross_attn.c_rms_norm_k.weight")).view(bsz, c_len, num_heads, dh)
        cv = cv.reshape(bsz, c_len, num_heads, dh)

        qq = torch.cat((q, cq), dim=1).transpose(1, 2)
        kk = torch.cat((k, ck), dim=1).transpose(1, 2)
        vv = torch.cat((v, cv), dim=1).transpose(1, 2)
        s = (qq @ kk.transpose(-1, -2)) * dh ** -0.5
        if mask is not None:
            s = s + mask
        att = (torch.softmax(s, dim=-1) @ vv).transpose(1, 2).reshape(bsz, l + c_len, d)

        ax = rms(F.linear(att[:, :l], p("cross_attn.to_out.0.weight"),
                          p("cross_attn.to_out.0.bias")), p("cross_attn.to_out.1.weight"))
        ac = rms(F.linear(att[:, l:], p("cross_attn.c_to_out.0.weight"),
                          p("cross_attn.c_to_out.0.bias")), p("cross_attn.c_to_out.1.weight"))
        x = x + ax * ga[:, None]
        context = context + ac * cga[:, None]

        hx = F.linear(modulated_ln(x, sm, hm), p("mlp.0.weight"), p("mlp.0.bias"))
        x = x + F.linear(F.silu(hx), p("mlp.2.weight"), p("mlp.2.bias")) * gm[:, None]
        hc = F.linear(modulated_ln(context, csm, chm), p("context_layers.mlp.0.weight"),
                      p("context_layers.mlp.0.bias"))
        context = context + F.linear(F.silu(hc), p("context_layers.mlp.2.weight"),
                                     p("context_layers.mlp.2.bias")) * cgm[:, None]
    return x, context


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return (torch.linalg.norm(out - ref) / torch.linalg.norm(ref)).item()


def check_fixtures(directory):
    worst = 0.0
    for name in ("small", "target1"):
        w, meta = read_safetensors(os.path.join(directory, f"{name}_weights.safetensors"))
        io, _ = read_safetensors(os.path.join(directory, f"{name}_io.safetensors"))
        heads = int(meta["num_heads"])
        for dtype in (torch.float32, torch.float64):
            wd = {k: v.to(dtype) for k, v in w.items()}
            xo, co = forward(wd, io["x"].to(dtype), io["y"].to(dtype), io["context"].to(dtype),
                             io.get("attn_mask"), io.get("start_pos"), heads)
            ex, ec = rel_err(xo, io["x_out_f64"]), rel_err(co, io["context_out_f64"])
            print(f"{name:8s} {str(dtype):14s} x_out rel err {ex:.3e}  context_out rel err {ec:.3e}")
            if dtype == torch.float32:
                worst = max(worst, ex, ec)
    print(f"worst float32 relative error {worst:.3e} (bound 1e-5)")
    return 0 if worst <= 1e-5 else 1


def flops_per_sample(l, c, d=128, f=512, n=12):
    t = l + c
    return n * (2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * f + 4 * d * 6 * d)


def random_weights(d=128, f=512, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)

    def u(*shape):  # PyTorch's default Linear scale
        return (torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(shape[-1] if len(shape) > 1 else d)

    w = {}
    for i in range(n):
        for pre in ("", "context_layers."):
            w[f"blocks.{i}.{pre}adaLN_modulation.1.weight"] = u(6 * d, d)
            w[f"blocks.{i}.{pre}adaLN_modulation.1.bias"] = u(6 * d)
            w[f"blocks.{i}.{pre}mlp.0.weight"] = u(f, d)
            w[f"blocks.{i}.{pre}mlp.0.bias"] = u(f)
            w[f"blocks.{i}.{pre}mlp.2.weight"] = u(d, f)
            w[f"blocks.{i}.{pre}mlp.2.bias"] = u(d)
        for c in ("", "c_"):
            w[f"blocks.{i}.cross_attn.{c}to_qkv.weight"] = u(3 * d, d)
            w[f"blocks.{i}.cross_attn.{c}to_qkv.bias"] = u(3 * d)
            w[f"blocks.{i}.cross_attn.{c}rms_norm_q.weight"] = torch.ones(d)
            w[f"blocks.{i}.cross_attn.{c}rms_norm_k.weight"] = torch.ones(d)
            w[f"blocks.{i}.cross_attn.{c}to_out.0.weight"] = u(d, d)
            w[f"blocks.{i}.cross_attn.{c}to_out.0.bias"] = u(d)
            w[f"blocks.{i}.cross_attn.{c}to_out.1.weight"] = torch.ones(d)
    return w


def bench(threads, batches, l=186, c=64, budget_s=10.0):
    torch.set_num_threads(threads)
    w = random_weights()
    fl = flops_per_sample(l, c)
    load = os.getloadavg()
    print(f"PyTorch {torch.__version__} lean fp32, {threads} threads (OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}), L={l} C={c} D=128 H=8 F=512 N=12, "
          f"{fl * 1e-9:.3f} GFLOP/sample; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'batch':>6s} {'ms/batch':>10s} {'min ms':>10s} {'samples/s':>10s} {'GFLOP/s':>8s} "
          f"{'cpu ms':>9s} {'runs':>5s}")
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, l, 128, generator=g)
            y = torch.randn(b, 1, 128, generator=g)
            ctx = torch.randn(b, c, 128, generator=g)
            forward(w, x, y, ctx)  # warm-up
            times, cpu = [], []
            start = time.perf_counter()
            while len(times) < 20:
                c0 = time.process_time()
                t0 = time.perf_counter()
                forward(w, x, y, ctx)
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
                if len(times) >= 3 and time.perf_counter() - start > budget_s:
                    break
            med = statistics.median(times)
            print(f"{b:6d} {med:10.2f} {min(times):10.2f} {b * 1e3 / med:10.1f} "
                  f"{b * fl / (med * 1e6):8.1f} {statistics.median(cpu):9.1f} {len(times):5d}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-fixtures", nargs="?", const=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures"),
        metavar="DIR", help="compare with the fixtures' float64 outputs")
    ap.add_argument("--bench", action="store_true", help="time batch 1, 8, 32 at the target shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1,8,32")
    args = ap.parse_args()
    if args.check_fixtures:
        rc = check_fixtures(args.check_fixtures)
        if rc:
            return rc
    if args.bench:
        bench(args.threads, [int(b) for b in args.batch_sizes.split(",")])
    if not args.check_fixtures and not args.bench:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
