#!/usr/bin/env python3
"""A plain Python gRPC client against the real mmdit-server binary.

Stubs are generated from proto/grpc_service.proto at test time (nothing generated is kept in the
tree), so this checks that a client built only from our published definition talks to the server:
liveness, readiness, model metadata, one inference on the `small` fixture compared with its
float64 reference, one malformed request, and a clean exit on SIGTERM. Loopback only; every wait
is bounded. Exits non-zero on any failure, including a Python without grpcio or protobuf.

Usage: python_client_test.py --server=PATH --proto_dir=DIR --fixtures=DIR [--protoc=PATH]
"""

import argparse
import importlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

READY_TIMEOUT_S = 60
RPC_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 60
MAX_REL_ERR = 1e-5

SMALL_CONFIG = """name: "small"
max_batch_size: 8
mmdit { dim: 64 num_heads: 4 dim_feedforward: 256 num_layers: 2 }
"""


class TestFailure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise TestFailure(what)
    print(f"ok: {what}", flush=True)


def import_or_die(name, package):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        sys.exit(f"FAIL: cannot import {name} ({e}); install {package} "
                 "(deploy/install-deps.sh lists it)")


np = import_or_die("numpy", "python3-numpy")
grpc = import_or_die("grpc", "python3-grpcio")
import_or_die("google.protobuf", "python3-protobuf")


def read_safetensors(path):
    """The tensors of a .safetensors file as numpy arrays (little-endian, row-major)."""
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "BOOL": "?", "F16": "<f2"}
    with open(path, "rb") as f:
        blob = f.read()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    data = memoryview(blob)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def generate_stubs(proto_dir, out_dir, protoc):
    """Python modules for grpc_service.proto: grpc_tools when it works, else plain protoc."""
    proto = os.path.join(proto_dir, "grpc_service.proto")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_dir}",
           f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", proto]
    gen = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if gen.returncode != 0:
        print(f"grpc_tools.protoc failed ({gen.stderr.strip()}); using {protoc}", flush=True)
        if not protoc:
            raise TestFailure("no grpc_tools and no protoc to generate the Python messages")
        gen = subprocess.run([protoc, f"--proto_path={proto_dir}", f"--python_out={out_dir}",
                              proto], capture_output=True, text=True, timeout=60)
        if gen.returncode != 0:
            raise TestFailure(f"protoc --python_out failed: {gen.stderr}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("grpc_service_pb2")


class Client:
    """Unary calls of inference.GRPCInferenceService through grpcio's generic API, so that the
    message classes alone are enough (no dependence on the generated service stub)."""

    def __init__(self, channel, pb):
        self.pb = pb

        def unary(method, request_cls, response_cls):
            return channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString)

        self.ServerLive = unary("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse)
        self.ServerReady = unary("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse)
        self.ModelReady = unary("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse)
        self.ModelMetadata = unary("ModelMetadata", pb.ModelMetadataRequest,
                                   pb.ModelMetadataResponse)
        self.ModelInfer = unary("ModelInfer", pb.ModelInferRequest, pb.ModelInferResponse)


def make_repository(root, fixtures):
    model_dir = os.path.join(root, "models", "small")
    os.makedirs(os.path.join(model_dir, "1"))
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(SMALL_CONFIG)
    shutil.copyfile(os.path.join(fixtures, "small_weights.safetensors"),
                    os.path.join(model_dir, "1", "model.safetensors"))
    return os.path.join(root, "models")


def read_ports(port_file):
    try:
        with open(port_file) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    ports = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if value.strip().isdigit():
            ports[key.strip()] = int(value)
    return ports if "grpc_port" in ports and "http_port" in ports else None


def wait_for_ports(server, port_file, log_path):
    give_up = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < give_up:
        ports = read_ports(port_file)
        if ports:
            return ports
        if server.poll() is not None:
            raise TestFailure(f"mmdit-server exited with {server.returncode} before it was "
                              f"ready:\n{read_log(log_path)}")
        time.sleep(0.05)
    raise TestFailure(f"mmdit-server not ready within {READY_TIMEOUT_S} s:\n{read_log(log_path)}")


def read_log(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return "(no log)"


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def infer_request(pb, io, context_shape=None):
    """The fixture's inputs as raw_input_contents, in the order of `inputs`."""
    req = pb.ModelInferRequest(model_name="small", id="python-client")
    tensors = [("x", "FP32", io["x"]), ("y", "FP32", io["y"]),
               ("context", "FP32", io["context"]), ("attn_mask", "BOOL", io["attn_mask"]),
               ("start_pos", "INT64", io["start_pos"])]
    for name, datatype, arr in tensors:
        shape = list(arr.shape)
        if name == "context" and context_shape is not None:
            shape = context_shape
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


def run_checks(client, pb, io):
    live = client.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S)
    check(live.live, "ServerLive: live")

    give_up = time.monotonic() + READY_TIMEOUT_S
    ready = False
    while not ready and time.monotonic() < give_up:
        ready = client.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
        if not ready:
            time.sleep(0.05)
    check(ready, "ServerReady: ready")
    check(client.ModelReady(pb.ModelReadyRequest(name="small"), timeout=RPC_TIMEOUT_S).ready,
          "ModelReady(small): ready")

    meta = client.ModelMetadata(pb.ModelMetadataRequest(name="small"), timeout=RPC_TIMEOUT_S)
    check(meta.name == "small", f"ModelMetadata: name {meta.name!r}")
    inputs = {t.name: t for t in meta.inputs}
    expected = {"x": "FP32", "y": "FP32", "context": "FP32", "attn_mask": "BOOL",
                "start_pos": "INT64"}
    check(sorted(inputs) == sorted(expected), f"ModelMetadata: inputs {sorted(inputs)}")
    for name, datatype in expected.items():
        check(inputs[name].datatype == datatype,
              f"ModelMetadata: input {name} is {inputs[name].datatype}")
    check(list(inputs["x"].shape)[-1] == 64, f"ModelMetadata: x shape {list(inputs['x'].shape)}")
    outputs = {t.name: t.datatype for t in meta.outputs}
    check(outputs == {"x_out": "FP32", "context_out": "FP32"}, f"ModelMetadata: outputs {outputs}")

    resp = client.ModelInfer(infer_request(pb, io), timeout=RPC_TIMEOUT_S)
    check(resp.model_name == "small" and resp.id == "python-client",
          f"ModelInfer: answer for model {resp.model_name!r}, id {resp.id!r}")
    check(len(resp.outputs) == 2 and len(resp.raw_output_contents) == 2,
          f"ModelInfer: {len(resp.outputs)} outputs, {len(resp.raw_output_contents)} raw")
    for out, raw in zip(resp.outputs, resp.raw_output_contents):
        ref = io[f"{out.name}_f64"]
        check(out.datatype == "FP32", f"ModelInfer: {out.name} is {out.datatype}")
        check(list(out.shape) == list(ref.shape),
              f"ModelInfer: {out.name} shape {list(out.shape)}")
        got = np.frombuffer(raw, dtype="<f4")
        check(got.size == ref.size, f"ModelInfer: {out.name} holds {got.size} floats")
        err = rel_err(got, ref)
        check(err <= MAX_REL_ERR, f"ModelInfer: {out.name} relative error {err:.3e} "
              f"<= {MAX_REL_ERR:g}")

    B, C, D = io["context"].shape
    bad = infer_request(pb, io, context_shape=[B * C, D])
    try:
        client.ModelInfer(bad, timeout=RPC_TIMEOUT_S)
        raise TestFailure("ModelInfer with context of shape [B*C, D] succeeded")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT,
              f"bad shape: {e.code()} ({e.details()})")
        check("context" in (e.details() or ""), "bad shape: the message names 'context'")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="the mmdit-server binary")
    parser.add_argument("--proto_dir", required=True, help="folder holding grpc_service.proto")
    parser.add_argument("--fixtures", required=True, help="folder of small_*.safetensors")
    parser.add_argument("--protoc", default="", help="protoc, used if grpc_tools fails")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="mmdit_python_client_")
    server = None
    log_path = os.path.join(tmp, "server.log")
    try:
        gen_dir = os.path.join(tmp, "gen")
        os.makedirs(gen_dir)
        pb = generate_stubs(args.proto_dir, gen_dir, args.protoc)
        io = read_safetensors(os.path.join(args.fixtures, "small_io.safetensors"))
        repo = make_repository(tmp, args.fixtures)
        port_file = os.path.join(tmp, "ports")
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [args.server, f"--model_repository={repo}", "--host=127.0.0.1",
                 "--grpc_port=0", "--http_port=0", f"--port_file={port_file}",
                 "--cpu_threads=2", "--exit_timeout_secs=20"],
                stdout=log, stderr=subprocess.STDOUT)
        ports = wait_for_ports(server, port_file, log_path)
        print(f"mmdit-server ready: grpc 127.0.0.1:{ports['grpc_port']}", flush=True)

        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
            run_checks(Client(channel, pb), pb, io)

        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"mmdit-server still running {EXIT_TIMEOUT_S} s after SIGTERM")
        check(code == 0, f"SIGTERM: mmdit-server exited with {code}")
        print("PASS", flush=True)
        return 0
    except (TestFailure, grpc.RpcError, grpc.FutureTimeoutError) as e:
        print(f"FAIL: {e}", flush=True)
        print(f"--- mmdit-server log ---\n{read_log(log_path)}", flush=True)
        return 1
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
