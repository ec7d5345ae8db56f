#!/usr/bin/env python3
"""kiln vs PyTorch, same shapes, same device, same threads.

Runs in PyTorch the training steps and kernels that kiln's `cargo bench`
times (the DCGAN, VAE and GPT steps; conv2d and conv_transpose2d forward +
backward on the DCGAN layers; the 1024³ matmul), reads kiln's figures from
`target/kiln-bench/*.json` (written by `cargo bench`), and prints the speed
ratio kiln/PyTorch (PyTorch's time divided by kiln's: above 1, kiln is
faster) beside each target.

It installs nothing: PyTorch must be importable. Run `cargo bench` first,
then on the same machine:

    python3 scripts/compare-pytorch.py                 # CPU, kiln's thread count
    python3 scripts/compare-pytorch.py --device cuda   # GPU, TF32 off

On a shared or virtual machine the speed of both sides drifts by tens of
percent over minutes, so one kiln run against one PyTorch run minutes later
can say little. `--rounds N` interleaves them instead: each round runs
kiln's benches for these cases (`cargo bench`, CPU only) and then times
PyTorch, and the table gives each case's median ratio with its range over
the rounds:

    python3 scripts/compare-pytorch.py --rounds 3

The models mirror kiln's (src/models): same layers, biases, losses and
optimizers; weights are PyTorch's own random initialisation (speed does not
depend on the values).
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys
import time

# Speed-ratio targets (kiln speed / PyTorch speed) for the CPU, 2 threads,
# on any x86-64 (Intel or AMD, with or without AVX-512).
CPU_TARGETS = {
    ("train_step", "vae"): 1.3,
    ("train_step", "gpt"): 1.2,
    ("train_step", "gan"): 0.9,
    ("conv2d forward+backward", None): 0.9,
    ("conv_transpose2d forward+backward", None): 0.9,
    ("gemm", "square 1024"): 1.0,
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch intra-op threads (default: the thread count kiln's CPU run used)",
    )
    parser.add_argument(
        "--bench-dir",
        default=os.environ.get("KILN_BENCH_DIR", "target/kiln-bench"),
        help="where cargo bench wrote its JSON reports (default target/kiln-bench)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case (median)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="interleave N rounds of (kiln's cargo bench, then PyTorch) and report the median "
        "and range of each ratio (default 0: read the results of an earlier cargo bench, once)",
    )
    args = parser.parse_args()
    if args.rounds < 0:
        parser.error("--rounds must be 0 or more")
    if args.rounds and args.device != "cpu":
        parser.error("--rounds runs kiln's CPU benches; on CUDA run cargo bench by hand first")
    return args


# The kiln benches one round runs: (bench binary, criterion filter).
KILN_BENCHES = [
    ("train_step", "cpu"),
    ("kernels", r"^(gemm/cpu/square 1024|conv2d forward\+backward/cpu/D2|conv_transpose2d forward\+backward/cpu/G3)"),
]


def run_kiln_benches(bench_dir):
    """One round of kiln's side: the benches that time this script's cases."""
    import subprocess

    env = dict(os.environ, KILN_BENCH_DIR=os.path.abspath(bench_dir))
    for bench, pattern in KILN_BENCHES:
        print(f"  cargo bench --bench {bench} -- '{pattern}'", flush=True)
        result = subprocess.run(
            ["cargo", "bench", "--bench", bench, "--", pattern],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cargo bench --bench {bench} failed:\n{result.stderr[-2000:]}")


def load_kiln_records(bench_dir):
    records, peaks = [], []
    for path in sorted(glob.glob(os.path.join(bench_dir, "*.json"))):
        with open(path) as f:
            report = json.load(f)
        records.extend(report.get("records", []))
        peaks.extend(report.get("peaks", []))
    return records, peaks


def kiln_threads(peaks):
    """The thread count in kiln's CPU machine line, e.g. '... (GenuineIntel, AVX-512, 2 threads)'."""
    for peak in peaks:
        found = re.search(r"(\d+) threads?\)", peak["machine"]) if peak["device"] == "cpu" else None
        if found:
            return int(found.group(1))
    return os.cpu_count()


def time_call(torch, device, fn, repeats):
    """Median seconds per call: warm up, then time batches of calls with the
    device synchronised at both ends (as kiln's bench does)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, int(0.2 / once))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


# ----- models, mirroring src/models -----------------------------------------


def dcgan_step(torch, device):
    nn = torch.nn
    nz, ngf, ndf, batch = 100, 64, 64, 64
    generator = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False), nn.Tanh(),
    ).to(device)
    discriminator = nn.Sequential(
        nn.Conv2d(1, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False),
    ).to(device)
    optim_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optim_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    real = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
    ones = torch.ones(batch, device=device)
    zeros = torch.zeros(batch, device=device)

    def step():
        z = torch.randn(batch, nz, 1, 1, device=device)
        fake = generator(z)
        optim_d.zero_grad(set_to_none=True)
        loss_d = bce(discriminator(real).view(-1), ones) + bce(discriminator(fake.detach()).view(-1), zeros)
        loss_d.backward()
        optim_d.step()
        optim_g.zero_grad(set_to_none=True)
        loss_g = bce(discriminator(fake).view(-1), ones)
        loss_g.backward()
        optim_g.step()

    return step, batch


def vae_step(torch, device):
    nn = torch.nn
    batch = 128
    fc1, fc21, fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
    fc3, fc4 = nn.Linear(20, 400), nn.Linear(400, 784)
    layers = nn.ModuleList([fc1, fc21, fc22, fc3, fc4]).to(device)
    optimizer = torch.optim.Adam(layers.parameters(), lr=1e-3)
    x = torch.rand(batch, 784, device=device)

    def step():
        h = torch.relu(fc1(x))
        mu, logvar = fc21(h), fc22(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = fc4(torch.relu(fc3(z)))
        reconstruction = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / batch
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        loss = reconstruction + kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch


def gpt_step(torch, device, n_layer, n_head, n_embd, block, batch, vocab=84):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
            self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
            self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            b, t, e = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(n_embd, dim=2)
            q, k, v = (a.view(b, t, n_head, e // n_head).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, e))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
            self.h = nn.ModuleList([Block() for _ in range(n_layer)])
            self.ln_f, self.lm_head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab, bias=False)

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
            for layer in self.h:
                x = layer(x)
            return self.lm_head(self.ln_f(x))

    model = Gpt().to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    x = torch.randint(0, vocab, (batch, block), device=device)
    y = torch.randint(0, vocab, (batch, block), device=device)

    def step():
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    return step, batch


# ----- kernels ---------------------------------------------------------------


def conv_forward_backward(torch, device, transpose):
    F = torch.nn.functional
    if transpose:  # G3: x [64,128,8,8], w [128,64,4,4] -> [64,64,16,16]
        x = torch.randn(64, 128, 8, 8, device=device, requires_grad=True)
        w = (torch.randn(128, 64, 4, 4, device=device) * 0.05).requires_grad_()
        b = torch.randn(64, device=device, requires_grad=True)
        dy = torch.randn(64, 64, 16, 16, device=device)
        forward = lambda: F.conv_transpose2d(x, w, b, stride=2, padding=1)
    else:  # D2: x [64,64,16,16], w [128,64,4,4] -> [64,128,8,8]
        x = torch.randn(64, 64, 16, 16, device=device, requires_grad=True)
        w = (torch.randn(128, 64, 4, 4, device=device) * 0.05).requires_grad_()
        b = torch.randn(128, device=device, requires_grad=True)
        dy = torch.randn(64, 128, 8, 8, device=device)
        forward = lambda: F.conv2d(x, w, b, stride=2, padding=1)

    def step():
        x.grad = w.grad = b.grad = None
        forward().backward(dy)

    return step


def matmul(torch, device, n):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return lambda: torch.mm(a, b)


# ----- matching kiln's records ------------------------------------------------


def find_kiln(records, device, kernel, shape_prefix):
    for r in records:
        if r["device"] == device and r["kernel"] == kernel and r["shape"].startswith(shape_prefix):
            return r
    return None


def main():
    args = parse_args()
    try:
        import torch
    except ImportError:
        print("PyTorch is not importable here; this script installs nothing. "
              "Run it where `python3 -c 'import torch'` works.", file=sys.stderr)
        return 1
    if args.rounds:
        # Round 1's kiln side runs first: its machine line gives the thread count.
        print(f"round 1 of {args.rounds}: kiln, then PyTorch", flush=True)
        run_kiln_benches(args.bench_dir)
    records, peaks = load_kiln_records(args.bench_dir)
    if not records:
        print(f"no kiln results in {args.bench_dir}: run `cargo bench` first", file=sys.stderr)
        return 1
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: PyTorch sees no CUDA device", file=sys.stderr)
            return 1
        # Equal precision with kiln's f32 kernels and the cuBLAS/cuDNN baselines.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    threads = args.threads or kiln_threads(peaks)
    torch.set_num_threads(threads)
    print(f"PyTorch {torch.__version__} on {device}, {threads} threads; kiln results from {args.bench_dir}")

    # (kiln kernel, kiln shape prefix, target key, PyTorch callable, samples per call)
    cases = []
    for name, make in (("gan", dcgan_step), ("vae", vae_step)):
        step, batch = make(torch, device)
        cases.append((f"train_step {name}", "", ("train_step", name), step, batch))
    step, batch = gpt_step(torch, device, 4, 4, 128, 64, 32)
    cases.append(("train_step gpt", "4L", ("train_step", "gpt"), step, batch))
    if device == "cuda":
        step, batch = gpt_step(torch, device, 6, 6, 384, 256, 64)
        cases.append(("train_step gpt", "6L", None, step, batch))
    cases.append(("conv2d forward+backward", "D2", ("conv2d forward+backward", None),
                  conv_forward_backward(torch, device, False), None))
    cases.append(("conv_transpose2d forward+backward", "G3", ("conv_transpose2d forward+backward", None),
                  conv_forward_backward(torch, device, True), None))
    gemm_kernel = "gemm" if device == "cpu" else "gemm v3_register_blocked"
    cases.append((gemm_kernel, "square 1024", ("gemm", "square 1024"), matmul(torch, device, 1024), None))
    if device == "cuda":
        cases.append((gemm_kernel, "square 4096", None, matmul(torch, device, 4096), None))

    rounds = max(args.rounds, 1)
    # case index -> list of (kiln record, PyTorch seconds), one per round
    results = [[] for _ in cases]
    for round_index in range(rounds):
        if args.rounds and round_index > 0:
            print(f"round {round_index + 1} of {rounds}: kiln, then PyTorch", flush=True)
            run_kiln_benches(args.bench_dir)
            records, _ = load_kiln_records(args.bench_dir)
        for i, (kernel, shape, _, fn, _) in enumerate(cases):
            torch_seconds = time_call(torch, device, fn, args.repeats)
            results[i].append((find_kiln(records, device, kernel, shape), torch_seconds))

    print()
    if args.rounds:
        print(f"Interleaved over {rounds} rounds: times and ratio are medians, the range is min-max of the per-round ratios.")
    print("| case | shape | kiln | PyTorch | kiln/PyTorch speed | target | met |")
    print("|---|---|---|---|---|---|---|")
    for (kernel, shape, target_key, _, samples), rows in zip(cases, results):
        torch_seconds = statistics.median(t for _, t in rows)
        timed = [(r["seconds"], t) for r, t in rows if r is not None]
        target = CPU_TARGETS.get(target_key) if device == "cpu" and target_key else None
        if not timed:
            print(f"| {kernel} | {shape or '-'} | not in kiln's results | {torch_seconds * 1e3:.2f} ms | - | - | - |")
            continue
        record = next(r for r, _ in rows if r is not None)
        kiln_seconds = statistics.median(k for k, _ in timed)
        ratios = sorted(t / k for k, t in timed)
        ratio = statistics.median(ratios)
        spread = f" [{ratios[0]:.2f}-{ratios[-1]:.2f}]" if len(ratios) > 1 else ""
        met = "-" if target is None else ("yes" if ratio >= target else "NO")
        if met == "NO" and round(ratio, 2) >= target:
            met = f"NO ({ratio:.3f})"  # below the target, though it prints as equal
        extra = f" ({samples / kiln_seconds:.0f} vs {samples / torch_seconds:.0f} samples/s)" if samples else ""
        print(
            f"| {kernel} | {record['shape']} | {kiln_seconds * 1e3:.2f} ms | {torch_seconds * 1e3:.2f} ms"
            f" | {ratio:.2f}{spread}{extra} | {'≥ ' + str(target) if target else '-'} | {met} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
