"""The HF baselines: transformers `generate` on the base model, and HF + PEFT with mixed
`adapter_names`, over the same requests as the other targets, in closed batches of `batch`.

`generate` does not stream, so a batch's requests all end when it ends: the figures to compare
are output tok/s and req/s (TTFT is the whole batch's time). Each batch runs to its longest
output (min_new_tokens = max_new_tokens, as ignore_eos does for the engine) and is left-padded
to its longest prompt; only the tokens each request asked for are counted. PEFT's adapters are
kept in bfloat16 (autocast_adapter_dtype=False) like the engine's, not upcast to float32.
"""

import time
from pathlib import Path

from serving_report import RequestRecord
from serving_workload import BenchRequest, adapter_name


def run_hf(model_dir: Path, adapter_root: Path, requests: list[BenchRequest], batch: int, peft: bool,
           device: str, dtype: str, progress=None) -> tuple[list[RequestRecord], dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    used = sorted({r.adapter_index for r in requests if r.adapter_index is not None})
    load_s = 0.0
    if peft:
        from peft import PeftModel

        start = time.perf_counter()
        names = [adapter_name(k) for k in used] or []
        if not names:
            raise ValueError("hf-peft needs requests with adapters")
        # low_cpu_mem_usage: each adapter's LoRA layers made empty and filled from its file, not initialised
        # first (164 -> 100 ms an adapter on a small Llama on the CPU); at 128 adapters of Llama-3-8B shapes
        # the loads took most of part B's time limit.
        model = PeftModel.from_pretrained(model, str(adapter_root / names[0]), adapter_name=names[0],
                                          autocast_adapter_dtype=False, low_cpu_mem_usage=True)
        for k, name in enumerate(names[1:], start=2):
            model.load_adapter(str(adapter_root / name), adapter_name=name, autocast_adapter_dtype=False,
                               low_cpu_mem_usage=True)
            if k % 8 == 0 or k == len(names):   # the loads can take minutes: say how far they are
                print(f"hf-peft: {k}/{len(names)} adapters loaded into PEFT in {time.perf_counter() - start:.1f} s",
                      flush=True)
        model = model.to(torch_dtype).eval()
        load_s = time.perf_counter() - start
    records, done, tokens = [], 0, 0
    warm = _inputs(requests[:batch], device)
    with torch.inference_mode():
        _generate(model, warm, requests[:batch], 2, peft)          # kernels, allocator: outside the timing
    for i in range(0, len(requests), batch):
        group = requests[i:i + batch]
        inputs = _inputs(group, device)
        longest = max(r.output_len for r in group)
        _sync(device)
        start = time.monotonic()
        with torch.inference_mode():
            _generate(model, inputs, group, longest, peft)
        _sync(device)
        end = time.monotonic()
        for r in group:
            record = RequestRecord(r.index, None if r.adapter_index is None else adapter_name(r.adapter_index),
                                   len(r.prompt_ids), r.output_len, send_s=start)
            record.on_tokens(end, r.output_len)
            record.end_s = end
            records.append(record)
            done, tokens = done + 1, tokens + r.output_len
        if progress is not None:
            progress.update(done, tokens)
    info = {"adapters_loaded_in_peft": len(used) if peft else 0, "peft_load_seconds": load_s, "batch": batch}
    return records, info


def _inputs(group: list[BenchRequest], device: str) -> dict:
    import torch

    width = max(len(r.prompt_ids) for r in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    for row, r in enumerate(group):           # left padding: generation continues every row at the end
        ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _generate(model, inputs: dict, group: list[BenchRequest], new_tokens: int, peft: bool):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if peft:
        kwargs["adapter_names"] = ["__base__" if r.adapter_index is None else adapter_name(r.adapter_index)
                                   for r in group]
    return model.generate(**inputs, **kwargs)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
