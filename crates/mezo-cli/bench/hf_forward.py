"""The peer for `mezo bench forward`: HF transformers' OPTForCausalLM forward on random weights,
same shape, batch, sequence length and dtype, timed the same way. Prints one JSON line."""
import argparse, json, time

import torch
from transformers import OPTConfig, OPTForCausalLM

SHAPES = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                 word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

ap = argparse.ArgumentParser()
for k, d in [("shape", "125m"), ("dtype", "bf16"), ("device", "cuda")]:
    ap.add_argument("--" + k, default=d)
for k, d in [("batch", 32), ("seq", 64), ("iters", 50), ("warmup", 10)]:
    ap.add_argument("--" + k, type=int, default=d)
a = ap.parse_args()
torch.manual_seed(0)
dev = torch.device(a.device)
prev = torch.get_default_dtype()
torch.set_default_dtype(DTYPES[a.dtype])
with dev:
    model = OPTForCausalLM(OPTConfig(**SHAPES[a.shape])).eval()
torch.set_default_dtype(prev)
ids = torch.randint(4, model.config.vocab_size, (a.batch, a.seq), device=dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
with torch.inference_mode():
    for _ in range(a.warmup):
        model(input_ids=ids).logits
    sync(); t = time.perf_counter()
    for _ in range(a.iters):
        model(input_ids=ids).logits
    sync()
dt = (time.perf_counter() - t) / a.iters
print(json.dumps(dict(bench="forward", impl="hf-transformers " + __import__("transformers").__version__,
                      shape=a.shape, dtype=a.dtype, device=a.device, batch=a.batch, seq=a.seq,
                      ms=round(dt * 1e3, 4), tokens_per_s=round(a.batch * a.seq / dt, 1))), flush=True)
