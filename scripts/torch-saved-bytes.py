# What torch_ref.py keeps for its backward at a preset's layer shapes, per token: saved-tensor
# hooks over 1 and 2 decoder blocks (the difference is one layer) and over the final norm + LM
# head + cross-entropy, eager and torch.compile'd, under bf16 autocast. Runs on the CPU (a few
# GB of RAM, ≈ 1 min): the partitioner that decides what a compiled graph saves and what it
# recomputes is the same on every device, and SDPA's CPU flash kernel saves what the CUDA one
# does (q, k, v, out, logsumexp). The README's prediction of torch's peak memory on the GPU
# comes from it.
#   python3 scripts/torch-saved-bytes.py [--config 1p7b] [--gate elementwise] [--tokens 256]
import argparse, os, sys
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
import torch_ref as R  # noqa: E402


def saved_bytes(module, args_fn, compiled):
    """Bytes of activations (by storage, parameters and their bf16 copies excluded) and of bf16
    weight copies that one forward under autocast saves for its backward."""
    f = torch.compile(module) if compiled else module
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    bf16_sizes = {p.numel() * 2 for p in module.parameters()}

    def run(hooks):
        args = args_fn()
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                weight = t.dtype == torch.bfloat16 and st.nbytes() in bf16_sizes
                seen[st.data_ptr()] = (st.nbytes(), weight)
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16):
            if hooks:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = f(*args)
            else:
                out = f(*args)
        out.float().pow(2).mean().backward()
        return seen

    run(False)  # compile, warm up
    seen = run(True)
    return sum(b for b, w in seen.values() if not w), sum(b for b, w in seen.values() if w)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="1p7b")
    ap.add_argument("--gate", default="elementwise")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    V, d, L, nh, nkv, hd, ffn, T, B = R.CONFIGS[a.config]
    n = a.tokens
    torch.manual_seed(0)
    cos, sin = R.rope_cache(n, hd, 1e6, "cpu")

    class Blocks(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.blocks = torch.nn.ModuleList(R.Block(d, nh, nkv, hd, ffn, a.gate) for _ in range(k))

        def forward(self, x):
            for b in self.blocks:
                x = b(x, cos, sin)
            return x

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = R.RMSNorm(d), torch.nn.Linear(d, V, bias=False)

        def forward(self, x, y):
            logits = self.head(self.norm(x)).float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))

    x = lambda: (torch.randn(1, n, d, requires_grad=True),)
    xy = lambda: (torch.randn(1, n, d, requires_grad=True), torch.randint(0, V, (1, n)))
    for compiled in (False, True):
        (a1, w1), (a2, w2) = (saved_bytes(Blocks(k), x, compiled) for k in (1, 2))
        head, _ = saved_bytes(Head(), xy, compiled)
        print(
            f"{'compile' if compiled else 'eager'} {a.config} {a.gate}: per token and layer "
            f"{(a2 - a1) / n / 1024:.2f} KiB, bf16 weight copies per layer {(w2 - w1) / 2**20:.1f} MiB; "
            f"LM head + loss {head / n / 1024:.1f} KiB per token"
        )


if __name__ == "__main__":
    main()
