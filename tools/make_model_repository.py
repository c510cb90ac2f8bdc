#!/usr/bin/env python3
"""Turns a PyTorch state_dict saved as safetensors into a model repository entry:

    DIR/NAME/config.pbtxt
    DIR/NAME/VERSION/model.safetensors

D, F and N are read from the tensors' shapes; H (not recoverable from the weights) comes from
--num_heads or, failing that, the file's __metadata__ "num_heads". Needs only the standard library.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="state_dict .safetensors (MODEL.md's blocks.{i}.* keys)")
    p.add_argument("repository", help="model repository folder (created if missing)")
    p.add_argument("--name", default="mmdit", help="model name (default: mmdit)")
    p.add_argument("--version", type=int, default=1, help="version folder (default: 1)")
    p.add_argument("--num_heads", type=int, default=0, help="attention heads H (default: from metadata)")
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()

    header = read_header(a.weights)
    meta = header.pop("__metadata__", {})
    try:
        d = header["blocks.0.cross_attn.to_out.0.weight"]["shape"][0]
        f = header["blocks.0.mlp.0.weight"]["shape"][0]
    except KeyError as e:
        sys.exit(f"{a.weights}: missing tensor {e}; is this an MMDiT state_dict?")
    n = 1 + max(int(m.group(1)) for k in header if (m := re.match(r"blocks\.(\d+)\.", k)))
    h = a.num_heads or int(meta.get("num_heads", 0))
    if not h:
        sys.exit(f"{a.weights}: no num_heads in its metadata; pass --num_heads")

    model_dir = os.path.join(a.repository, a.name)
    os.makedirs(os.path.join(model_dir, str(a.version)), exist_ok=True)
    shutil.copyfile(a.weights, os.path.join(model_dir, str(a.version), "model.safetensors"))
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as out:
        out.write(f'name: "{a.name}"\nmax_batch_size: {a.max_batch_size}\nprecision: "{a.precision}"\n'
                  f"mmdit {{ dim: {d} num_heads: {h} dim_feedforward: {f} num_layers: {n} }}\n"
                  "dynamic_batching { max_queue_delay_microseconds: 0 }\n")
    print(f"{model_dir}: D={d} H={h} F={f} N={n}, version {a.version}")


if __name__ == "__main__":
    main()
