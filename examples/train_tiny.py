"""Train a tiny NSA language model and the same model with dense attention on multi-query
associative recall, on CPU, and print both learning curves.

Each sequence starts with key/value pairs, then filler tokens, then queries: keys seen at the start,
each followed by its value, which the model must predict. The queries sit further from the pairs than
the sliding window reaches, so NSA can only answer through its compressed and selected branches.

    python examples/train_tiny.py [--steps 300] [--seqlen 256] [--plot curves.png]
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import nsa_ext
from nsa_ext.bench import DenseAttention

VOCAB = 64
KEYS = range(1, 17)       # key tokens
VALUES = range(17, 33)    # value tokens
FILLER = range(33, 64)    # noise between the pairs and the queries


def make_batch(batch: int, seqlen: int, pairs: int, queries: int, gen: torch.Generator):
    """tokens [B, T] and targets [B, T] (-100 where nothing is predicted)."""
    tokens = torch.randint(FILLER.start, FILLER.stop, (batch, seqlen), generator=gen)
    targets = torch.full((batch, seqlen), -100)
    for b in range(batch):
        keys = torch.randperm(len(KEYS), generator=gen)[:pairs] + KEYS.start
        values = torch.randint(VALUES.start, VALUES.stop, (pairs,), generator=gen)
        tokens[b, 0:2 * pairs:2], tokens[b, 1:2 * pairs:2] = keys, values
        asked = torch.randint(0, pairs, (queries,), generator=gen)
        start = seqlen - 2 * queries
        tokens[b, start::2], tokens[b, start + 1::2] = keys[asked], values[asked]
        targets[b, start:-1:2] = values[asked]  # predict the value from its key's position
    return tokens, targets


class Block(nn.Module):
    """Pre-norm transformer block with a token shift before attention: each position also sees a
    projection of the previous token (a width-2 causal convolution, as in H3 or RWKV). A value position
    then carries its key, so a single attention layer can answer a query by matching keys, and the
    tiny models learn recall in minutes instead of first having to grow a previous-token head."""

    def __init__(self, hidden: int, attention: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.shift = nn.Linear(hidden, hidden, bias=False)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        h = self.norm1(x)
        h = h + self.shift(F.pad(h, (0, 0, 1, 0))[:, :-1])
        x = x + self.attention(h)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, kind: str, hidden: int, heads: int, kv_heads: int, layers: int, config: nsa_ext.NSAConfig):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)

        def attention():
            if kind == "dense":
                return DenseAttention(hidden, heads, kv_heads, rotary=True)
            return nsa_ext.NativeSparseAttention(hidden, heads, kv_heads, config=config, compression="mlp",
                                                 rotary=True)
        self.blocks = nn.ModuleList(Block(hidden, attention()) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def train(kind: str, args, config) -> list:
    torch.manual_seed(0)
    model = TinyLM(kind, args.hidden, args.heads, args.kv_heads, args.layers, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    gen = torch.Generator().manual_seed(1)
    curve, begin = [], time.time()
    for step in range(args.steps):
        tokens, targets = make_batch(args.batch, args.seqlen, args.pairs, args.queries, gen)
        logits = model(tokens)
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                mask = targets != -100
                accuracy = (logits.argmax(-1)[mask] == targets[mask]).float().mean().item()
            curve.append((step, loss.item(), accuracy))
            print(f"{kind:>5} step {step:4d}  loss {loss.item():.3f}  recall accuracy {accuracy:.2f}  "
                  f"({time.time() - begin:.0f} s)", flush=True)
    return curve


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--plot", default=None, help="write the learning curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    # Window 32 keys: the pairs (first 16 tokens) are out of its reach from the queries (last 16).
    config = nsa_ext.NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_count=6,
                               init_blocks=1, local_blocks=2, window=32)
    curves = {kind: train(kind, args, config) for kind in ("nsa", "dense")}
    print("\nfinal recall accuracy: " + ", ".join(f"{k} {c[-1][2]:.2f}" for k, c in curves.items()))
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for kind, curve in curves.items():
            steps, losses, accs = zip(*curve)
            ax_loss.plot(steps, losses, label=kind)
            ax_acc.plot(steps, accs, label=kind)
        ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
        ax_acc.set(xlabel="step", ylabel="recall accuracy", title="associative recall")
        ax_loss.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
