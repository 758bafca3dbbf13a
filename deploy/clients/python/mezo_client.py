#!/usr/bin/env python3
"""A Python client for the mezo coordinator, over its public gRPC API (proto/mezo/v1).

The stubs are generated from the .proto files with grpcio-tools on first use (and again when
the protos change), so this file is all a Python user needs besides `pip install grpcio
grpcio-tools grpcio-reflection`.

    python mezo_client.py --coordinator HOST:50051 start --model /models/opt-mini --data-dir /models/sst2 --steps 2000
    python mezo_client.py --coordinator HOST:50051 watch RUN          # one JSON line per step, until the run ends
    python mezo_client.py --coordinator HOST:50051 get RUN | list | stop RUN
    python mezo_client.py --coordinator HOST:50051 export RUN --out DIR   # the adapter, PEFT format
    python mezo_client.py --coordinator HOST:50051 reflect            # what the server says it serves

A coordinator that checks tokens wants a client token: `--token-file FILE` or `$MEZO_TOKEN`. One
that serves TLS is `--coordinator https://HOST:50051`, with `--tls-ca CA.pem` for the CA that signed
its certificate (else the system's roots).

As a library: `client = MezoClient("HOST:50051")` (or `MezoClient("https://HOST:50051",
token=..., tls_ca="ca.pem")`), then `client.start(...)`, `client.watch(run_id)` (a generator of
StreamMetricsResponse), `client.export(run_id, out_dir)`.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))
PROTOS = ["mezo/v1/run.proto", "mezo/v1/mezo.proto"]


def load_stubs(proto_dir):
    """Generates (once per proto content) and imports the Python stubs of mezo's public API."""
    from grpc_tools import protoc

    files = [os.path.join(proto_dir, p) for p in PROTOS]
    for f in files:
        if not os.path.isfile(f):
            sys.exit(f"mezo_client: {f} not found; pass --proto pointing at the repository's proto/ folder")
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()[:16]
    cache = os.environ.get("MEZO_CLIENT_STUBS") or os.path.join(tempfile.gettempdir(), f"mezo-py-stubs-{digest}")
    if not os.path.isfile(os.path.join(cache, "mezo", "v1", "mezo_pb2_grpc.py")):
        # Generate beside, then rename: two clients starting at once never see a half-written folder.
        tmp = tempfile.mkdtemp(prefix="mezo-py-stubs-")
        rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *files])
        if rc != 0:
            sys.exit(f"mezo_client: protoc failed ({rc}) on {proto_dir}")
        try:
            os.rename(tmp, cache)
        except OSError:
            cache = tmp  # another client won the race, or the cache is not writable
    if cache not in sys.path:
        sys.path.insert(0, cache)
    from mezo.v1 import mezo_pb2, mezo_pb2_grpc, run_pb2
    return mezo_pb2, mezo_pb2_grpc, run_pb2


MIN_TOKEN_LEN = 16


class UsageError(Exception):
    """A mistake in the command line or a credentials file; the message names the input."""


def check_token(token, place):
    """The checks the coordinator's files get: the token travels in an HTTP header. Errors name
    where the token came from, never the token."""
    if not all(33 <= ord(c) <= 126 for c in token):
        raise UsageError(f"{place}: the token has a character other than visible ASCII (no spaces or tabs)")
    if len(token) < MIN_TOKEN_LEN:
        raise UsageError(f"{place}: the token is {len(token)} characters long; at least {MIN_TOKEN_LEN} are needed")
    return token


def read_token(token_file=None):
    """The token to send: the one in `token_file`, else $MEZO_TOKEN, else None. Files and the
    environment keep it out of `ps` and shell history."""
    if token_file:
        try:
            with open(token_file) as f:
                lines = [(i + 1, l.strip()) for i, l in enumerate(f)]
        except OSError as e:
            raise UsageError(f"--token-file {token_file}: cannot read it: {e.strerror}")
        tokens = [(n, l) for n, l in lines if l and not l.startswith("#")]
        if len(tokens) != 1:
            raise UsageError(f"--token-file {token_file}: holds {len(tokens)} tokens; a client sends one")
        n, token = tokens[0]
        return check_token(token, f"--token-file {token_file}, line {n}")
    env = os.environ.get("MEZO_TOKEN", "").strip()
    return check_token(env, "$MEZO_TOKEN") if env else None


def open_channel(address, tls_ca=None, options=()):
    """`https://HOST:PORT` is TLS (the CA in `tls_ca`, else the system's roots); `HOST:PORT` or
    `http://HOST:PORT` is plaintext."""
    if address.startswith("https://"):
        root = None
        if tls_ca:
            try:
                with open(tls_ca, "rb") as f:
                    root = f.read()
            except OSError as e:
                raise UsageError(f"--tls-ca {tls_ca}: cannot read it: {e.strerror}")
            if b"-----BEGIN CERTIFICATE-----" not in root:
                raise UsageError(f"--tls-ca {tls_ca}: holds no PEM certificate")
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.secure_channel(address.removeprefix("https://"), creds, options=list(options))
    if tls_ca:
        raise UsageError(f"--tls-ca is given but --coordinator {address} is plaintext: use https://HOST:PORT")
    return grpc.insecure_channel(address.removeprefix("http://"), options=list(options))


class MezoClient:
    def __init__(self, address, proto_dir=DEFAULT_PROTO, token=None, tls_ca=None):
        self.pb, grpc_mod, self.run_pb = load_stubs(proto_dir)
        self.channel = open_channel(address, tls_ca, [("grpc.max_receive_message_length", 256 << 20)])
        self.stub = grpc_mod.MezoServiceStub(self.channel)
        # Sent with every call; a coordinator without tokens ignores it.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def start(self, model, data_dir, steps, run_id="", lr=1e-4, eps=1e-2, batch_size=16, directions=1, seed=0,
              eval_every=0, lora_r=8, lora_alpha=16.0, targets=("q_proj", "v_proj"), **more):
        """Starts a LoRA run; `more` takes any other RunSpec field (n_train, n_dev, split, ...)."""
        spec = self.run_pb.RunSpec(model=model, data_dir=data_dir, task="sst2", steps=steps, lr=lr, eps=eps,
                                   batch_size=batch_size, directions=directions, seed=seed, eval_every=eval_every,
                                   lora=self.run_pb.LoraSpec(r=lora_r, alpha=lora_alpha, targets=list(targets)),
                                   **more)
        request = self.pb.StartRunRequest(spec=spec, run_id=run_id)
        return self.stub.StartRun(request, metadata=self.metadata).run_id

    def watch(self, run_id, from_step=0):
        """Every step's metrics from `from_step` until the run ends; the last message has done=True."""
        request = self.pb.StreamMetricsRequest(run_id=run_id, from_step=from_step)
        yield from self.stub.StreamMetrics(request, metadata=self.metadata)

    def get(self, run_id):
        return self.stub.GetRun(self.pb.GetRunRequest(run_id=run_id), metadata=self.metadata)

    def list(self):
        return self.stub.ListRuns(self.pb.ListRunsRequest(), metadata=self.metadata).runs

    def stop(self, run_id):
        return self.stub.StopRun(self.pb.StopRunRequest(run_id=run_id), metadata=self.metadata).status

    def export(self, run_id, out_dir):
        """Writes the run's current adapter (adapter_config.json, adapter_model.safetensors)."""
        r = self.stub.ExportAdapter(self.pb.ExportAdapterRequest(run_id=run_id), metadata=self.metadata)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
            f.write(r.adapter_config_json)
        with open(os.path.join(out_dir, "adapter_model.safetensors"), "wb") as f:
            f.write(r.adapter_model_safetensors)
        return r.step

    def status_name(self, status):
        return self.pb.RunStatus.Name(status).removeprefix("RUN_STATUS_").lower()

    def describe(self, r):
        return {"run_id": r.run_id, "status": self.status_name(r.status), "steps_done": r.steps_done,
                "steps": r.spec.steps, "message": r.message}


def reflect(address, version, token=None, tls_ca=None):
    """Asks the server's reflection service (grpcurl's protocol) what it serves, resolves the
    public service's methods from the descriptors it returns (no local .proto needed), and calls
    ListRuns built from those descriptors alone, as grpcurl does."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    # v1 and v1alpha messages are the same on the wire; only the service's name differs.
    from grpc_reflection.v1alpha import reflection_pb2 as r

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with open_channel(address, tls_ca) as ch:
        call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                request_serializer=r.ServerReflectionRequest.SerializeToString,
                                response_deserializer=r.ServerReflectionResponse.FromString)
        services, files = [], {}

        def ask(requests):
            nonlocal services
            for resp in call(iter(requests), metadata=metadata):
                if resp.HasField("error_response"):
                    e = resp.error_response
                    raise RuntimeError(f"reflection error {e.error_code}: {e.error_message}")
                if resp.HasField("list_services_response"):
                    services = sorted(s.name for s in resp.list_services_response.service)
                for raw in resp.file_descriptor_response.file_descriptor_proto:
                    fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                    files[fd.name] = fd

        ask([r.ServerReflectionRequest(list_services=""),
             r.ServerReflectionRequest(file_containing_symbol="mezo.v1.MezoService")])
        # A server may answer with the file alone; its imports are asked for by name, as grpcurl does.
        while missing := sorted({d for fd in files.values() for d in fd.dependency} - set(files)):
            ask([r.ServerReflectionRequest(file_by_filename=name) for name in missing])
        pool = descriptor_pool.DescriptorPool()
        added = set()
        while len(added) < len(files):  # dependencies first
            ready = [n for n, fd in files.items() if n not in added and all(d in added for d in fd.dependency)]
            for n in ready:
                pool.Add(files[n])
                added.add(n)
        svc = pool.FindServiceByName("mezo.v1.MezoService")
        methods = {m.name: {"input": m.input_type.full_name, "output": m.output_type.full_name,
                            "server_streaming": m.server_streaming}
                   for m in svc.methods}
        req_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("mezo.v1.ListRunsRequest"))
        resp_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("mezo.v1.ListRunsResponse"))
        list_runs = ch.unary_unary("/mezo.v1.MezoService/ListRuns", request_serializer=req_cls.SerializeToString,
                                   response_deserializer=resp_cls.FromString)
        runs = sorted(run.run_id for run in list_runs(req_cls(), metadata=metadata).runs)
    return {"protocol": f"grpc.reflection.{version}", "services": services, "files": sorted(files),
            "methods": methods, "runs": runs}


def main():
    ap = argparse.ArgumentParser(description="mezo's gRPC API from Python")
    ap.add_argument("--coordinator", default="127.0.0.1:50051",
                    help="HOST:PORT of the coordinator's gRPC (plaintext), or https://HOST:PORT for TLS")
    ap.add_argument("--proto", default=DEFAULT_PROTO, help="the repository's proto/ folder")
    ap.add_argument("--token-file", help="file holding the client token (else $MEZO_TOKEN)")
    ap.add_argument("--tls-ca", help="PEM certificate of the CA that signed the coordinator's (https:// only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a LoRA run; prints its id")
    s.add_argument("--model", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--run-id", default="")
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--eps", type=float, default=1e-2)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--directions", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=int, default=0)
    s.add_argument("--n-train", type=int, default=0)
    s.add_argument("--n-dev", type=int, default=0)
    s.add_argument("--lora-r", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=16.0)
    for name in ["watch", "get", "stop"]:
        sub.add_parser(name).add_argument("run_id")
    sub.add_parser("list")
    e = sub.add_parser("export", help="write the run's adapter (PEFT format) to a folder")
    e.add_argument("run_id")
    e.add_argument("--out", required=True)
    rf = sub.add_parser("reflect", help="list services and methods through server reflection")
    rf.add_argument("--version", choices=["v1", "v1alpha"], default="v1")
    a = ap.parse_args()

    try:
        token = read_token(a.token_file)
        if a.cmd == "reflect":
            print(json.dumps(reflect(a.coordinator, a.version, token, a.tls_ca)))
            return 0
        c = MezoClient(a.coordinator, a.proto, token=token, tls_ca=a.tls_ca)
        if a.cmd == "start":
            print(c.start(a.model, a.data_dir, a.steps, run_id=a.run_id, lr=a.lr, eps=a.eps,
                          batch_size=a.batch_size, directions=a.directions, seed=a.seed, eval_every=a.eval_every,
                          lora_r=a.lora_r, lora_alpha=a.lora_alpha, n_train=a.n_train, n_dev=a.n_dev))
        elif a.cmd == "watch":
            for m in c.watch(a.run_id):
                if m.done:
                    status = c.status_name(m.status)
                    print(json.dumps({"done": True, "status": status}), flush=True)
                    return 0 if status == "completed" else 1
                line = {"step": m.step, "loss": m.loss, "projected_grad": m.projected_grad, "lr": m.lr,
                        "skipped": m.skipped}
                if m.HasField("dev_accuracy"):
                    line["dev_accuracy"] = m.dev_accuracy
                print(json.dumps(line), flush=True)
            print(f"mezo_client: the stream of run {a.run_id} ended without its final message", file=sys.stderr)
            return 1
        elif a.cmd == "get":
            print(json.dumps(c.describe(c.get(a.run_id))))
        elif a.cmd == "list":
            for r in c.list():
                print(json.dumps(c.describe(r)))
        elif a.cmd == "stop":
            print(json.dumps({"run_id": a.run_id, "was": c.status_name(c.stop(a.run_id))}))
        elif a.cmd == "export":
            step = c.export(a.run_id, a.out)
            print(json.dumps({"run_id": a.run_id, "step": step, "out": a.out}))
    except UsageError as err:
        print(f"mezo_client: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        # The coordinator's message names what was wrong (an unknown run, a missing model path, a
        # missing or wrong token...).
        print(f"mezo_client: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
