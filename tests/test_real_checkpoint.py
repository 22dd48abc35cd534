"""The real pretrained all-MiniLM-L6-v2 on real tweets: the Gram matrix and a few training steps."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_sbp import SelectiveBackpropConfig, SelectiveBackpropTrainer
from hf_sbp.core.selection import head_residuals, last_layer_gram
from hf_sbp.glue.bundled import bundled_model_path, load_bundled_dataset


def test_real_checkpoint_gram_and_training(tmp_path):
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tweets = load_bundled_dataset("tweets")["train"].select(range(48))
    data = tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=48), batched=True,
                      remove_columns=["text"])  # fmt: skip
    args = SelectiveBackpropConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=3, logging_steps=3, learning_rate=1e-4,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = SelectiveBackpropTrainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)
    )

    rows = [data[i] for i in range(8)]
    batch = DataCollatorWithPadding(tokenizer)(rows)
    logits, features, has_bias = trainer.score_batch(model, batch)
    assert trainer.head_name == "classifier" and has_bias
    gram = last_layer_gram(head_residuals(logits, batch["labels"], "single_label_classification"), features)
    model.eval()
    per_example = []
    for row in rows:
        single = DataCollatorWithPadding(tokenizer)([row])
        model.zero_grad()
        out = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"])
        F.cross_entropy(out.logits, single["labels"]).backward()
        per_example.append(torch.cat([model.classifier.weight.grad.reshape(-1), model.classifier.bias.grad]))
    G = torch.stack(per_example).double()
    torch.testing.assert_close(gram.double(), G @ G.T, rtol=1e-3, atol=1e-6)

    trainer.train()
    entry = next(e for e in trainer.state.log_history if "sbp/grad_match_error" in e)
    assert entry["sbp/backprop_fraction"] <= 0.5
    assert 0 <= entry["sbp/grad_match_error"] < 1
    assert trainer.sbp_backprop_examples <= 3 * 8
