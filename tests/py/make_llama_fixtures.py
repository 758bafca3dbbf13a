"""Tiny random Llama-family checkpoints saved by HF transformers, and HF's own candidate scores.

Usage: python make_llama_fixtures.py OUT_DIR DATA_JSONL BPE_DIR [--limit N] [--cases a,b] [--bf16-cases a,b]

One checkpoint directory per case under OUT_DIR (model.safetensors, config.json, the GPT-2 BPE
tokenizer) and OUT_DIR/<case>/hf_<template>_<dtype>.json (fp32; bf16 too for --bf16-cases) with HF's scores, one unbatched forward
per candidate (tests/py/make_parity_fixtures.py's `score`). The cases cover grouped-query
attention (key/value heads below the query heads, down to one), tied and untied LM heads, a
head_dim that is not hidden_size / heads, Qwen2's q/k/v biases, Mistral's and Qwen2's sliding
windows reached by the prompts, and every RoPE scaling mezo implements, in both config formats.
"""
import argparse, json, os, shutil, sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_parity_fixtures import TEMPLATES, hf_scores  # noqa: E402

COMMON = dict(vocab_size=50272, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
              num_attention_heads=4, bos_token_id=50256, eos_token_id=50256, initializer_range=0.2)
CASES = {
    # case: (class, config kwargs, prepend BOS, old rope format)
    "llama_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, max_position_embeddings=128), True, False),
    # Llama 3 style: one key/value head, head_dim 16 (q_proj 32 -> 64), biases, tied head.
    "llama3_tied": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16)), True, False),
    # Llama 2 long-context style, written in the old format (rope_theta + rope_scaling).
    "llama_linear_old_format": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=4, max_position_embeddings=128,
        rope_parameters=dict(rope_type="linear", rope_theta=20000.0, factor=2.0)), True, True),
    # Dynamic NTK with a short max_position_embeddings, so most prompts run past it.
    "llama_dynamic": (LlamaForCausalLM, LlamaConfig, dict(
        num_key_value_heads=2, max_position_embeddings=24,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), True, False),
    # Qwen2: q/k/v biases, no BOS, tied head, the second layer windowed.
    "qwen2_tied_window": (Qwen2ForCausalLM, Qwen2Config, dict(
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
        use_sliding_window=True, sliding_window=12, max_window_layers=1), False, False),
    # Mistral: a window of 8 tokens on every layer, untied head.
    "mistral_window": (MistralForCausalLM, MistralConfig, dict(
        num_key_value_heads=2, sliding_window=8, max_position_embeddings=128), True, False),
}


def write_tokenizer(dst, bpe_dir, add_bos):
    """The GPT-2 BPE as a `tokenizer.json`, as Llama-family checkpoints ship theirs: a
    post-processor that prepends the BOS token (Llama, Mistral) or not (Qwen2)."""
    src = dst + ".tokenizer-src"
    os.makedirs(src, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_dir, f), src)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": add_bos,
                   "add_prefix_space": False, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "model_max_length": 512}, f)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    shutil.rmtree(src)
    # Saved again through the class transformers picks for this model_type (config.json is
    # already there): Qwen2's installs Qwen's pre-tokenizer (digits split one by one), as the
    # tokenizer.json of a real Qwen2 checkpoint has it.
    AutoTokenizer.from_pretrained(dst).save_pretrained(dst)
    assert os.path.exists(os.path.join(dst, "tokenizer.json")), "fast tokenizer not saved"


def make_model(case, seed):
    model_cls, cfg_cls, kw, _, _ = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def to_old_rope_format(d):
    """Rewrites config.json as transformers 4 wrote it: rope_theta and rope_scaling."""
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    json.dump(cfg, open(p, "w"), indent=2)


def stateless_dynamic_rope(model):
    """HF's dynamic RoPE keeps the frequencies of the longest sequence it has seen until a
    sequence shorter than max_position_embeddings comes; reset them before every forward, so
    each sequence is scored from its own length, as on a freshly loaded model (and as mezo does)."""
    rot = model.model.rotary_emb

    def reset(module, args):
        module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
        module.max_seq_len_cached = module.original_max_seq_len

    rot.register_forward_pre_hook(reset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out"); ap.add_argument("data"); ap.add_argument("bpe")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--bf16-cases", default="", help="cases also scored in bf16")
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    examples = [json.loads(l) for l in open(a.data) if l.strip()][: a.limit]
    os.makedirs(a.out, exist_ok=True)
    for i, case in enumerate(a.cases.split(",")):
        _, _, _, add_bos, old_format = CASES[case]
        d = os.path.join(a.out, case)
        model = make_model(case, seed=10 + i)
        model.save_pretrained(d)
        write_tokenizer(d, a.bpe, add_bos)
        if old_format:
            to_old_rope_format(d)
        for template in TEMPLATES:
            for dtype in ["fp32"] + (["bf16"] if case in a.bf16_cases.split(",") else []):
                hook = stateless_dynamic_rope if case == "llama_dynamic" else None
                res = hf_scores(d, examples, template, dtype, "cpu", prepare=hook)
                with open(os.path.join(d, f"hf_{template}_{dtype}.json"), "w") as f:
                    json.dump(res, f)
        print(case, sorted(os.listdir(d)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
