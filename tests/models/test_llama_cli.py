"""Decoder engines from the command line: generation flags, a tokenizer stored from an
hf: checkpoint, and the errors a prompt can cause."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tilec.cli import main  # noqa: E402

WORDS = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    folder = root / "ckpt"
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 6, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    (root / "m.yaml").write_text(json.dumps({"model": {"hf": "ckpt", "max_seq_len": 16},
                                             "dtype": "float32", "target": "cpu"}))
    out = root / "m.engine"
    assert main(["compile", str(root / "m.yaml"), "-o", str(out)]) == 0
    return out


def test_prompt_text_is_encoded_and_output_decoded(engine_path, capsys):
    capsys.readouterr()
    assert main(["run", str(engine_path), "--prompt", "the cat sat", "--max-new-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == [1, 2, 3]
    # the prompt in one launch of the prefill entry (chunk 16, the cpu default), then 2
    assert len(out["new_tokens"]) == 3 and out["steps"] == 3
    assert (out["prefill_steps"], out["decode_steps"]) == (1, 2)
    assert isinstance(out["text"], str)
    for key in ("backend", "seconds", "tokens_per_s"):
        assert key in out


def test_greedy_ids_and_logits_file(engine_path, capsys, tmp_path):
    from safetensors.torch import load_file

    logits = tmp_path / "logits.safetensors"
    capsys.readouterr()
    assert main(["run", str(engine_path), "--prompt-ids", "1,2", "--max-new-tokens", "4",
                 "--logits-out", str(logits), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = load_file(str(logits))["logits"]
    assert saved.shape == (4, len(WORDS) + 6) and saved.dtype == torch.float32
    assert saved.argmax(-1).tolist() == out["new_tokens"]   # greedy = argmax of the logits


def test_sampling_is_seeded(engine_path, capsys):
    runs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["run", str(engine_path), "--prompt-ids", "1", "--max-new-tokens", "5",
                     "--temperature", "5.0", "--top-k", "4", "--seed", "7", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["new_tokens"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,99"], "outside the vocabulary"),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "14"], "exceeds max_seq_len"),
    (["--prompt-ids", "x"], "comma-separated integers"),
    (["--prompt-ids", "1", "--prompt", "the"], "not both"),
])
def test_bad_prompts_are_one_line_errors(engine_path, capsys, args, message):
    capsys.readouterr()
    assert main(["run", str(engine_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
