"""Adapters out of clorae_ds: a peft LoRA that the real peft loads with our logits, merged models that
transformers alone loads with our generations, and the refusals."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from clorae_ds.adapters import save_adapter
from clorae_ds.adapters.export import ExportError, merge_adapter, peft_lora
from clorae_ds.models import ModelConfig

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXPORT = os.path.join(ROOT, "launchers", "export.py")


def trained_adapter(tmp_path, tokenizer_dir, family, mode, corpus_dir=None):
    """An adapter directory with run_config.json beside it, as train.py leaves them, its experts and new modules
    drawn at random (non-zero B, so every expert matters)."""
    config = ModelConfig(family=family, preset="tiny", tokenizer=tokenizer_dir,
                         adapter={"rank": 4, "alpha": 8, "mode": mode, "dropout": 0.0})
    model = config.build().model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    run = tmp_path / f"{family}-{mode}"
    save_adapter(model, str(run / "adapter"))
    (run / "run_config.json").write_text(json.dumps({"run": {}, "model": dataclasses.asdict(config)}))
    return str(run / "adapter"), config


def bundled_dev_inputs(n):
    """The rendered inputs of the first n bundled Twitter-2017 and MNRE-v2 dev samples (shards/)."""
    import tarfile

    from clorae_ds.data import Record, render

    texts = []
    for name in ("twitter2017", "mnre_v2"):
        with tarfile.open(os.path.join(ROOT, "shards", f"{name}-dev-000000.tar")) as tar:
            members = [m for m in tar if m.name.endswith(".json")][:n // 2]
            texts += [render(Record.from_dict(json.load(tar.extractfile(m))))[0] for m in members]
    return texts


def export(*args):
    return subprocess.run([sys.executable, EXPORT, *args], capture_output=True, text=True, timeout=300)


def inputs(tokenizer, task_id):
    batch = tokenizer(["Kyrie Irving plays for the Nets in New York", "Obama met Merkel"], return_tensors="pt",
                      padding=True)
    labels = tokenizer(["person : Kyrie Irving"] * 2, return_tensors="pt", padding=True)["input_ids"][:, :5].contiguous()
    return batch["input_ids"], batch["attention_mask"], labels, torch.full((2,), task_id)


@pytest.fixture(scope="module")
def encoder_decoder_tokenizer_dir(tmp_path_factory):
    from tests.conftest import CORPUS

    directory = str(tmp_path_factory.mktemp("bert_tokenizer"))
    ModelConfig(family="encoder_decoder", preset="tiny").build(CORPUS, directory)
    return directory


SLOW = pytest.mark.slow


@pytest.mark.parametrize("family,mode,task", [("t5", "universal_only", None),
                                              pytest.param("t5", "no_gate", "mre", marks=SLOW),
                                              pytest.param("t5", "task_only", "mee", marks=SLOW),
                                              pytest.param("encoder_decoder", "universal_only", None, marks=SLOW)])
def test_peft_loads_the_exported_lora_with_our_logits(family, mode, task, tmp_path, tokenizer_dir,
                                                      encoder_decoder_tokenizer_dir):
    from peft import PeftModel

    tokenizer_dir = encoder_decoder_tokenizer_dir if family == "encoder_decoder" else tokenizer_dir
    adapter, config = trained_adapter(tmp_path, tokenizer_dir, family, mode)
    out = tmp_path / "peft"
    proc = export(adapter, "--to", "peft", "--out", str(out), *(["--task", task] if task else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == {"universal_only": 4, "no_gate": 4 + 1, "task_only": 1}[mode]
    assert saved["lora_alpha"] / saved["r"] == pytest.approx(8 / 4)  # the adapter's α/r, whatever the rank
    if family == "encoder_decoder":  # the new cross-attention and LM-head transform train fully
        assert saved["modules_to_save"] and all("crossattention" in m or "cls.predictions" in m
                                                for m in saved["modules_to_save"])

    from clorae_ds.eval.inference import load_trained

    ours, _ = load_trained(adapter)
    base = dataclasses.replace(config, adapter=None, full_finetune=True).build()
    peft_model = PeftModel.from_pretrained(base.model.lm, str(out)).eval()
    task_id = ours.model.clorae_config.task_id(task) if task else 0
    input_ids, attention_mask, labels, task_ids = inputs(ours.tokenizer, task_id)
    with torch.no_grad():
        expected = ours.model.eval()(input_ids, attention_mask, labels=labels, task_ids=task_ids).logits
        got = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
    assert (plain - expected).abs().max() > 1e-3  # the LoRA is what makes them equal


@pytest.mark.parametrize("family,mode,task", [pytest.param("t5", "no_gate", "mner", marks=SLOW),
                                              ("encoder_decoder", "task_only", "mre")])
def test_merged_model_loads_with_transformers_alone_and_generates_our_tokens(family, mode, task, tmp_path,
                                                                             tokenizer_dir,
                                                                             encoder_decoder_tokenizer_dir):
    tokenizer_dir = encoder_decoder_tokenizer_dir if family == "encoder_decoder" else tokenizer_dir
    adapter, _ = trained_adapter(tmp_path, tokenizer_dir, family, mode)
    out = tmp_path / "merged"
    proc = export(adapter, "--merge", "--out", str(out), *(["--task", task] if task else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # transformers alone, in a process that never imports clorae_ds
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
        f"model = AutoModelForSeq2SeqLM.from_pretrained({str(out)!r}).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "batch = tokenizer(json.loads(sys.argv[1]), return_tensors='pt', padding=True)\n"
        "out = model.generate(**batch, max_new_tokens=8, do_sample=False)\n"
        "assert 'clorae_ds' not in sys.modules\n"
        "print(json.dumps(out.tolist()))\n")
    texts = bundled_dev_inputs(8)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_tokens = json.loads(proc.stdout.strip().splitlines()[-1])

    from clorae_ds.eval.inference import load_trained

    ours, _ = load_trained(adapter)
    batch = ours.tokenizer(texts, return_tensors="pt", padding=True)
    task_id = ours.model.clorae_config.task_id(task) if task else 0
    with torch.no_grad():
        generated = ours.model.eval().generate(batch["input_ids"], batch["attention_mask"],
                                               task_ids=torch.full((len(texts),), task_id), max_new_tokens=8)
    assert merged_tokens == generated.tolist()


def test_exports_that_cannot_be_exact_are_refused_in_one_sentence(tmp_path, tokenizer_dir, capsys):
    spec = importlib.util.spec_from_file_location("export_launcher", EXPORT)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)  # in this process: each refusal costs no interpreter start

    def refused(*args) -> str:
        assert launcher.main(list(args)) == 2
        return capsys.readouterr().err

    adapter, _ = trained_adapter(tmp_path, tokenizer_dir, "t5", "clorae")
    for args in (["--to", "peft"], ["--merge"]):
        message = refused(adapter, *args, "--out", str(tmp_path / "x"))
        assert "per token with the gate" in message and message.count("\n") == 1
    adapter, _ = trained_adapter(tmp_path, tokenizer_dir, "t5", "no_gate")
    assert "pass --task, one of ['mner', 'mre', 'mee']" in refused(adapter, "--to", "peft", "--out", str(tmp_path / "y"))
    assert "unknown task 'asr'" in refused(adapter, "--merge", "--task", "asr", "--out", str(tmp_path / "z"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    assert "not an empty folder" in refused(adapter, "--merge", "--task", "mre", "--out", str(tmp_path / "full"))


def test_merge_and_peft_factors_agree_in_process(tmp_path, tokenizer_dir):
    """The merged weight of each layer is W0 + (alpha / r) * B @ A of the exported peft factors."""
    adapter, _ = trained_adapter(tmp_path, tokenizer_dir, "t5", "no_gate")
    from clorae_ds.eval.inference import load_trained

    built, _ = load_trained(adapter)
    config, tensors = peft_lora(built.model, "mee")
    bases = {name[len("lm."):]: layer.base.weight.clone() for name, layer in built.model.clorae_layer_list}
    lm = merge_adapter(built.model, "mee")
    for name, weight in bases.items():
        A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        expected = weight + config["lora_alpha"] / config["r"] * B @ A
        torch.testing.assert_close(lm.get_submodule(name).weight, expected)
    with pytest.raises(ExportError, match="no C-LoRAE adapter"):
        peft_lora(built.model, "mee")
