"""A client in another language: generates Python stubs from proto/ with grpcio-tools, starts a
run on a live coordinator and streams its metrics to the end.

Usage: python grpc_client.py PROTO_DIR COORDINATOR_ADDR MODEL_DIR DATA_DIR STEPS
Then a slow subscriber: it opens StreamMetrics on a second run, reads one message and stops
reading; the run must still finish (training never waits for a client), and the stream must still
end with its final message.
Prints one JSON object: {"run_id", "steps_seen", "last_step", "status", "slow_run_status",
"slow_stream_done"}.
"""
import json, os, sys, tempfile

from grpc_tools import protoc

proto_dir, addr, model, data, steps = sys.argv[1:6]
out = tempfile.mkdtemp(prefix="mezo-py-stubs-")
files = [os.path.join(proto_dir, "mezo/v1", f) for f in ("run.proto", "mezo.proto")]
rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
assert rc == 0, f"protoc failed with {rc}"
sys.path.insert(0, out)

import grpc  # noqa: E402
from mezo.v1 import mezo_pb2, mezo_pb2_grpc, run_pb2  # noqa: E402

with grpc.insecure_channel(addr) as ch:
    stub = mezo_pb2_grpc.MezoServiceStub(ch)
    spec = run_pb2.RunSpec(model=model, data_dir=data, steps=int(steps), lr=1e-3, eps=1e-2, batch_size=8,
                           directions=2, n_train=48, n_dev=16, test_limit=16,
                           lora=run_pb2.LoraSpec(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    run_id = stub.StartRun(mezo_pb2.StartRunRequest(spec=spec, run_id="python-client")).run_id
    seen, last, status = 0, -1, None
    for m in stub.StreamMetrics(mezo_pb2.StreamMetricsRequest(run_id=run_id)):
        if m.done:
            status = mezo_pb2.RunStatus.Name(m.status)
            break
        seen += 1
        last = m.step
    # The slow subscriber.
    import time
    slow = run_pb2.RunSpec()
    slow.CopyFrom(spec)
    # More steps than the per-subscriber buffer (256) holds, so an unread stream really backs up.
    slow.steps = 300
    stub.StartRun(mezo_pb2.StartRunRequest(spec=slow, run_id="python-slow"))
    stream = stub.StreamMetrics(mezo_pb2.StreamMetricsRequest(run_id="python-slow"))
    next(stream)
    deadline = time.time() + 480  # generous: CI runs the other cluster tests beside this one
    slow_status = None
    while time.time() < deadline:
        r = stub.GetRun(mezo_pb2.GetRunRequest(run_id="python-slow"))
        if r.status == mezo_pb2.RUN_STATUS_COMPLETED:
            slow_status = mezo_pb2.RunStatus.Name(r.status)
            break
        time.sleep(0.1)
    slow_done = any(m.done for m in stream)
    print(json.dumps(dict(run_id=run_id, steps_seen=seen, last_step=last, status=status,
                          slow_run_status=slow_status, slow_stream_done=slow_done)))
