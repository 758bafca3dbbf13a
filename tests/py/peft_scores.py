"""HF transformers + PEFT's candidate scores for a base checkpoint with a LoRA adapter applied.

Usage: python peft_scores.py BASE_DIR ADAPTER_DIR DATA_JSONL LIMIT TEMPLATE OUT_JSON
Loads the adapter with `peft.PeftModel.from_pretrained` (the path a user takes to serve it) and
scores like tests/py/make_parity_fixtures.py: one unbatched forward per candidate.
"""
import json, os, sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from make_parity_fixtures import TEMPLATES  # noqa: E402

base, adapter, data, limit, template, out = sys.argv[1:7]
examples = [json.loads(l) for l in open(data) if l.strip()][: int(limit)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
model = PeftModel.from_pretrained(model, adapter).eval()
prompt_fn, cands = TEMPLATES[template]
res = []
for ex in examples:
    prompt = prompt_fn(ex["sentence"])
    p_ids = tok(prompt)["input_ids"]
    scores = []
    for c in cands:
        ids = tok(prompt + c)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        tgt = ids[len(p_ids):]
        scores.append(sum(logp[len(p_ids) + i - 1, t].item() for i, t in enumerate(tgt)) / len(tgt))
    pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
    res.append(dict(idx=ex.get("idx", len(res)), label=ex["label"], pred=pred, scores=scores))
json.dump(dict(examples=len(res), accuracy=sum(r["pred"] == r["label"] for r in res) / len(res),
               per_example=res), open(out, "w"))
