"""Writes the seed inputs of every fuzz target into corpus/<target>/ (run once with the venv's
python; the corpora in the repository grew from these). Real formats, written by the libraries
users' files come from: torch.save, safetensors, HF-style JSON."""
import io, json, hashlib, os, struct, sys
import torch
from safetensors.torch import save as st_save

root = os.path.dirname(os.path.abspath(__file__))
data_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "../../../shared/data")

def put(target, name, data):
    d = os.path.join(root, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

opt = {"model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 32,
       "num_attention_heads": 4, "max_position_embeddings": 40, "do_layer_norm_before": True,
       "word_embed_proj_dim": 16, "activation_function": "relu", "enable_bias": True,
       "layer_norm_elementwise_affine": True, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
       "torch_dtype": "float16", "architectures": ["OPTForCausalLM"]}
put("config_json", "opt", json.dumps(opt, indent=2))
post = dict(opt, do_layer_norm_before=False, word_embed_proj_dim=8, activation_function="gelu")
put("config_json", "opt350m", json.dumps(post))
put("config_json", "untied", json.dumps(dict(opt, tie_word_embeddings=False, _remove_final_layer_norm=True)))
llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}}
put("config_json", "llama3", json.dumps(llama))
put("config_json", "llama_old_rope", json.dumps(dict({k: v for k, v in llama.items() if k != "rope_parameters"},
    rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})))
put("config_json", "qwen2", json.dumps(dict(llama, model_type="qwen2", use_sliding_window=True, sliding_window=8,
    max_window_layers=1, tie_word_embeddings=True, eos_token_id=[2, 3])))
put("config_json", "mistral", json.dumps(dict(llama, model_type="mistral", sliding_window=16, head_dim=8)))

vocab = {"h": 0, "e": 1, "l": 2, "o": 3, "Ġ": 4, "w": 5, "r": 6, "d": 7, "he": 8, "ll": 9, "hell": 10,
         "hello": 11, "Ġw": 12, "</s>": 13, "<pad>": 14}
merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
tok = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [{"id": 13, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True}],
       "normalizer": None,
       "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
       "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                 "merges": merges}}
cfg = {"add_bos_token": True, "bos_token": "</s>", "pad_token": "<pad>", "add_prefix_space": False}
put("tokenizer", "json", b"\x00" + json.dumps(tok).encode())
put("tokenizer", "json_bos", b"\x00" + json.dumps(tok).encode() + b"\xfe" + json.dumps(cfg).encode())
put("tokenizer", "bpe_files", b"\x01" + json.dumps(vocab).encode() + b"\xff" +
    ("#version: 0.2\n" + "\n".join(merges) + "\n").encode() + b"\xfe" + json.dumps(cfg).encode())

g = torch.Generator().manual_seed(0)
state = {"model.decoder.embed_tokens.weight": torch.randn(8, 4, generator=g),
         "model.decoder.layers.0.fc1.bias": torch.randn(3, generator=g).half(),
         "model.decoder.layers.0.fc1.weight": torch.randn(3, 4, generator=g).bfloat16(),
         "lm_head.weight": torch.randn(2, 2, generator=g).double(),
         "counts": torch.arange(5)}
put("safetensors", "small", st_save({k: v.contiguous() for k, v in state.items()}))
put("safetensors", "empty", st_save({}))
buf = io.BytesIO(); torch.save(state, buf); put("torch_bin", "small", buf.getvalue())
base = torch.randn(4, 6, generator=g)
shared = {"a": base, "a_t": base.t(), "row": base[1], "tail": base[:, 2:]}
buf = io.BytesIO(); torch.save(shared, buf); put("torch_bin", "views", buf.getvalue())
buf = io.BytesIO(); torch.save({"h": torch.zeros(0, 3).half(), "s": torch.tensor(2.5)}, buf)
put("torch_bin", "scalar_empty", buf.getvalue())

with open(os.path.join(data_dir, "sst2", "train.jsonl")) as f:
    lines = [next(f) for _ in range(12)]
# dataset: the first byte picks the task (its index in mezo_data::TASK_NAMES, + 12 for SST-2's
# classify template); a custom task's template follows up to a 0x00, parts split by 0xFF. One
# valid file per task, in the HF datasets' field names.
TASKS = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop", "custom"]
def task_file(name, rows, pick=None, header=None):
    body = "".join(json.dumps(r) + "\n" for r in rows) if isinstance(rows, list) else rows
    prefix = bytes([TASKS.index(name) if pick is None else pick])
    if header is not None:
        prefix += b"\xff".join(p.encode() for p in header) + b"\x00"
    return prefix + body.encode()
put("dataset", "sst2", task_file("sst2", "".join(lines)))
put("dataset", "sst2_classify", task_file("sst2", "".join(lines[:4]), pick=12))
put("dataset", "sst2_mixed", task_file("sst2", '{"sentence": "fine", "label": 1, "idx": 4}\n\n{"sentence": "bad", "label": 0}\n'))
put("dataset", "rte", task_file("rte", [
    {"premise": "Ann went to Rome last week.", "hypothesis": "Ann went to Rome.", "idx": 0, "label": 0},
    {"premise": "Bob stayed home.", "hypothesis": "Bob went to Paris.", "idx": 1, "label": 1}]))
put("dataset", "cb", task_file("cb", [
    {"premise": "It rained all day.", "hypothesis": "It was wet.", "idx": 0, "label": 0},
    {"premise": "It is sunny.", "hypothesis": "It rains.", "idx": 1, "label": 1},
    {"premise": "She may come.", "hypothesis": "She will come.", "idx": 2, "label": 2}]))
put("dataset", "boolq", task_file("boolq", [
    {"question": "are cats mammals", "passage": "Cats are mammals.", "idx": 0, "label": 1},
    {"question": "do fish fly", "answer": False, "passage": "Fish swim."}]))
put("dataset", "wsc", task_file("wsc", [
    {"text": "Ann thanked Eve because she helped.", "span1_index": 2, "span2_index": 4,
     "span1_text": "Eve", "span2_text": "she", "idx": 0, "label": 1}]))
put("dataset", "wic", task_file("wic", [
    {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "start1": 10,
     "start2": 4, "end1": 14, "end2": 8, "idx": 0, "label": 0}]))
put("dataset", "multirc", task_file("multirc", [
    {"paragraph": "Ann lives in Rome.", "question": "Where does Ann live?", "answer": "Rome",
     "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1}]))
put("dataset", "copa", task_file("copa", [
    {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
     "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0},
    {"premise": "It rained.", "choice1": "I stayed in.", "choice2": "The sun shone.", "question": "effect",
     "idx": 1, "label": 0}]))
put("dataset", "record", task_file("record", [
    {"passage": "Ann met Bob in Rome.\n@highlight\nAnn and Bob met", "query": "@placeholder met Bob.",
     "entities": ["Ann", "Bob", "Rome"], "entity_spans": {"text": ["Ann", "Bob", "Rome"], "start": [0, 8, 15],
     "end": [3, 11, 19]}, "answers": ["Ann"], "idx": {"passage": 0, "query": 0}}]))
put("dataset", "squad", task_file("squad", [
    {"id": "q0", "title": "Trips", "context": "Ann lives in Rome.", "question": "Where does Ann live?",
     "answers": {"text": ["Rome", "in Rome"], "answer_start": [13, 10]}}]))
put("dataset", "drop", task_file("drop", [
    {"section_id": "s0", "query_id": "q0", "passage": "Ann scored 3 goals and Bob 2.",
     "question": "How many goals did Ann score?", "answers_spans": {"spans": ["3"], "types": ["number"]}}]))
put("dataset", "custom_candidates", task_file("custom", [
    {"text": "fine", "meta": {"stars": 4}, "label": " good"}, {"text": "bad", "meta": {"stars": 1}, "label": 0}],
    header=["Review: {text}\\nScore {meta.stars} {{x}}:", "", "", "", " bad", " good"]))
put("dataset", "custom_field", task_file("custom", [
    {"story": "Ann flew to Rome.", "who": "Ann", "options": ["Rome", "Paris"], "gold": "Rome"},
    {"story": "Bob flew to Oslo.", "who": "Bob", "options": ["Oslo", "Lima", "Kyiv"], "gold": 0}],
    header=["{story}\\nWhere did {who} go?", "options", "gold", ""]))
put("dataset", "custom_generation", task_file("custom", [
    {"q": "capital of France?", "refs": ["Paris", "paris"]}, {"q": "2+2?", "refs": "4"}],
    header=["Q: {q}\\nA:", "", "", "refs"]))

def snap(name, payload, step=7):
    e = {"step": step, "file_name": f"step-{step:020}.snap", "bytes": len(payload),
         "sha256": hashlib.sha256(payload).hexdigest()}
    put("snapshot", name, json.dumps(e).encode() + b"\x00" + payload)
snap("values", struct.pack("<6f", 0.5, -1.0, 0.0, 1e-3, float("nan"), 3.0))
snap("empty", b"")
snap("partial", b"\x01\x02\x03\x04\x05")

def record(step, seeds, grads, lr, losses, skipped):
    b = bytes([1]) + struct.pack("<Q", step)
    b += struct.pack("<I", len(seeds)) + b"".join(struct.pack("<Q", s) for s in seeds)
    b += struct.pack("<I", len(grads)) + b"".join(struct.pack("<d", x) for x in grads)
    b += struct.pack("<d", lr) + struct.pack("<I", len(losses))
    b += b"".join(struct.pack("<dd", p, m) for p, m in losses)
    return b + bytes([int(skipped)])
put("log_record", "two_dirs", record(3, [11, 2**63 + 5], [0.25, -1.5], 1e-6, [(0.7, 0.69), (0.5, 0.52)], False))
put("log_record", "skipped_nan", record(9, [1], [float("nan")], 1e-3, [(float("inf"), float("nan"))], True))
put("log_record", "empty", record(0, [], [], 0.0, [], False))
print("seeds written under", os.path.join(root, "corpus"))
