"""The embedded default's training step as the benchmarks take it (bench_train, profile_step): its model with a
LoRA or C-LoRAE adapter, batches of the bundled shards read before any timing, and one optimiser step in a plain loop
or under the project's DeepSpeed engine, eager or compiled."""
from __future__ import annotations

import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def embedded_batches(tokenizer, batch_size: int, count: int, rank: int = 0, world: int = 1) -> tuple:
    """`count` model-input batches of the embedded shards (this rank's share), and each one's tokens."""
    from benchmarks.bench_loader import embedded_train_shards
    from clorae_ds.data.loader import DataConfig, Encoding

    loader = DataConfig(train=embedded_train_shards(), micro_batch_size=batch_size, num_workers=0,
                        batches_per_epoch=count).build(tokenizer, Encoding(drop_target_bos=True), rank, world)
    keys = ("input_ids", "attention_mask", "labels", "task_ids")
    batches = [{k: b[k] for k in keys} for b in loader.train_epoch(0)]
    return batches, [int(b["attention_mask"].sum() + (b["labels"] >= 0).sum()) for b in batches]


def training_step(model, ds_config=None, total_steps: int = 10_000, compiled: bool = False):
    """step(batch): one optimiser step on L + 0.01·MIM — a plain PyTorch loop (fused AdamW, gradients clipped at 1)
    when ds_config is None, else the DeepSpeed engine. `compiled`: the model compiled in place before the engine
    wraps it, batch and length dimensions dynamic (as the trainer's model.compile)."""
    import torch

    def loss_of(out):
        mim = out.get("mim_loss")  # None for LoRA
        return out.loss if mim is None else out.loss + 0.01 * mim

    def inputs(batch):
        if compiled:
            for tensor in batch.values():
                for dim in range(min(tensor.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return {**batch, "return_mim": True}

    if compiled:
        model.compile()
    if ds_config is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step(batch):
            loss_of(model(**inputs(batch))).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    from clorae_ds.adapters.model import parameter_groups
    from clorae_ds.train.engine import DeepSpeedRunner, init_distributed

    runner = DeepSpeedRunner(model, ds_config, parameter_groups(model, 1e-4, 1e-4, 0.0), (0.9, 0.999), 0,
                             total_steps, "constant", init_distributed(600))

    def step(batch):
        runner.backward(loss_of(runner.forward(**inputs(batch))))
        runner.step()
    return step


def build_model(adapter_mode: str, rank: int = 16, pretrained: str = "minilm"):
    """The default model with a LoRA (universal_only), C-LoRAE or C-LoRAE-without-MIM adapter of `rank`, seeded."""
    import torch
    import transformers

    from clorae_ds.models import ModelConfig

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    adapter = {"rank": rank, "alpha": 2 * rank, "mode": adapter_mode}
    if adapter_mode == "clorae_without_mim":
        adapter.update(mode="clorae", mim_beta=0.0)
    return ModelConfig(family="encoder_decoder", pretrained=pretrained, adapter=adapter).build()


def engine_config(ds_config: str, world: int) -> dict:
    from clorae_ds.train.ds_config import load_ds_config

    return load_ds_config(os.path.join(ROOT, "ds_configs", ds_config), world, micro_batch=8)  # embedded_batches' size


def engine_bf16() -> bool:
    from clorae_ds.train.ds_config import bf16_enabled

    return bf16_enabled(engine_config("zero0.json", 1))
