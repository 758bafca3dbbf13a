"""Makes the bundled small OPT (crates/mezo-cli/assets/opt-mini), pretrained by this script as a
causal language model and saved in HF's format.

Its corpus is SST-2's training file only: every phrase as plain text and, with --verbalizer, each
labelled phrase once more as "<phrase> It was good." / "... It was bad.". The model so learns
sentiment, but under the verbaliser good/bad, never the demo's great/terrible: zero-shot SST-2
with the MeZO prompt ("It was" terrible/great) is near chance, and the demo's MeZO run has to
adapt the model to that prompt, as MeZO adapts pretrained LMs to prompts in the paper. The test
set (validation.jsonl) is never read here.

Usage: python scripts/make_demo_model.py OUT_DIR --sst2 ../shared/data/sst2/train.jsonl
         --bpe ../shared/data/gpt2-bpe [--steps N] [--device cpu|cuda] [--seed S] ...
The published asset was made with the defaults on one H100 (about 100 s); see assets/README.md.
"""
import argparse, json, os, random, shutil, time

import torch
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

def config(a):
    return dict(vocab_size=50272, hidden_size=a.hidden, num_hidden_layers=a.layers, ffn_dim=4 * a.hidden,
                num_attention_heads=a.hidden // 32, max_position_embeddings=128,
                word_embed_proj_dim=a.embed_dim or a.hidden, do_layer_norm_before=True, pad_token_id=1,
                bos_token_id=50256, eos_token_id=50256, init_std=0.02, dropout=a.dropout,
                attention_dropout=a.dropout)


def write_tokenizer(dst, bpe_dir):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_dir, f), dst)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
                   "add_prefix_space": False, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "model_max_length": 128}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sst2", required=True)
    ap.add_argument("--bpe", required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed-dim", type=int, default=0, help="word_embed_proj_dim (0: = hidden)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--verbalizer", default="good,bad",
                    help="e.g. 'good,bad': also train on '<sentence> It was good/bad.' for a fraction of "
                         "the labelled sentences (a verbaliser other than the demo's great/terrible)")
    ap.add_argument("--verbalizer-fraction", type=float, default=1.0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    write_tokenizer(a.out, a.bpe)
    tok = AutoTokenizer.from_pretrained(a.out)

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    rows = [json.loads(l) for l in open(a.sst2) if l.strip()]
    sentences = [r["sentence"] for r in rows]
    docs = list(sentences)
    if a.verbalizer:
        pos_word, neg_word = a.verbalizer.split(",")  # label 1, label 0
        for r in rows:
            if random.random() < a.verbalizer_fraction:
                docs.append(f"{r['sentence']} It was {pos_word if r['label'] == 1 else neg_word}.")
        random.shuffle(docs)
    # One stream of documents, each starting with BOS as the tokenizer adds it; packed into
    # fixed-length blocks (the usual causal-LM pretraining recipe).
    stream = []
    for s in docs:
        stream.extend(tok(s)["input_ids"])
    data = torch.tensor(stream)
    n_blocks = len(data) // a.seq
    blocks = data[: n_blocks * a.seq].view(n_blocks, a.seq)
    print(f"{len(sentences)} sentences, {len(stream)} tokens, {n_blocks} blocks of {a.seq}", flush=True)

    model = OPTForCausalLM(OPTConfig(**config(a))).to(a.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(a.steps):
        idx = torch.randint(0, n_blocks, (a.batch,))
        x = blocks[idx].to(a.device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if step % 200 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    model = model.eval().to("cpu").to(torch.float16)
    model.config.dropout = model.config.attention_dropout = 0.0
    model.save_pretrained(a.out)
    gen = os.path.join(a.out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    print("saved", sorted(os.listdir(a.out)), flush=True)


if __name__ == "__main__":
    main()
