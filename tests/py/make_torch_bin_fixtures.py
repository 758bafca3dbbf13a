"""Build the fixtures for crates/mezo-model/src/torch_bin.rs.

Run with the project venv (torch 2.x):
    ~/.cache/mezo/venv/bin/python tests/py/make_torch_bin_fixtures.py

Real torch.save outputs cover what the reader must accept; the hostile files are
assembled opcode by opcode so that nothing here ever unpickles them.
`expected.json` lists, per fixture, the tensors in file order with values as
plain numbers (fp16/bf16 as their exact f32 values) for exact comparison.
"""

import io
import json
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "mezo-model" / "tests" / "fixtures" / "torch_bin"

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "Bool",
}


def describe(prefix, obj, out):
    """Flatten like the Rust reader: nested dicts joined by '.', non-tensors dropped."""
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous().flatten()
            if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
                values = t.float().tolist()
            else:
                values = t.to(torch.int64).tolist()
            out.append({"key": key, "dtype": DTYPE_NAMES[v.dtype],
                        "shape": list(v.shape), "values": values})
        elif isinstance(v, dict):
            describe(key + ".", v, out)
    return out


def real_fixtures():
    g = torch.Generator().manual_seed(1234)
    fixtures = {}

    fixtures["dtypes.bin"] = OrderedDict(
        f32=torch.randn(2, 3, generator=g),
        f16=(torch.randn(5, generator=g) * 100).half(),
        bf16=(torch.randn(2, 2, generator=g) * 1e3).bfloat16(),
        i64=torch.tensor([0, -1, 2**40 + 7, -(2**62), 2**63 - 1]),
        i32=torch.tensor([[-5, 6]], dtype=torch.int32),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
    )

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    # The transposed view is saved as-is: storage row-major 3x4, tensor 4x3 with stride (1, 4).
    fixtures["transposed.bin"] = {"t": base.t()}

    x = torch.arange(10, dtype=torch.float32) * 0.5
    m = torch.arange(20, dtype=torch.float16).reshape(4, 5)
    # Views of one storage each: a slice with storage_offset 3, a strided column,
    # and a second name for the very same tensor (tied weights).
    fixtures["shared.bin"] = OrderedDict(
        full=x, tail=x[3:], col=m[1:, 2], mat=m, tied=x)
    assert fixtures["shared.bin"]["tail"].storage_offset() == 3

    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    fixtures["module.bin"] = lin.state_dict()  # carries `_metadata`, restored via BUILD

    fixtures["nested.bin"] = {
        "encoder": {"layer": {"w": torch.ones(2, 2), "depth": 3},
                    "norm": torch.tensor([1.0, -1.0])},
        "param": torch.nn.Parameter(torch.tensor([0.25, 0.5])),
        "version": 7,
        "name": "opt",
        "head.bias": torch.tensor([9], dtype=torch.int64),
    }
    return fixtures


# ---- hand-assembled pickles (never passed to pickle.load) ----

def u(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def short_u(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def k(i):
    return b"K" + bytes([i])


def g(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def zip_with(path, pickle_bytes, storages=(), byteorder=b"little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", byteorder)
        for key, data in storages:
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")


def hostile_fixtures():
    # {'key': os.system('echo pwned')}: a loader that executes globals would run a shell.
    zip_with(OUT / "malicious_global.bin",
             b"\x80\x02}" + u("key") + g("os", "system") + u("echo pwned")
             + b"\x85Rs.")

    # Same attack through protocol 4 (FRAME + STACK_GLOBAL + MEMOIZE).
    body = (b"}\x94" + short_u("key") + short_u("builtins") + short_u("eval")
            + b"\x93\x94" + short_u("print('pwned')") + b"\x85Rs.")
    zip_with(OUT / "malicious_stack_global.bin",
             b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body)

    # A 3-element view at offset 2 of a 4-element storage: must be rejected, not read past the end.
    storage = b"(" + u("storage") + g("torch", "FloatStorage") + u("0") + u("cpu") + k(4) + b"tQ"
    tensor = (g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + k(2) + k(3) + b"\x85"
              + k(1) + b"\x85" + b"\x89" + g("collections", "OrderedDict") + b")Rt" + b"R")
    zip_with(OUT / "out_of_bounds.bin", b"\x80\x02}" + u("w") + tensor + b"s.",
             storages=[("0", struct.pack("<4f", 1, 2, 3, 4))])

    # A valid zip whose data.pkl stops mid-stream.
    with zipfile.ZipFile(OUT / "dtypes.bin") as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    with zipfile.ZipFile(OUT / "truncated_pickle.bin", "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data[: len(data) // 2] if name == pkl else data)

    # Same tensors, but declared big-endian.
    with zipfile.ZipFile(OUT / "big_endian.bin", "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, b"big" if name.endswith("/byteorder") else data)

    # The zip itself cut in half: no central directory.
    raw = (OUT / "dtypes.bin").read_bytes()
    (OUT / "truncated.bin").write_bytes(raw[: len(raw) // 2])


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, sd in real_fixtures().items():
        torch.save(sd, OUT / name)
        expected[name] = describe("", sd, [])
    # Protocol 4 exercises FRAME, SHORT_BINUNICODE, MEMOIZE and STACK_GLOBAL.
    torch.save(real_fixtures()["shared.bin"], OUT / "protocol4.bin", pickle_protocol=4)
    expected["protocol4.bin"] = expected["shared.bin"]
    torch.save({"w": torch.ones(2)}, OUT / "legacy.bin", _use_new_zipfile_serialization=False)
    hostile_fixtures()
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for p in sorted(OUT.iterdir()):
        print(f"{p.stat().st_size:6d}  {p.name}")


if __name__ == "__main__":
    main()
