"""push_to_hub end to end against a loopback fake Hub (tests/hub_server.py): no internet.

The push runs in a subprocess whose environment points ``HF_ENDPOINT`` at the fake Hub before ``huggingface_hub`` is
imported, with Xet disabled and a fake token in ``HF_TOKEN``. The assertions read what the server received.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from glue_fixtures import REPO, RUN_GLUE, save_tiny_model, single_sentence_rows, tiny_training_flags, write_rows
from hub_server import FakeHub
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import load_file

TOKEN = "hf_fake_token_for_tests"


@pytest.fixture
def hub():
    server = FakeHub(token=TOKEN)
    try:
        yield server
    finally:
        server.close()


def _env(hub: FakeHub, tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        env.pop(key, None)
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=TOKEN,
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONPATH=REPO,
    )
    return env


def _run(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def test_run_glue_push_to_hub_uploads_model_tokenizer_and_card(hub, tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "tiny"))
    train = write_rows(str(tmp_path / "train.csv"), single_sentence_rows(48, seed=0))
    val = write_rows(str(tmp_path / "val.csv"), single_sentence_rows(24, seed=1))
    out = tmp_path / "out"
    args = [
        sys.executable, RUN_GLUE,
        "--model_name_or_path", model_dir,
        "--train_file", train, "--validation_file", val,
        "--do_train", "--do_eval", "--max_steps", "4",
        "--sbp_strategy", "gradmatch", "--sbp_keep", "0.5", "--label_noise", "0.25",
        "--push_to_hub", "--hub_model_id", "tester/tiny-sbp",
        *tiny_training_flags(str(out)),
    ]  # fmt: skip
    _run(args, _env(hub, tmp_path), tmp_path)

    assert hub.unexpected == []
    assert ("POST", "/api/repos/create") in hub.requests
    files = hub.files("tester/tiny-sbp")
    # The weights, the config, the tokenizer and the card arrived, byte for byte what the run saved.
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in files, sorted(files)
        assert files[name] == (out / name).read_bytes(), name
    received = load_safetensors(files["model.safetensors"])
    saved = load_file(str(out / "model.safetensors"))
    assert received.keys() == saved.keys() and "classifier.weight" in received
    assert received["classifier.weight"].shape == (2, 32)
    config = json.loads(files["config.json"])
    assert config["label2id"] == {"negative": 0, "positive": 1}
    tokenizer_vocab = json.loads(files["tokenizer.json"])["model"]["vocab"]
    assert "movie" in tokenizer_vocab

    readme = files["README.md"].decode()
    metadata = _front_matter(readme)
    assert {"hf_sbp", "selective-backprop"} <= set(metadata["tags"])
    assert "## Selective backprop" in readme and "### Selection settings" in readme
    assert "| strategy (`sbp_strategy`) | gradmatch |" in readme
    # The card validated by the Hub is the one committed last.
    assert hub.yaml_validated and hub.yaml_validated[-1] == readme
    # The final commit is the push at the end of the script, after the save during it.
    assert hub.commits[-1]["summary"] == "End of training"
    assert "README.md" in hub.commits[-1]["files"]


def test_trainer_push_to_hub_directly(hub, tmp_path):
    model_dir = save_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "direct"
    script = textwrap.dedent(
        f"""
        import torch
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer

        tokenizer = AutoTokenizer.from_pretrained({model_dir!r})
        model = AutoModelForSequenceClassification.from_pretrained({model_dir!r}, num_labels=2)
        texts = ["good movie", "bad film", "great plot", "awful movie"] * 4
        data = Dataset.from_dict({{"text": texts, "label": [1, 0, 1, 0] * 4}})
        data = data.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=8), batched=True)
        args = SelectiveBackpropConfig(
            output_dir={str(out)!r}, push_to_hub=True, hub_model_id="direct-sbp", max_steps=2,
            per_device_train_batch_size=8, report_to="none", use_cpu=True, save_strategy="no",
            sbp_strategy="loss", sbp_keep=0.5,
        )
        trainer = SelectiveBackpropTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        trainer.push_to_hub()
        """
    )
    _run([sys.executable, "-c", script], _env(hub, tmp_path), tmp_path)

    assert hub.unexpected == []
    # No namespace given: the repo is created under the token's user, as on the Hub.
    files = hub.files("tester/direct-sbp")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert name in files, sorted(files)
    readme = files["README.md"].decode()
    assert {"hf_sbp", "selective-backprop"} <= set(_front_matter(readme)["tags"])
    assert "| strategy (`sbp_strategy`) | loss |" in readme
