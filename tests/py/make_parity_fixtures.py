"""Tiny random OPT checkpoints saved by HF transformers, and HF's own candidate scores for them.

Usage: python make_parity_fixtures.py OUT_DIR DATA_JSONL BPE_DIR [--limit N] [--device cpu|cuda] [--dtypes fp32,bf16]

Writes one checkpoint directory per case under OUT_DIR (both OPT variants, every weight format,
both tokenizer forms) and OUT_DIR/<case>/hf_<template>_<dtype>.json with the scores HF gives, one
unbatched forward per candidate (so our batching is checked too), plus bad-input fixtures.
"""
import argparse, json, os, shutil, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

VARIANTS = {
    # 125m-like: LayerNorm before each block, final LayerNorm, no projections.
    "pre": dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4),
    # 350m-like: LayerNorm after each block, embeddings narrower than the body.
    "post": dict(hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                 word_embed_proj_dim=32, do_layer_norm_before=False),
}
CASES = {
    # case: (variant, safe_serialization, max_shard_size, tokenizer form)
    "pre_safetensors": ("pre", True, None, "vocab"),
    "pre_safetensors_sharded": ("pre", True, "1MB", "json"),
    "pre_bin": ("pre", False, None, "json"),
    "pre_bin_sharded": ("pre", False, "1MB", "vocab"),
    "post_safetensors": ("post", True, None, "json"),
    "post_bin": ("post", False, None, "vocab"),
}
TEMPLATES = {
    "mezo": (lambda s: f"{s} It was", [" terrible", " great"]),
    "classify": (lambda s: f"Classify the sentiment of this review: {s}\nThe sentiment is",
                 [" negative.", " positive."]),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_tokenizer(dst, bpe_dir, form):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_dir, f), dst)
    # OPT's tokenizer_config: GPT-2 BPE that prepends its BOS token.
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
                   "add_prefix_space": False, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "model_max_length": 128}, f)
    if form == "json":
        tok = AutoTokenizer.from_pretrained(dst)
        tok.save_pretrained(dst)
        assert os.path.exists(os.path.join(dst, "tokenizer.json")), "fast tokenizer not saved"
        for f in ("vocab.json", "merges.txt"):
            p = os.path.join(dst, f)
            if os.path.exists(p):
                os.remove(p)


def save_bin(model, d, sharded):
    """pytorch_model.bin as older hub checkpoints have it (transformers 5 only writes
    safetensors): torch.save of the state dict, lm_head sharing the embeddings' storage."""
    os.makedirs(d, exist_ok=True)
    model.config.save_pretrained(d)
    sd = model.state_dict()
    if not sharded:
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
        return
    keys = list(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save({k: sd[k] for k in part}, os.path.join(d, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_model(variant, seed):
    torch.manual_seed(seed)
    # A wide init spreads the candidates' scores apart, so predictions are never near-ties.
    cfg = OPTConfig(vocab_size=50272, max_position_embeddings=128, init_std=0.2,
                    pad_token_id=1, bos_token_id=50256, eos_token_id=50256, **VARIANTS[variant])
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def score(model, tok, examples, template, device="cpu"):
    """MeZO's candidate scoring with HF: one unbatched forward per candidate."""
    prompt_fn, cands = TEMPLATES[template]
    out = []
    for ex in examples:
        prompt = prompt_fn(ex["sentence"])
        p_ids = tok(prompt)["input_ids"]
        scores = []
        for c in cands:
            ids = tok(prompt + c)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            tgt = ids[len(p_ids):]
            lp = [logp[len(p_ids) + i - 1, t].item() for i, t in enumerate(tgt)]
            scores.append(sum(lp) / len(lp))
        pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
        out.append(dict(idx=ex.get("idx", len(out)), label=ex["label"], pred=pred, scores=scores,
                        prompt_ids=p_ids))
    acc = sum(e["pred"] == e["label"] for e in out) / len(out)
    return dict(examples=len(out), accuracy=acc, per_example=out)


def hf_scores(model_dir, examples, template, dtype, device, prepare=None):
    """HF's scores of a saved checkpoint; `prepare(model)` may adjust the loaded model first."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    if prepare is not None:
        prepare(model)
    return score(model, tok, examples, template, device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out"); ap.add_argument("data"); ap.add_argument("bpe")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    examples = [json.loads(l) for l in open(a.data) if l.strip()][: a.limit]
    os.makedirs(a.out, exist_ok=True)
    for case in a.cases.split(","):
        variant, safe, shard, form = CASES[case]
        d = os.path.join(a.out, case)
        model = make_model(variant, seed={"pre": 1, "post": 2}[variant])
        if safe:
            model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        else:
            save_bin(model, d, sharded=bool(shard))
        write_tokenizer(d, a.bpe, form)
        for template in TEMPLATES:
            for dtype in a.dtypes.split(","):
                res = hf_scores(d, examples, template, dtype, a.device)
                with open(os.path.join(d, f"hf_{template}_{dtype}.json"), "w") as f:
                    json.dump(res, f)
        print(case, sorted(os.listdir(d)), flush=True)
    # Bad inputs: a checkpoint that lacks one tensor the config requires.
    d = os.path.join(a.out, "bad_missing_tensor")
    model = make_model("pre", seed=1)
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if k != "model.decoder.layers.1.fc2.weight" and k != "lm_head.weight"}
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(d)
    write_tokenizer(d, a.bpe, "vocab")
    print("bad_missing_tensor", sorted(os.listdir(d)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
