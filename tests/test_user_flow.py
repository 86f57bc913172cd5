"""The flow people follow with IA3 on a quantized model: load in 8-bit/4-bit, prepare, wrap, train with
transformers' Trainer, save the adapter, reload it on a fresh quantized base, generate, add and switch adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, MODELS, load, output, rel_err, sample_ids, upcast

import ia3convert as ia

TEXTS = ["the quick brown fox jumps", "over the lazy dog again!", "ia3 scales what it touches",
         "quantized bases stay frozen"]


class TinyDataset(torch.utils.data.Dataset):
    """Causal-LM examples of equal length (no padding needed), labels = inputs."""

    def __init__(self, tokenizer):
        encoded = [tokenizer(t)["input_ids"][:20] for t in TEXTS]
        width = min(len(e) for e in encoded)
        self.rows = [e[:width] for e in encoded]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_train_save_reload_generate_switch(storage, tmp_path):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    base_dir = MODELS / f"llama-{storage}"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = ia.prepare_model_for_kbit_training(load("llama", storage))
    ia.wrap_model(model, ia.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=0.05, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=TinyDataset(tokenizer)).train()

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".ia3_l." in k}, "only the IA3 vectors may change"
    assert len(changed) == 6

    ia.save_adapters(model, tmp_path / "adapter")
    model.eval()
    ids = sample_ids()
    trained = output(model, ids)

    fresh = upcast(load("llama", storage))
    ia.load_adapter(fresh, tmp_path / "adapter")
    assert rel_err(output(fresh, ids), trained) <= 1e-6

    prompt = tokenizer("the quick", return_tensors="pt")
    generated = fresh.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6

    ia.load_adapter(fresh, ADAPTERS / "llama", adapter_name="other", select="second")
    ia.set_adapter(fresh, "other")
    assert rel_err(output(fresh, ids), trained) > 1e-2
    ia.set_adapter(fresh, "default")
    assert rel_err(output(fresh, ids), trained) <= 1e-6


def test_prepare_keeps_quantized_weights_and_upcasts_the_rest():
    model = ia.prepare_model_for_kbit_training(load("llama", "nf4"))
    kinds = {type(p).__name__: p.dtype for p in model.parameters()}
    assert kinds["Params4bit"] == torch.uint8
    floats = {p.dtype for p in model.parameters() if type(p).__name__ == "Parameter"}
    assert floats == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
