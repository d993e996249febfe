"""Loads a Hugging Face model directory with `transformers` and reports what it computes.

Run as a script by a Python that has transformers and torch (`exporter hf --hf-python`), never
imported by rtdlm: the project's own environment has neither. It imports nothing of ours, so
what it reports is transformers' reading of the files alone.

    python hf_check.py DIR REQUEST.json RESULT.npz

REQUEST holds token rows, a prompt, a number of new tokens and texts; RESULT gets the logits
of the rows, the greedy continuation of the prompt by `generate`, and each text's ids.
"""

import json
import sys

import numpy as np
import torch  # pants: no-infer-dep
import transformers  # pants: no-infer-dep


def main(directory: str, request_file: str, result_file: str) -> None:
    with open(request_file) as f:
        request = json.load(f)
    torch.manual_seed(0)
    # a local directory: nothing is downloaded (HF_HUB_OFFLINE too), so no revision to pin
    model = transformers.AutoModelForCausalLM.from_pretrained(  # nosec B615
        directory, dtype=torch.float32, local_files_only=True
    )
    model.eval()
    with torch.no_grad():
        rows = torch.tensor(request["rows"], dtype=torch.long)
        logits = model(rows).logits.float().numpy()
        prompt = torch.tensor(request["prompt"], dtype=torch.long)
        greedy = transformers.GenerationConfig(
            do_sample=False,
            max_new_tokens=request["new_tokens"],
            eos_token_id=None,  # all of them, as rtdlm's greedy reference runs
            pad_token_id=0,
        )
        mask = torch.ones_like(prompt)
        out = model.generate(prompt, attention_mask=mask, generation_config=greedy)
    tokenizer = transformers.AutoTokenizer.from_pretrained(  # nosec B615
        directory, local_files_only=True
    )
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in request["texts"]]
    np.savez(
        result_file,
        logits=logits,
        greedy=out[:, prompt.shape[1] :].numpy(),
        text_ids=np.asarray([i for row in ids for i in row], np.int64),
        text_lengths=np.asarray([len(row) for row in ids], np.int64),
        info=np.asarray(
            json.dumps(
                {
                    "model_class": type(model).__name__,
                    "bos_id": tokenizer.bos_token_id,
                    "eos_id": tokenizer.eos_token_id,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                }
            )
        ),
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
