"""A tiny random GQA Llama checkpoint for the tests that hold engines to transformers."""
import torch


def save_tiny_llama(transformers, folder, vocab_size: int):
    """A two-layer LlamaForCausalLM of 4 query and 2 KV heads, weights larger than
    HF's initialisation (so greedy choices are not near-ties), saved to `folder`."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.15 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int):
    """transformers' greedy tokens after `prompt` and their logits [new_tokens, vocab].
    (pad_token_id is 0, which generate masks wherever it is in the prompt: prompts
    here hold no token 0.)"""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([x[0] for x in out.logits])
