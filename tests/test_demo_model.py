"""The shipped demo model (models/) does what models/README.md says, measured with HF + PEFT.

No training here: these tests load the committed files, so they also catch a
model or adapter that was retrained without re-checking its quality.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from multilora import demo_tasks

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
N_HELDOUT = 40
# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_demo_model", ROOT / "scripts" / "eval_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EVAL = _eval_script()


@pytest.fixture(scope="module")
def loaded():
    return EVAL.load(MODELS)


@pytest.fixture(scope="module")
def result(loaded):
    return EVAL.evaluate(*loaded, demo_tasks.heldout_inputs(N_HELDOUT, seed=7))


# ---- the task definitions -------------------------------------------------------------------

def test_expected_outputs():
    x = "green apple river"
    assert demo_tasks.format_prompt(x) == "green apple river\n=>"
    assert demo_tasks.expected_output(None, x) == x
    assert demo_tasks.expected_output("upper", x) == "GREEN APPLE RIVER"
    assert demo_tasks.expected_output("reverse", x) == "river apple green"
    assert demo_tasks.expected_output("json", x) == '["green", "apple", "river"]'
    assert demo_tasks.check("upper", x, " GREEN APPLE RIVER")
    assert not demo_tasks.check("upper", x, " GREEN APPLE RIVE")
    with pytest.raises(KeyError, match="unknown demo adapter"):
        demo_tasks.expected_output("sql", x)


def test_heldout_inputs_are_valid_unseen_and_tell_tasks_apart():
    inputs = demo_tasks.heldout_inputs(200)
    assert len(set(inputs)) == 200
    train_words = set(demo_tasks.TRAIN_WORDS)
    for x in inputs:
        assert demo_tasks.is_valid_input(x)
        assert not train_words & set(x.split(" "))
        answers = [demo_tasks.expected_output(name, x) for name in (None, *demo_tasks.ADAPTER_NAMES)]
        assert len(set(answers)) == len(answers), x   # an echo is never a task's answer


# ---- the shipped files ----------------------------------------------------------------------

def test_tokenizer_round_trips_and_matches_config(loaded):
    tokenizer, _ = loaded
    config = json.loads((MODELS / "demo-llama" / "config.json").read_text())
    generation = json.loads((MODELS / "demo-llama" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["vocab_size"] == len(tokenizer)
    for text in ["green apple river\n=>", " GREEN  APPLE ", '["a", "b"]', "a=1,b=2 {x: 3}!?"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_base_model_is_a_tiny_llama():
    config = json.loads((MODELS / "demo-llama" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    with safe_open(MODELS / "demo-llama" / "model.safetensors", "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    assert {t.dtype for t in tensors} == {torch.float32}
    assert sum(t.numel() for t in tensors) < 5_000_000


def test_adapters_are_peft_safetensors_with_distinct_ranks_and_targets():
    ranks, targets = set(), []
    for name in demo_tasks.ADAPTER_NAMES:
        directory = MODELS / "demo-adapters" / name
        assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        ranks.add(config["r"])
        targets.append(frozenset(config["target_modules"]))
        with safe_open(directory / "adapter_model.safetensors", "pt") as f:
            assert any("lora_A" in k for k in f.keys()) and any("lora_B" in k for k in f.keys())
    assert len(ranks) == len(set(targets)) == len(demo_tasks.ADAPTER_NAMES)
    assert any({"gate_proj", "up_proj", "down_proj"} <= t for t in targets)


# ---- quality --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", demo_tasks.ADAPTER_NAMES)
def test_adapter_does_its_task(result, name):
    assert result["adapters"][name] >= 0.95, [f for f in result["failures"] if f[0] == name]


def test_base_model_echoes_and_does_no_task(result):
    assert result["base"]["echo"] >= 0.95
    assert all(result["base"][name] == 0.0 for name in demo_tasks.ADAPTER_NAMES), result["base"]


def test_one_mixed_batch_gives_each_adapter_its_answer(loaded):
    """The README's walk-through, on the reference: one prompt, three adapters and the base, one batch."""
    tokenizer, model = loaded
    x = "green apple river"
    names = [*demo_tasks.ADAPTER_NAMES, "__base__"]
    batch = tokenizer([demo_tasks.format_prompt(x)] * len(names), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, adapter_names=names, max_new_tokens=EVAL.MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    outputs = tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert outputs == [" " + demo_tasks.expected_output(n if n != "__base__" else None, x) for n in names]
