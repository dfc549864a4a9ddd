import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_ckpt(path, seed, n_layer, sharpen=1.0):
    """A tiny random checkpoint (char tokenizer); sharpen > 1 scales the head: a peaked 'teacher'."""
    from data.countdown import TOKENIZER_PATH
    from checkpoint import save_pretrained
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=23, n_layer=n_layer, n_head=2, d_model=32, d_mlp=64)
    model = GPT(cfg)
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    save_pretrained(model.state_dict(), cfg, str(path), TOKENIZER_PATH)
    return str(path)
