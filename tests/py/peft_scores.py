"""HF transformers + PEFT's candidate scores for a base checkpoint with a LoRA adapter applied.

Usage: python peft_scores.py BASE_DIR ADAPTER_DIR DATA_JSONL LIMIT TEMPLATE OUT_JSON
Loads the adapter with `peft.PeftModel.from_pretrained` (the path a user takes to serve it) and
scores like tests/py/make_parity_fixtures.py: one unbatched forward per candidate. ADAPTER_DIR
`none` scores the checkpoint alone (e.g. a full-parameter run's output, as HF loads it).
"""
import json, os, sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from make_parity_fixtures import score  # noqa: E402

base, adapter, data, limit, template, out = sys.argv[1:7]
examples = [json.loads(l) for l in open(data) if l.strip()][: int(limit)]
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
if adapter != "none":
    model = PeftModel.from_pretrained(model, adapter).eval()
json.dump(score(model, tok, examples, template), open(out, "w"))
